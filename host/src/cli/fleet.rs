//! `switchyard deploy -p PIPELINE` to a fleet, and `switchyard fleet
//! status | history`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::config::Pipeline;
use crate::envelope::now_ms;
use crate::fleet::{Canary, DeployRecord, Fleet, HostReport, RolloutState};
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
    canary: Option<Canary>,
) -> Result<ExitCode> {
    if let Some(c) = &canary
        && (c.hosts == 0 || !(0.0..=1.0).contains(&c.margin))
    {
        bail!(
            "--canary takes at least 1 host, and --margin a share from 0 to 1 (0.05: five points)"
        );
    }
    let (pipeline, fleet) = open(pipeline_path).await?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let info = runtime::check_build(&pipeline, plugin, file)
        .await
        .with_context(|| format!("{} is refused for plugin `{plugin}`", file.display()))?;
    let by = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("someone on {}", crate::dlq::host_name()));
    let record = fleet
        .record(plugin, &bytes, &info.version, &by, canary.as_ref())
        .await?;
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
    if let Some(c) = &canary {
        println!(
            "canary on {} for {}: the fleet rolls it back if its failure rate is more than {:.1} points above the other hosts'",
            record.canary.join(", "),
            humantime::format_duration(c.watch),
            c.margin * 100.0
        );
        return watch_canary(&fleet, plugin, &record, c, wait).await;
    }
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
        if behind.is_empty() && !hosts.is_empty() {
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
            if hosts.is_empty() {
                println!("  no host of the pipeline is running");
            }
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

/// Waits for a canary's verdict (the hosts judge it) and for the fleet to
/// take it; exit status 0 when promoted, 1 when rolled back.
async fn watch_canary(
    fleet: &Fleet,
    plugin: &str,
    record: &DeployRecord,
    canary: &Canary,
    wait: Option<Duration>,
) -> Result<ExitCode> {
    // The hosts judge at each poll; a while past the window is enough.
    let deadline = Instant::now() + canary.watch + Duration::from_secs(60);
    let mut said = Instant::now();
    let decided = loop {
        let d = fleet.desired().await?.remove(plugin);
        match d {
            Some(d) if d.seq == record.seq && d.state != RolloutState::Canary => break d,
            Some(d) if d.seq != record.seq => bail!(
                "deploy #{} was followed by #{} before its verdict",
                record.seq,
                d.seq
            ),
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!(
                "no host judged the canary (deploy #{}) in time: are the hosts running?",
                record.seq
            );
        }
        if said.elapsed() >= Duration::from_secs(5) {
            said = Instant::now();
            let hosts = fleet.hosts().await?;
            let counts: Vec<String> = hosts
                .iter()
                .filter(|h| record.canary.contains(&h.host))
                .filter_map(|h| {
                    h.running
                        .get(plugin)
                        .map(|r| format!("{}: {} handled, {} failed", h.host, r.handled, r.failed))
                })
                .collect();
            println!("watching: {}", counts.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let verdict = decided.verdict.clone().unwrap_or_default();
    println!("{verdict}");
    // Every live host now runs what the verdict says.
    let target = decided.digest_for("").map(str::to_owned);
    let until = Instant::now() + wait.unwrap_or(Duration::from_secs(30));
    loop {
        let hosts = live(fleet.hosts().await?);
        let behind = hosts
            .iter()
            .filter(|h| h.running.get(plugin).map(|r| &r.digest) != target.as_ref())
            .count();
        if behind == 0 {
            println!(
                "{} live host(s) run {}",
                hosts.len(),
                target.as_deref().map_or("-", short_digest)
            );
            break;
        }
        if Instant::now() >= until {
            println!("{behind} of {} live host(s) do not run it yet", hosts.len());
            // Asked to wait for the fleet, which did not follow in time.
            if wait.is_some() {
                return Ok(ExitCode::FAILURE);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(if decided.state == RolloutState::RolledBack {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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
                    "#{:<5} {:<16} {:<10} {}  {}  {}  by {}, {}",
                    d.seq,
                    d.plugin,
                    d.version,
                    short_digest(&d.digest),
                    d.previous
                        .as_deref()
                        .map_or("(first)".to_owned(), |p| format!("was {}", short_digest(p))),
                    d.state.as_str(),
                    d.by,
                    crate::transport::cloudevents::rfc3339(d.at_ms)
                );
                if !d.canary.is_empty() {
                    println!("       canary on {}", d.canary.join(", "));
                }
                if let Some(v) = &d.verdict {
                    println!("       {v}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let (pipeline, fleet) = open(path).await?;
    // Deploys of plugins the pipeline no longer has do not count.
    let mut desired = fleet.desired().await?;
    desired.retain(|plugin, _| pipeline.plugin(plugin).is_some());
    let hosts = fleet.hosts().await?;
    let converged = |h: &HostReport| {
        desired.iter().all(|(plugin, d)| {
            d.digest_for(&h.host)
                .is_none_or(|want| h.running.get(plugin).map(|r| r.digest.as_str()) == Some(want))
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
                    "settled_at_ms": h.settled_at_ms,
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
                "desired: {plugin} {} ({}), deploy #{} {}, {}",
                d.version,
                short_digest(&d.digest),
                d.seq,
                ago(d.at_ms),
                d.state.as_str()
            );
            if d.state == RolloutState::Canary {
                println!(
                    "  canary on {} until {}; the other hosts run {}",
                    d.canary.join(", "),
                    d.watch_until_ms
                        .map_or("-".to_owned(), crate::transport::cloudevents::rfc3339),
                    d.previous.as_deref().map_or("-", short_digest)
                );
            }
            if let Some(v) = &d.verdict {
                println!("  {v}");
            }
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
                .map(|(p, r)| {
                    format!(
                        "{p} {} ({}; {} handled, {} failed)",
                        r.version,
                        short_digest(&r.digest),
                        r.handled,
                        r.failed
                    )
                })
                .collect();
            println!(
                "host {}: {state}, seen {}, up since {}, {}",
                h.host,
                ago(h.seen_at_ms),
                crate::transport::cloudevents::rfc3339(h.started_at_ms),
                h.settled_at_ms
                    .map_or("has settled nothing yet".to_owned(), |t| format!(
                        "last settled a message {}",
                        ago(t)
                    ))
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
