//! `switchyard deploy -p PIPELINE` to a fleet (a plugin's build, or the
//! pipeline file with its builds), `switchyard deploy --status`, and
//! `switchyard fleet status | history | rollback`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::config::Pipeline;
use crate::envelope::now_ms;
use crate::fleet::{
    Canary, Change, DeployRecord, Desired, Fleet, HostReport, PIPELINE_FILE, RolloutState,
};
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

    /// Undo the fleet's last deploy of a plugin or of the pipeline file:
    /// every host returns to the version before (a canary still being
    /// watched is ended at once).
    #[command(after_help = "Examples:
  switchyard fleet rollback -p pipelines/shop.toml --plugin payments
  switchyard fleet rollback -p pipelines/shop.toml --pipeline-file --wait 30s

The rollback is recorded in the history as a deploy of the earlier version, by you.
Rolling back the pipeline file returns its text; the plugins' builds stay as they are
(roll them back by name).")]
    #[command(group(clap::ArgGroup::new("what").required(true).args(["plugin", "pipeline_file"])))]
    Rollback {
        /// The pipeline file (with a [fleet] section).
        #[arg(short, long)]
        pipeline: PathBuf,
        /// The plugin whose last deploy is undone.
        #[arg(long)]
        plugin: Option<String>,
        /// Undo the last deploy of the pipeline file.
        #[arg(long)]
        pipeline_file: bool,
        /// Wait until every live host runs the earlier version, up to this
        /// long; exits 1 if they do not.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
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
    dry_run: bool,
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
    // Checked against the pipeline file the fleet runs, if one was
    // deployed to it, else the one at hand.
    let desired = fleet.desired().await?;
    let (deployed, _) = fleet_pipeline(&fleet, &pipeline, &desired).await;
    let info = runtime::check_build(deployed.as_ref().unwrap_or(&pipeline), plugin, file)
        .await
        .with_context(|| format!("{} is refused for plugin `{plugin}`", file.display()))?;
    if dry_run {
        let was = desired
            .get(plugin)
            .and_then(|d| d.fleet_digest().map(|g| short_digest(g).to_owned()));
        println!(
            "would deploy {plugin} {} ({}) to the fleet of pipeline `{}`{}; dry run: nothing recorded",
            info.version,
            short_digest(&crate::plugin::digest_of(&bytes)),
            pipeline.name,
            was.map(|w| format!(", was {w}")).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let by = who();
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
    let digest = record.digest.clone();
    wait_for_hosts(
        &fleet,
        wait,
        |h| h.running.get(plugin).map(|r| r.digest.as_str()) == Some(digest.as_str()),
        |h| {
            h.running
                .get(plugin)
                .map_or("not running it".to_owned(), |r| {
                    format!("runs {} ({})", r.version, short_digest(&r.digest))
                })
        },
    )
    .await
}

/// The kind of transport a pipeline names, as `Transport::kind` says it.
fn transport_kind(pipeline: &Pipeline) -> &'static str {
    match &pipeline.transport {
        crate::config::TransportConfig::Embedded(_) => "embedded",
        crate::config::TransportConfig::Amqp(_) => "amqp",
        crate::config::TransportConfig::Kafka(_) => "kafka",
    }
}

/// Who deploys: the user's name.
fn who() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("someone on {}", crate::dlq::host_name()))
}

