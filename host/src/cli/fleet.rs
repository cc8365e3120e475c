//! `switchyard deploy -p PIPELINE` to a fleet, and `switchyard fleet
//! status | history`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::config::Pipeline;
use crate::envelope::now_ms;
use crate::fleet::{Fleet, HostReport};
use crate::plugin::short_digest;
use crate::runtime;

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// The hosts of a pipeline, what each runs, and which have not converged.
    #[command(after_help = "Examples:
  switchyard fleet status -p pipelines/shop.toml
  switchyard fleet status -p pipelines/shop.toml --json

A host reports every [fleet] poll_interval; one not heard from for 30 s is shown as gone.
The exit status is 0 when every live host runs every desired version, 1 otherwise.")]
    Status {
        /// The pipeline file (with a [fleet] section).
        #[arg(short, long)]
        pipeline: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// The deploys to a pipeline's fleet, newest first.
    #[command(after_help = "Examples:
  switchyard fleet history -p pipelines/shop.toml
  switchyard fleet history -p pipelines/shop.toml --limit 100 --json")]
    History {
        /// The pipeline file (with a [fleet] section).
        #[arg(short, long)]
        pipeline: PathBuf,
        /// At most this many deploys.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

async fn open(path: &Path) -> Result<(Pipeline, Fleet)> {
    let pipeline = super::load_pipeline(path)?;
    let Some(config) = &pipeline.fleet else {
        bail!(
            "{}: the pipeline has no [fleet] section; deploy to one host with `switchyard deploy --host URL`",
            path.display()
        );
    };
    let fleet = Fleet::connect(config, &pipeline.name).await?;
    Ok((pipeline, fleet))
}

/// Checks `file` as plugin `plugin` of the pipeline and records it as the
/// version its fleet runs; with `wait`, waits until every live host runs it.
pub async fn deploy(
    file: &Path,
    plugin: &str,
    pipeline_path: &Path,
    wait: Option<Duration>,
) -> Result<ExitCode> {
    let (pipeline, fleet) = open(pipeline_path).await?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let info = runtime::check_build(&pipeline, plugin, file)
        .await
        .with_context(|| format!("{} is refused for plugin `{plugin}`", file.display()))?;
    let by = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let record = fleet.record(plugin, &bytes, &info.version, &by).await?;
    println!(
        "deployed {plugin} {} ({}) to the fleet of pipeline `{}` (deploy #{}{})",
        record.version,
        short_digest(&record.digest),
        pipeline.name,
        record.seq,
        record
            .previous
            .as_deref()
            .map(|p| format!(", was {}", short_digest(p)))
            .unwrap_or_default()
    );
    let Some(wait) = wait else {
        println!(
            "every host of the pipeline takes it within its poll interval; see `switchyard fleet status -p {}`",
            pipeline_path.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let deadline = Instant::now() + wait;
    loop {
        let hosts = live(fleet.hosts().await?);
        let behind: Vec<&HostReport> = hosts
            .iter()
            .filter(|h| {
                h.running.get(plugin).map(|r| r.digest.as_str()) != Some(record.digest.as_str())
            })
            .collect();
        if behind.is_empty() {
            println!("{} live host(s) run it", hosts.len());
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            println!(
                "not converged after {}: {} of {} live host(s) do not run it",
                humantime::format_duration(wait),
                behind.len(),
                hosts.len()
            );
            for h in behind {
                println!(
                    "  {}: {}{}",
                    h.host,
                    h.running
                        .get(plugin)
                        .map_or("not running it".to_owned(), |r| format!(
                            "runs {} ({})",
                            r.version,
                            short_digest(&r.digest)
                        )),
                    h.problem
                        .as_deref()
                        .map(|p| format!("; {p}"))
                        .unwrap_or_default()
                );
            }
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The hosts running and heard from within [`GONE_AFTER`].
fn live(hosts: Vec<HostReport>) -> Vec<HostReport> {
    hosts.into_iter().filter(HostReport::live).collect()
}

fn ago(at_ms: u64) -> String {
    let secs = now_ms().saturating_sub(at_ms) / 1000;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

pub async fn run(command: FleetCommand) -> Result<ExitCode> {
    match command {
        FleetCommand::Status { pipeline, json } => status(&pipeline, json).await,
        FleetCommand::History {
            pipeline,
            limit,
            json,
        } => {
            let (_, fleet) = open(&pipeline).await?;
            let history = fleet.history(i64::from(limit)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&history)?);
                return Ok(ExitCode::SUCCESS);
            }
            if history.is_empty() {
                println!("nothing has been deployed to this fleet");
            }
            for d in history {
                println!(
                    "#{:<5} {:<16} {:<10} {}  {}  by {}, {}",
                    d.seq,
                    d.plugin,
                    d.version,
                    short_digest(&d.digest),
                    d.previous
                        .as_deref()
                        .map_or("(first)".to_owned(), |p| format!("was {}", short_digest(p))),
                    d.by,
                    crate::transport::cloudevents::rfc3339(d.at_ms)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let (pipeline, fleet) = open(path).await?;
    let desired = fleet.desired().await?;
    let hosts = fleet.hosts().await?;
    let converged = |h: &HostReport| {
        desired.iter().all(|(plugin, d)| {
            h.running.get(plugin).map(|r| r.digest.as_str()) == Some(d.digest.as_str())
        })
    };
    let live: Vec<&HostReport> = hosts.iter().filter(|h| h.live()).collect();
    let all_converged = !live.is_empty() && live.iter().all(|h| converged(h));
    if json {
        let hosts: Vec<serde_json::Value> = hosts
            .iter()
            .map(|h| {
                serde_json::json!({
                    "host": h.host,
                    "live": h.live(),
                    "stopped": h.stopped,
                    "converged": converged(h),
                    "started_at_ms": h.started_at_ms,
                    "seen_at_ms": h.seen_at_ms,
                    "running": h.running,
                    "problem": h.problem,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "pipeline": pipeline.name,
                "desired": desired,
                "hosts": hosts,
                "converged": all_converged,
            }))?
        );
    } else {
        println!("pipeline {}", pipeline.name);
        if desired.is_empty() {
            println!("desired: the pipeline file's versions (nothing deployed to the fleet)");
        }
        for (plugin, d) in &desired {
            println!(
                "desired: {plugin} {} ({}), deploy #{} {}",
                d.version,
                short_digest(&d.digest),
                d.seq,
                ago(d.at_ms)
            );
        }
        if hosts.is_empty() {
            println!("no host has reported");
        }
        for h in &hosts {
            let state = if h.stopped {
                "stopped"
            } else if !h.live() {
                "gone"
            } else if converged(h) {
                "converged"
            } else {
                "NOT CONVERGED"
            };
            let running: Vec<String> = h
                .running
                .iter()
                .map(|(p, r)| format!("{p} {} ({})", r.version, short_digest(&r.digest)))
                .collect();
            println!(
                "host {}: {state}, seen {}, up since {}",
                h.host,
                ago(h.seen_at_ms),
                crate::transport::cloudevents::rfc3339(h.started_at_ms)
            );
            println!("  runs {}", running.join(", "));
            if let Some(p) = &h.problem {
                println!("  problem: {p}");
            }
        }
    }
    Ok(if all_converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
