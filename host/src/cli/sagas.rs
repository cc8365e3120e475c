//! `switchyard sagas`: the instances of the pipeline's saga plugins, their
//! state and every step that made it, read from the pipeline's store.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::dlq::time;
use super::state::{check_plugin, open_store, shown, text};
use crate::envelope::now_ms;
use crate::saga::{Instance, Listed, Pending, Query, Status, Step};
use crate::state::Reader;

#[derive(Debug, Subcommand)]
pub enum SagasCommand {
    /// List saga instances, the most recently changed first.
    #[command(after_help = "Examples:
  switchyard sagas list -p pipelines/orders.toml
  switchyard sagas list -p pipelines/orders.toml --plugin fulfilment --status running
  switchyard sagas list -p pipelines/orders.toml --stuck 15m     # running, no step for 15 minutes
  switchyard sagas list -p pipelines/orders.toml --status failed # a step was dead-lettered
  switchyard sagas list -p pipelines/orders.toml --older-than 7d --json")]
    List {
        /// The pipeline TOML file.
        #[arg(short, long, env = "SWITCHYARD_PIPELINE")]
        pipeline: PathBuf,
        /// Only this saga plugin's instances.
        #[arg(long)]
        plugin: Option<String>,
        /// Only instances in this status: running, completed or failed (a
        /// step of it was dead-lettered).
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// Only running instances whose last step is older than this
        /// (e.g. 15m, 2h): the ones nobody moves on.
        #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
        stuck: Option<Duration>,
        /// Only instances started longer ago than this (e.g. 7d).
        #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
        older_than: Option<Duration>,
        /// At most this many instances.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Show one saga instance: its state, its version, every step and its
    /// pending timeouts.
    #[command(after_help = "Examples:
  switchyard sagas show -p pipelines/orders.toml fulfilment A-1001
  switchyard sagas show -p pipelines/orders.toml fulfilment A-1001 --json

Each step lists the message that made it, what it changed in the state
(`set` and `deleted` keys) and what it sent or published. Exits with
status 1 when the instance does not exist.")]
    Show {
        /// The pipeline TOML file.
        #[arg(short, long, env = "SWITCHYARD_PIPELINE")]
        pipeline: PathBuf,
        /// The saga plugin, as named in the pipeline.
        plugin: String,
        /// The instance id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s).ok_or_else(|| format!("{s:?} is not a status: running, completed or failed"))
}

pub async fn run(command: SagasCommand) -> Result<ExitCode> {
    match command {
        SagasCommand::List {
            pipeline,
            plugin,
            status,
            stuck,
            older_than,
            limit,
            json,
        } => {
            let (reader, p) = open_store(&pipeline).await?;
            if let Some(name) = &plugin {
                check_plugin(&pipeline, &p, name)?;
            }
            let ago = |d: Duration| {
                now_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            };
            let query = Query {
                plugin,
                status: if stuck.is_some() {
                    Some(Status::Running)
                } else {
                    status
                },
                updated_before_ms: stuck.map(ago),
                started_before_ms: older_than.map(ago),
                limit,
            };
            if let (Some(_), Some(s)) = (stuck, status)
                && s != Status::Running
            {
                bail!(
                    "--stuck lists running instances; it cannot be combined with --status {}",
                    s.as_str()
                );
            }
            let found = blocking(reader, move |r| r.instances(&query)).await?;
            if json {
                let list: Vec<Value> = found
                    .iter()
                    .map(|l| listed_json(&l.plugin, &l.id, &l.instance))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_list(&found);
            }
            Ok(ExitCode::SUCCESS)
        }
        SagasCommand::Show {
            pipeline,
            plugin,
            id,
            json,
        } => {
            let (reader, p) = open_store(&pipeline).await?;
            check_plugin(&pipeline, &p, &plugin)?;
            if !p
                .plugins
                .iter()
                .any(|s| s.name.as_str() == plugin && s.saga.is_some())
            {
                eprintln!(
                    "note: the pipeline does not run {plugin} as a saga ([plugins.{plugin}.saga]) now"
                );
            }
            let (name, key) = (plugin.clone(), id.clone());
            let shown_instance = blocking(reader, move |r| {
                let Some(instance) = r.instance(&name, &key)? else {
                    return Ok(None);
                };
                let state = crate::state::instance_state(r, &name, &key)?;
                let steps = r.steps(&name, &key)?;
                let timeouts = r.timeouts(&name, &key)?;
                Ok(Some((instance, state, steps, timeouts)))
            })
            .await?;
            let Some((instance, state, steps, timeouts)) = shown_instance else {
                eprintln!("saga {plugin} has no instance {id:?}");
                return Ok(ExitCode::FAILURE);
            };
            if json {
                let mut v = listed_json(&plugin, &id, &instance);
                v["state"] =
                    Value::Object(state.iter().map(|(k, v)| (k.clone(), shown(v))).collect());
                v["steps"] = serde_json::to_value(&steps)?;
                v["timeouts"] = Value::Array(
                    timeouts
                        .iter()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "type": t.message_type,
                                "due_at": time(t.due_ms),
                                "sent_at": t.fired_at_ms.map(time),
                                "sends": t.sends,
                            })
                        })
                        .collect(),
                );
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_instance(&plugin, &id, &instance, &state, &steps);
                print_timeouts(&timeouts);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs a read on a blocking thread (the PostgreSQL reader blocks).
async fn blocking<T: Send + 'static>(
    reader: Arc<dyn Reader>,
    f: impl FnOnce(&dyn Reader) -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || f(reader.as_ref()))
        .await
        .context("the state task failed")?
}