/// Waits, up to `wait`, until every live host `runs` what was deployed;
/// exit status 1, naming each host that does not, what it runs
/// (`describe`) and its problem, when they do not.
async fn wait_for_hosts(
    fleet: &Fleet,
    wait: Duration,
    runs: impl Fn(&HostReport) -> bool,
    describe: impl Fn(&HostReport) -> String,
) -> Result<ExitCode> {
    let deadline = Instant::now() + wait;
    loop {
        let hosts = fleet.live_hosts().await?;
        let behind: Vec<&HostReport> = hosts.iter().filter(|h| !runs(h)).collect();
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
                    describe(h),
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

/// Whether `host` runs what deploy `d` of `item` (a plugin, or
/// [`PIPELINE_FILE`]) wants of it.
fn runs_desired(host: &HostReport, item: &str, d: &Desired) -> bool {
    let Some(want) = d.digest_for(&host.host) else {
        return true;
    };
    if item == PIPELINE_FILE {
        host.pipeline.as_deref() == Some(want)
    } else {
        host.running.get(item).map(|r| r.digest.as_str()) == Some(want)
    }
}

/// What `host` runs of `item`, in words.
fn what_it_runs(host: &HostReport, item: &str) -> String {
    if item == PIPELINE_FILE {
        return host
            .pipeline
            .as_deref()
            .map_or("runs its own pipeline file".to_owned(), |d| {
                format!("runs the pipeline file {}", short_digest(d))
            });
    }
    host.running
        .get(item)
        .map_or("does not run it".to_owned(), |r| {
            format!("runs {} ({})", r.version, short_digest(&r.digest))
        })
}

/// The plugins the fleet's hosts are meant to have: those of the pipeline
/// file deployed to the fleet, or else of the file at hand; and that file,
/// if any, as the file at hand would read it.
async fn fleet_pipeline(
    fleet: &Fleet,
    local: &Pipeline,
    desired: &std::collections::BTreeMap<String, Desired>,
) -> (Option<Pipeline>, std::collections::BTreeSet<String>) {
    let deployed = match desired
        .get(PIPELINE_FILE)
        .and_then(|d| d.fleet_digest().map(|g| (g.to_owned(), d.seq)))
    {
        Some((digest, seq)) => fleet.pipeline_for(local, &digest, seq).await.ok(),
        None => None,
    };
    let names = deployed
        .as_ref()
        .unwrap_or(local)
        .plugins
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    (deployed, names)
}

/// Deploys the pipeline file at `path`, with the builds its plugins name,
/// to its fleet; with `wait`, waits until every live host runs it.
pub async fn deploy_pipeline(
    path: &Path,
    wait: Option<Duration>,
    dry_run: bool,
) -> Result<ExitCode> {
    // The text checked is the text recorded.
    let (pipeline, text) = super::load_pipeline_and_text(path)?;
    let text = text.into_bytes();
    let Some(config) = &pipeline.fleet else {
        bail!(
            "{}: the pipeline has no [fleet] section; a host runs its own file (edit it, with [host] watch, or restart the host)",
            path.display()
        );
    };
    // Every plugin loaded and checked against the file, as `validate` does.
    let plugins = runtime::load_plugins(&pipeline)
        .await
        .with_context(|| format!("{} is refused; nothing was deployed", path.display()))?;
    for w in &plugins.warnings {
        eprintln!("{w} ({})", path.display());
    }
    let fleet = Fleet::connect(config, &pipeline.name).await?;
    let desired = fleet.desired().await?;
    let planned = Fleet::seqs(&desired);
    let file_was = desired
        .get(PIPELINE_FILE)
        .and_then(|d| d.fleet_digest().map(|g| (g.to_owned(), d.seq)));
    // The fleet's last file, for the plan.
    let before = match &file_was {
        Some((digest, seq)) => {
            let text = fleet.pipeline_text(digest).await?;
            crate::fleet::parse_as(
                &text,
                &pipeline,
                &format!("the fleet's pipeline file (deploy #{seq})"),
            )
            .ok()
        }
        None => None,
    };
    // What running hosts cannot take is refused here, against the files
    // the live hosts run (or, with none live, the fleet's last); hosts
    // check again against what they run, their own files included.
    let hosts = fleet.live_hosts().await?;
    let mut against: std::collections::BTreeSet<String> =
        hosts.iter().filter_map(|h| h.pipeline.clone()).collect();
    if hosts.is_empty()
        && let Some((digest, _)) = &file_was
    {
        against.insert(digest.clone());
    }
    for digest in &against {
        let Ok(text) = fleet.pipeline_text(digest).await else {
            continue;
        };
        let Ok(running) = crate::fleet::parse_as(&text, &pipeline, "a running host's file") else {
            continue;
        };
        let reasons =
            crate::supervisor::restart_needed(&running, &pipeline, transport_kind(&pipeline));
        if !reasons.is_empty() {
            bail!(
                "{} is refused: the fleet's running hosts cannot take it (compared with the pipeline file {} they run):\n  {}\nThose sections stay each host's own: change them in each host's file and restart it.",
                path.display(),
                short_digest(digest),
                reasons.join("\n  ")
            );
        }
    }

    let digest = crate::plugin::digest_of(&text);
    let file_name = path
        .file_name()
        .map_or("pipeline".into(), |n| n.to_string_lossy().into_owned());
    let mut builds: Vec<(String, Vec<u8>, String)> = Vec::new();
    let mut plan: Vec<String> = Vec::new();
    for (spec, loaded) in pipeline.plugins.iter().zip(&plugins.loaded) {
        let name = spec.name.to_string();
        let bytes = std::fs::read(loaded.path())
            .with_context(|| format!("cannot read {}", loaded.path().display()))?;
        let build = crate::plugin::digest_of(&bytes);
        if build != loaded.digest() {
            bail!(
                "{} changed while it was checked; deploy again",
                loaded.path().display()
            );
        }
        let version = loaded.info().version.clone();
        let was = desired.get(&name).and_then(|d| d.fleet_digest());
        match was {
            Some(w) if w == build => plan.push(format!("  {name} {version}: unchanged")),
            Some(w) => plan.push(format!(
                "  {name} {version} ({}), was {}",
                short_digest(&build),
                short_digest(w)
            )),
            None => plan.push(format!(
                "  {name} {version} ({}): its first build on the fleet",
                short_digest(&build)
            )),
        }
        if was != Some(build.as_str()) {
            builds.push((name, bytes, version));
        }
    }
    if let Some(before) = &before {
        for p in &before.plugins {
            if pipeline.plugin(p.name.as_str()).is_none() {
                plan.push(format!("  {}: leaves the pipeline", p.name));
            }
        }
    }
    let file_changes = file_was.as_ref().map(|(d, _)| d.as_str()) != Some(digest.as_str());
    println!(
        "pipeline file {} ({}){}",
        path.display(),
        short_digest(&digest),
        match &file_was {
            _ if !file_changes => ": unchanged".to_owned(),
            Some((d, seq)) => format!(", was {} (deploy #{seq})", short_digest(d)),
            None => ": the first pipeline file deployed to this fleet".to_owned(),
        }
    );
    for line in &plan {
        println!("{line}");
    }
    let nothing_new = !file_changes && builds.is_empty();
    if dry_run {
        println!("dry run: nothing recorded");
        return Ok(ExitCode::SUCCESS);
    }
    if nothing_new {
        println!("nothing new to record: the fleet was given this file and these builds already");
    }
    let mut changes: Vec<Change<'_>> = builds
        .iter()
        .map(|(plugin, bytes, version)| Change {
            plugin,
            bytes,
            version,
        })
        .collect();
    if file_changes {
        changes.push(Change {
            plugin: PIPELINE_FILE,
            bytes: &text,
            version: &file_name,
        });
    }
    if !nothing_new {
        let records = fleet
            .record_all(&changes, &who(), None, None, Some(&planned))
            .await?;
        let seqs: Vec<String> = records.iter().map(|r| format!("#{}", r.seq)).collect();
        println!(
            "deployed to the fleet of pipeline `{}` (deploy {})",
            pipeline.name,
            seqs.join(", ")
        );
    }
    let Some(wait) = wait else {
        println!(
            "every host of the pipeline takes it within its poll interval; see `switchyard deploy --status -p {}`",
            path.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let desired = fleet.desired().await?;
    let wanted: Vec<(String, Desired)> = desired
        .into_iter()
        .filter(|(item, _)| item == PIPELINE_FILE || pipeline.plugin(item).is_some())
        .collect();
    wait_for_hosts(
        &fleet,
        wait,
        |h| wanted.iter().all(|(item, d)| runs_desired(h, item, d)),
        |h| {
            wanted
                .iter()
                .filter(|(item, d)| !runs_desired(h, item, d))
                .map(|(item, _)| format!("{item}: {}", what_it_runs(h, item)))
                .collect::<Vec<_>>()
                .join(", ")
        },
    )
    .await
}

/// `switchyard deploy --status`: how the fleet's last deploy of each
/// plugin, and of the pipeline file, is rolling out.
pub async fn rollout(path: &Path) -> Result<ExitCode> {
    let (pipeline, fleet) = open(path).await?;
    let mut desired = fleet.desired().await?;
    let (_, plugins) = fleet_pipeline(&fleet, &pipeline, &desired).await;
    desired.retain(|item, _| item == PIPELINE_FILE || plugins.contains(item));
    let hosts = fleet.live_hosts().await?;
    println!(
        "pipeline {}: {} live host(s){}",
        pipeline.name,
        hosts.len(),
        if hosts.is_empty() {
            " (none is running)"
        } else {
            ""
        }
    );
    if desired.is_empty() {
        println!("nothing has been deployed to this fleet: each host runs its own file");
        return Ok(ExitCode::SUCCESS);
    }
    let mut done = !hosts.is_empty();
    for (item, d) in &desired {
        let on = hosts.iter().filter(|h| runs_desired(h, item, d)).count();
        done &= on == hosts.len();
        println!(
            "#{:<5} {item} {} ({}), {}, {}: {on} of {} live host(s) run what it wants",
            d.seq,
            d.version,
            short_digest(&d.digest),
            d.state.as_str(),
            ago(d.at_ms),
            hosts.len()
        );
        print_rollout(d, "       ");
        for h in hosts.iter().filter(|h| !runs_desired(h, item, d)) {
            println!(
                "       {}: {}{}",
                h.host,
                what_it_runs(h, item),
                h.problem
                    .as_deref()
                    .map(|p| format!("; {p}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(if done {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A deploy's canary (hosts, end of watch, what the others run) and its
/// verdict, each on a line of its own after `indent`.
fn print_rollout(d: &Desired, indent: &str) {
    if d.state == RolloutState::Canary {
        println!(
            "{indent}canary on {} until {}; the other hosts run {}",
            d.canary.join(", "),
            d.watch_until_ms
                .map_or("-".to_owned(), crate::transport::cloudevents::rfc3339),
            d.previous.as_deref().map_or("-", short_digest)
        );
    }
    if let Some(v) = &d.verdict {
        println!("{indent}{v}");
    }
}

/// `switchyard fleet rollback`: undoes the last deploy of `item`.
async fn rollback(path: &Path, item: &str, wait: Option<Duration>) -> Result<ExitCode> {
    let (pipeline, fleet) = open(path).await?;
    let mut desired = fleet.desired().await?;
    let planned = Fleet::seqs(&desired);
    let shown = if item == PIPELINE_FILE {
        "the pipeline file"
    } else {
        item
    };
    let Some(d) = desired.remove(item) else {
        bail!(
            "nothing has been deployed to the fleet of `{}` for {shown}",
            pipeline.name
        );
    };
    let by = who();
    let target = match d.state {
        RolloutState::Canary => {
            if !fleet.end_canary(item, d.seq, &by).await? {
                bail!(
                    "the canary (deploy #{}) was decided meanwhile; see `switchyard fleet history`",
                    d.seq
                );
            }
            println!(
                "ended the canary of {shown} (deploy #{}): every host returns to {}",
                d.seq,
                d.previous.as_deref().map_or("-", short_digest)
            );
            d.previous.clone()
        }
        RolloutState::RolledBack => bail!(
            "deploy #{} of {shown} was rolled back already ({}); the fleet runs {}",
            d.seq,
            d.verdict.as_deref().unwrap_or("no verdict"),
            d.previous.as_deref().map_or("-", short_digest)
        ),
        RolloutState::Deployed | RolloutState::Promoted => {
            let Some(previous) = d.previous.clone() else {
                bail!(
                    "{shown} has no earlier version on the fleet to return to: deploy #{} was its first",
                    d.seq
                );
            };
            let bytes = fleet.component(&previous).await?;
            let version = fleet.version_of(&previous).await?;
            if item == PIPELINE_FILE {
                // The earlier file must still be one the hosts can take:
                // it must read, and differ from today's (when that reads)
                // only in what a running host can change.
                let then = fleet
                    .pipeline_for(&pipeline, &previous, 0)
                    .await
                    .with_context(|| {
                        format!(
                            "the earlier pipeline file ({}) cannot be returned to",
                            short_digest(&previous)
                        )
                    })?;
                if let Ok(now) = fleet.pipeline_for(&pipeline, &d.digest, d.seq).await {
                    let reasons =
                        crate::supervisor::restart_needed(&now, &then, transport_kind(&pipeline));
                    if !reasons.is_empty() {
                        bail!(
                            "the earlier pipeline file cannot be returned to by running hosts:\n  {}",
                            reasons.join("\n  ")
                        );
                    }
                }
            }
            let note = format!("rollback of #{}", d.seq);
            let record = fleet
                .record_all(
                    &[Change {
                        plugin: item,
                        bytes: &bytes,
                        version: &version,
                    }],
                    &by,
                    None,
                    Some(&note),
                    Some(&planned),
                )
                .await?
                .pop()
                .ok_or_else(|| anyhow::anyhow!("the rollback was not recorded"))?;
            println!(
                "rolled back {shown} to {version} ({}) (deploy #{}, {note})",
                short_digest(&previous),
                record.seq
            );
            Some(previous)
        }
    };
    let (Some(wait), Some(target)) = (wait, target) else {
        return Ok(ExitCode::SUCCESS);
    };
    wait_for_hosts(
        &fleet,
        wait,
        |h| {
            if item == PIPELINE_FILE {
                h.pipeline.as_deref() == Some(target.as_str())
            } else {
                h.running.get(item).map(|r| r.digest.as_str()) == Some(target.as_str())
            }
        },
        |h| what_it_runs(h, item),
    )
    .await
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
        let hosts = fleet.live_hosts().await?;
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
        FleetCommand::Rollback {
            pipeline,
            plugin,
            pipeline_file: _,
            wait,
        } => rollback(&pipeline, plugin.as_deref().unwrap_or(PIPELINE_FILE), wait).await,
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
    let (_, plugins) = fleet_pipeline(&fleet, &pipeline, &desired).await;
    desired.retain(|item, _| item == PIPELINE_FILE || plugins.contains(item));
    let hosts = fleet.hosts().await?;
    let converged = |h: &HostReport| desired.iter().all(|(item, d)| runs_desired(h, item, d));
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
                    "pipeline_file": h.pipeline,
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
            print_rollout(d, "  ");
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
            if desired.contains_key(PIPELINE_FILE) {
                println!("  {}", what_it_runs(h, PIPELINE_FILE));
            }
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
