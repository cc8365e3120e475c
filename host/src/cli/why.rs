//! `switchyard why`: the story of a message, or of a whole flow, told from
//! the journal, the dead-letter store and saga state.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::dlq;
use crate::journal;
pub use crate::story::{Node, Story, story_of, tell};
use crate::story::{flow, message, resolve};

/// `switchyard why` options.
#[derive(Debug, Args)]
pub struct WhyArgs {
    /// The message id (or a unique prefix of it, or a dead-letter record
    /// id); with --correlation, the flow's correlation id.
    pub id: String,
    /// The pipeline TOML file whose journal to read.
    #[arg(short, long, env = "SWITCHYARD_PIPELINE")]
    pub pipeline: PathBuf,
    /// Tell the story of a whole flow: every message with this correlation
    /// id, and the one that started it.
    #[arg(long)]
    pub correlation: bool,
    /// Find the flow by a span attribute a plugin set: the argument is
    /// `NAME=VALUE` (e.g. `order.id=A-1001`). One flow found is told; more
    /// are listed.
    #[arg(long, conflicts_with = "correlation")]
    pub attribute: bool,
    /// Print the story as JSON, for tools.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: WhyArgs) -> Result<ExitCode> {
    let pipeline = super::load_pipeline(&args.pipeline)?;
    if !pipeline.journal.enabled {
        bail!(
            "{}: the journal is off (`[journal] enabled = false`), so there is no story to tell; the dead letters are in `switchyard dlq list -p {}`",
            args.pipeline.display(),
            args.pipeline.display()
        );
    }
    let journal = journal::open(&pipeline.journal, &pipeline.name)
        .await
        .context("cannot open the journal")?;
    let letters = dlq::open(&pipeline.dead_letters, &pipeline.name)
        .await
        .with_context(|| format!("cannot open the {}", dlq::describe(&pipeline.dead_letters)))?;
    let searched = vec![journal.location(), dlq::describe(&pipeline.dead_letters)];
    let mut args = args;
    if args.attribute {
        let Some((name, value)) = crate::story::attribute_query(&args.id) else {
            bail!(
                "--attribute takes NAME=VALUE (like order.id=A-1001), not `{}`",
                args.id
            );
        };
        let found = crate::story::by_attribute(journal.as_ref(), name, value).await?;
        match found.as_slice() {
            [] => {
                eprintln!(
                    "No plugin set {name} = {value} on a message the journal holds. Searched: {}.",
                    journal.location()
                );
                return Ok(ExitCode::FAILURE);
            }
            [one] => {
                args.id = one.flow.clone();
                args.correlation = true;
            }
            many => {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(many)?);
                } else {
                    println!(
                        "{name} = {value} was set in {} flows, the most recent first:",
                        many.len()
                    );
                    for f in many {
                        let r = &f.handlings[0];
                        println!(
                            "  {}  {} {} by {} ({})",
                            crate::story::time(r.at_ms),
                            r.message_type,
                            r.message_id,
                            r.plugin,
                            r.outcome.as_str()
                        );
                        println!(
                            "      switchyard why --correlation {} -p {}",
                            f.flow,
                            args.pipeline.display()
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    let story = if args.correlation {
        flow(journal.as_ref(), letters.as_ref(), &args.id, searched).await?
    } else {
        match resolve(journal.as_ref(), letters.as_ref(), &args.id).await? {
            Some(id) => message(journal.as_ref(), letters.as_ref(), &id, searched).await?,
            None => {
                eprintln!(
                    "No message `{}` is known. Searched: {}. A message handled before the journal's retention ({}), or by a host with the journal off, leaves no record.",
                    args.id,
                    searched.join("; "),
                    humantime::format_duration(pipeline.journal.retention)
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    };
    if story.messages.is_empty() {
        let what = if args.correlation {
            format!("No message of flow `{}` is known", args.id)
        } else {
            format!(
                "The journal holds no record of message `{}` (named by a dead letter; handled before the journal's retention, or with the journal off)",
                story.subject
            )
        };
        eprintln!("{what}. Searched: {}.", story.searched.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    let mut story = story;
    story.pipeline = Some(args.pipeline.display().to_string());
    if pipeline.plugins.iter().any(|p| p.saga.is_some()) {
        // Saga state is read when it is there: a pipeline whose sagas have
        // not run yet has none, and the story is told without it.
        match super::state::open_store_at(&args.pipeline).await {
            Ok((reader, _, location)) => {
                story.searched.push(format!("saga state in {location}"));
                if let Err(e) = crate::story::add_saga_steps(&mut story, reader).await {
                    eprintln!("note: saga steps are not shown: {e:#}");
                }
            }
            Err(e) => eprintln!("note: saga steps are not shown: {e:#}"),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&story)?);
    } else {
        print!("{}", tell(&story));
    }
    Ok(ExitCode::SUCCESS)
}
