//! `switchyard state`: what plugins keep in their state, read from the
//! pipeline's store (the embedded transport's file, or `[state]`'s store).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::config::{self, TransportConfig};
use crate::state::Reader;

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// List a plugin's state keys and values, in key order.
    #[command(after_help = "Examples:
  switchyard state list -p pipelines/orders.toml fraud
  switchyard state list -p pipelines/orders.toml fraud --prefix orders: --json

Values that are JSON print as JSON; others as text, or as a byte count.")]
    List {
        /// The pipeline TOML file.
        #[arg(short, long, env = "SWITCHYARD_PIPELINE")]
        pipeline: PathBuf,
        /// The plugin, as named in the pipeline.
        plugin: String,
        /// Only keys that start with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many keys.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Print the value of one state key.
    #[command(after_help = "Examples:
  switchyard state get -p pipelines/orders.toml fraud orders:ada

Exits with status 1 when the key is not set.")]
    Get {
        /// The pipeline TOML file.
        #[arg(short, long, env = "SWITCHYARD_PIPELINE")]
        pipeline: PathBuf,
        /// The plugin, as named in the pipeline.
        plugin: String,
        /// The key.
        key: String,
    },
}

pub async fn run(command: StateCommand) -> Result<ExitCode> {
    match command {
        StateCommand::List {
            pipeline,
            plugin,
            prefix,
            limit,
            json,
        } => {
            let (reader, plugin) = open(&pipeline, &plugin).await?;
            let entries = tokio::task::spawn_blocking(move || -> Result<Vec<(String, Vec<u8>)>> {
                let mut entries = Vec::new();
                let mut after: Option<String> = None;
                while entries.len() < limit {
                    let page = crate::state::MAX_LIST.min(limit - entries.len());
                    let keys = reader.keys(&plugin, &prefix, after.as_deref(), page)?;
                    let done = keys.len() < page;
                    for key in keys {
                        after = Some(key.clone());
                        // A key deleted since it was listed is passed over.
                        if let Some(value) = reader.get(&plugin, &key)? {
                            entries.push((key, value));
                        }
                    }
                    if done {
                        break;
                    }
                }
                Ok(entries)
            })
            .await
            .context("the state task failed")??;
            if json {
                let list: Vec<Value> = entries
                    .iter()
                    .map(|(k, v)| json!({ "key": k, "value": shown(v) }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if entries.is_empty() {
                println!("no keys");
            } else {
                let width = entries
                    .iter()
                    .map(|(k, _)| k.chars().count())
                    .max()
                    .unwrap_or(0);
                for (k, v) in &entries {
                    println!("{k:<width$}  {}", text(v));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        StateCommand::Get {
            pipeline,
            plugin,
            key,
        } => {
            let (reader, plugin) = open(&pipeline, &plugin).await?;
            let shown_key = key.clone();
            let value = tokio::task::spawn_blocking(move || reader.get(&plugin, &key))
                .await
                .context("the state task failed")??;
            match value {
                Some(v) => {
                    println!("{}", text(&v));
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("no key {shown_key:?}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

/// The pipeline's state, and the plugin's name checked against it.
async fn open(path: &Path, plugin: &str) -> Result<(Arc<dyn Reader>, String)> {
    let (reader, pipeline) = open_store(path).await?;
    check_plugin(path, &pipeline, plugin)?;
    Ok((reader, plugin.to_owned()))
}

/// Fails unless `pipeline` has the plugin `plugin`.
pub(super) fn check_plugin(path: &Path, pipeline: &config::Pipeline, plugin: &str) -> Result<()> {
    if !pipeline.plugins.iter().any(|p| p.name.as_str() == plugin) {
        bail!(
            "{} has no plugin {plugin:?} (it has {})",
            path.display(),
            pipeline
                .plugins
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The state store of the pipeline in `path` (the embedded transport's
/// file, or `[state]`'s store), and the pipeline.
pub(super) async fn open_store(path: &Path) -> Result<(Arc<dyn Reader>, config::Pipeline)> {
    let (reader, pipeline, _) = open_store_at(path).await?;
    Ok((reader, pipeline))
}

/// [`open_store`], and where the store is, without secrets.
pub(super) async fn open_store_at(
    path: &Path,
) -> Result<(Arc<dyn Reader>, config::Pipeline, String)> {
    let pipeline = config::load(path)?.pipeline;
    let (reader, location): (Arc<dyn Reader>, String) = match &pipeline.transport {
        TransportConfig::Embedded(e) => {
            if !e.path.exists() {
                bail!(
                    "the store {} does not exist yet: the pipeline has not run",
                    e.path.display()
                );
            }
            (
                crate::state::sqlite::SqliteState::reader(&e.path),
                e.path.display().to_string(),
            )
        }
        _ => {
            if let config::StoreConfig::Embedded { path } = &pipeline.state.store
                && !path.exists()
            {
                bail!(
                    "the state store {} does not exist yet: no plugin of the pipeline has kept state",
                    path.display()
                );
            }
            let store = crate::state::open(&pipeline.state, &pipeline.name)
                .await
                .context("cannot open the state store ([state])")?;
            let location = store.location();
            (store, location)
        }
    };
    Ok((reader, pipeline, location))
}

/// A value as JSON when it is JSON, else as a string or a byte count.
pub(super) fn shown(v: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(v) {
        Ok(j) => j,
        Err(_) => match std::str::from_utf8(v) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::String(format!("<{} bytes of binary>", v.len())),
        },
    }
}

/// A value on one line: compact JSON, text, or a byte count.
pub(super) fn text(v: &[u8]) -> String {
    let line = match serde_json::from_slice::<Value>(v) {
        Ok(j) => j.to_string(),
        Err(_) => match std::str::from_utf8(v) {
            Ok(s) => s.to_owned(),
            Err(_) => format!("<{} bytes of binary>", v.len()),
        },
    };
    crate::text::clip(&line, 2000)
}