fn listed_json(plugin: &str, id: &str, i: &Instance) -> Value {
    json!({
        "plugin": plugin,
        "id": id,
        "status": i.status.as_str(),
        "version": i.version,
        "plugin_version": i.plugin_version,
        "started_at": time(i.started_at_ms),
        "updated_at": time(i.updated_at_ms),
        "last_type": i.last_type,
    })
}

fn print_list(found: &[Listed]) {
    if found.is_empty() {
        println!("no saga instances");
        return;
    }
    let w_plugin = found
        .iter()
        .map(|l| l.plugin.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let w_id = found
        .iter()
        .map(|l| l.id.chars().count())
        .max()
        .unwrap_or(0)
        .max(8);
    println!(
        "{:<w_plugin$}  {:<w_id$}  {:<9}  {:>5}  {:<20}  LAST STEP",
        "PLUGIN", "INSTANCE", "STATUS", "STEPS", "UPDATED"
    );
    for l in found {
        println!(
            "{:<w_plugin$}  {:<w_id$}  {:<9}  {:>5}  {:<20}  {} ({})",
            l.plugin,
            l.id,
            l.instance.status.as_str(),
            l.instance.version,
            time(l.instance.updated_at_ms),
            l.instance.last_type,
            ago(l.instance.updated_at_ms)
        );
    }
}

/// How long ago `ms` was, roughly: `42s ago`, `3m ago`, `5h ago`, `2d ago`.
fn ago(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn print_timeouts(timeouts: &[Pending]) {
    println!();
    println!("pending timeouts");
    if timeouts.is_empty() {
        println!("  (none)");
    }
    for t in timeouts {
        let sent = t
            .fired_at_ms
            .map(|at| format!(", sent {} time(s), last {}", t.sends, time(at)))
            .unwrap_or_default();
        println!("  {}  {}  {}{sent}", time(t.due_ms), t.message_type, t.id);
    }
}

fn print_instance(
    plugin: &str,
    id: &str,
    i: &Instance,
    state: &[(String, Vec<u8>)],
    steps: &[Step],
) {
    println!("saga      {plugin}");
    println!("instance  {id}");
    println!("status    {}", i.status.as_str());
    println!(
        "version   {} (steps), last written by {plugin} {}",
        i.version, i.plugin_version
    );
    println!("started   {}", time(i.started_at_ms));
    println!(
        "updated   {} ({}, {})",
        time(i.updated_at_ms),
        i.last_type,
        ago(i.updated_at_ms)
    );
    println!();
    println!("state");
    if state.is_empty() {
        println!("  (empty)");
    }
    let width = state
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (k, v) in state {
        match serde_json::from_slice::<Value>(v) {
            Ok(j @ (Value::Object(_) | Value::Array(_))) => {
                let pretty = serde_json::to_string_pretty(&j).unwrap_or_else(|_| text(v));
                println!("  {k}:");
                for line in pretty.lines() {
                    println!("    {line}");
                }
            }
            _ => println!("  {k:<width$}  {}", text(v)),
        }
    }
    println!();
    println!("steps");
    for s in steps {
        println!(
            "  {:>3}  {}  {}  message {}",
            s.version(),
            time(s.at_ms),
            s.message_type,
            s.message_id
        );
        for line in s.effects(time, true) {
            println!("         {line}");
        }
    }
}
