//! `switchyard dlq`: look at dead letters, replay them, close them.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::parse_duration;
use crate::dlq::replay::{self, ReplayOptions, Skip};
use crate::dlq::{self, DeadLetter, DeadLetterStore, Filter, Status};
use crate::envelope::now_ms;
use crate::runtime;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest failure first, or count them per cause.
    #[command(after_help = "Examples:
  switchyard dlq list -p pipelines/orders.toml
  switchyard dlq list -p pipelines/orders.toml --group            # counts per cause
  switchyard dlq list -p pipelines/orders.toml --plugin payments --kind transient --since 1h
  switchyard dlq list -p pipelines/orders.toml --status handled --json")]
    List {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        filter: FilterArgs,
        /// Count per fingerprint (cause) instead of listing records.
        #[arg(long)]
        group: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Show one dead letter: the error, every attempt, headers and payload.
    #[command(after_help = "Examples:
  switchyard dlq show -p pipelines/orders.toml 01a222c2-be70   # a unique prefix of the id is enough
  switchyard dlq show -p pipelines/orders.toml 01a222c2-be70 --json")]
    Show {
        #[command(flatten)]
        target: Target,
        /// The record id, or a unique prefix of it.
        id: String,
        #[arg(long)]
        json: bool,
    },

    /// Send dead letters back through their route, to the plugin version
    /// running now.
    #[command(after_help = "Examples:
  switchyard dlq replay -p pipelines/orders.toml 01a222c2-be70
  switchyard dlq replay -p pipelines/orders.toml --group 3f2a9c1b7d4e --dry-run
  switchyard dlq replay -p pipelines/orders.toml --all --plugin payments --rate 200

Replayed messages keep their id, payload and headers, and carry a
switchyard-replay-of header naming their record. A record that fails again gets
the new attempts added. A record replayed max_replays times (the loop guard,
3 by default) is skipped unless --force.")]
    Replay {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        select: Selection,
        #[command(flatten)]
        filter: FilterArgs,
        /// List what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replay records even past the loop guard.
        #[arg(long)]
        force: bool,
        /// Records per batch.
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
        /// At most this many records per second (0.001 or more).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
    },

    /// Send a dead letter's message again with a corrected payload, as a new
    /// message caused by the old one; the record is then resolved.
    #[command(after_help = "Examples:
  switchyard dlq edit -p pipelines/orders.toml 01a222c2-be70                 # opens $VISUAL or $EDITOR
  switchyard dlq edit -p pipelines/orders.toml 01a222c2-be70 --data '{\"order_id\":\"A-1\"}'
  switchyard dlq edit -p pipelines/orders.toml 01a222c2-be70 --file fixed.json

The new message has a new id, the old message's id as its causation id, its
correlation id (or the old message's id), attempt 1, and a
switchyard-edited-from header naming the record; it goes to the record's route.
A JSON message's new payload must be JSON, and it is checked against the
type's schema when the pipeline has one. Only a `dead` record can be edited.")]
    Edit {
        #[command(flatten)]
        target: Target,
        /// The record id, or a unique prefix of it.
        id: String,
        /// The new payload, as given.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        /// Read the new payload from this file (`-` for stdin).
        #[arg(long)]
        file: Option<PathBuf>,
    },

    /// Close dead letters without replaying them (kept for audit).
    #[command(after_help = "Examples:
  switchyard dlq resolve -p pipelines/orders.toml 01a222c2-be70 --note \"refunded by hand\"
  switchyard dlq resolve -p pipelines/orders.toml --group 3f2a9c1b7d4e")]
    Resolve {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        select: Selection,
        #[command(flatten)]
        filter: FilterArgs,
        /// Why, kept with the record.
        #[arg(long)]
        note: Option<String>,
    },

    /// Remove dead letters for good.
    #[command(after_help = "Examples:
  switchyard dlq delete -p pipelines/orders.toml 01a222c2-be70
  switchyard dlq delete -p pipelines/orders.toml --all --status handled --status resolved")]
    Delete {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        select: Selection,
        #[command(flatten)]
        filter: FilterArgs,
    },

    /// Write dead letters as JSON lines (one full record per line), for audits.
    #[command(after_help = "Examples:
  switchyard dlq export -p pipelines/orders.toml > dead-letters.jsonl
  switchyard dlq export -p pipelines/orders.toml --since 24h --output today.jsonl")]
    Export {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        filter: FilterArgs,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// The pipeline whose dead-letter store to use.
#[derive(Debug, Args)]
pub struct Target {
    /// The pipeline TOML file.
    #[arg(short, long, env = "SWITCHYARD_PIPELINE")]
    pub pipeline: PathBuf,
}

/// Which records to act on: ids, a group, or everything the filter matches.
#[derive(Debug, Args)]
pub struct Selection {
    /// Record ids (or unique prefixes).
    pub ids: Vec<String>,
    /// Every record with this fingerprint (see `dlq list --group`).
    #[arg(long, value_name = "FINGERPRINT")]
    pub group: Option<String>,
    /// Every record the filter options match.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only records of this plugin (route).
    #[arg(long)]
    pub plugin: Option<String>,
    /// Only records of this message type.
    #[arg(long = "type", value_name = "TYPE")]
    pub message_type: Option<String>,
    /// Only records of this error kind (transient, permanent, trap, timeout,
    /// out-of-memory, contract-violation, malformed).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only records in this status (dead, replaying, replayed, handled,
    /// resolved). Repeatable.
    #[arg(long)]
    pub status: Vec<String>,
    /// Only records that last failed after this: a duration ago (`1h`) or a
    /// time (`2026-11-28T15:00:00Z`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records that last failed before this.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<u64>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.001 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a rate of at least 0.001 records per second"
        )),
    }
}

fn parse_time(s: &str) -> Result<u64> {
    if let Ok(d) = parse_duration(s) {
        return Ok(now_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow::anyhow!(
            "`{s}` is neither a duration (like 1h) nor a time (like 2026-11-28T15:00:00Z)"
        )
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    Ok(u64::try_from(ms).unwrap_or(u64::MAX))
}

impl FilterArgs {
    /// The store filter these options ask for; an error names the option at fault.
    pub fn to_filter(&self) -> Result<Filter> {
        let mut statuses = Vec::new();
        for s in &self.status {
            statuses.push(Status::parse(s).with_context(|| {
                format!("unknown status `{s}`; use dead, replaying, replayed, handled or resolved")
            })?);
        }
        if let Some(k) = &self.kind
            && crate::recover::FailureKind::parse(k).is_none()
        {
            bail!(
                "unknown error kind `{k}`; use transient, permanent, trap, timeout, out-of-memory, contract-violation or malformed"
            );
        }
        Ok(Filter {
            route: self.plugin.clone(),
            message_type: self.message_type.clone(),
            error_kind: self.kind.clone(),
            statuses,
            since_ms: self.since.as_deref().map(parse_time).transpose()?,
            until_ms: self.until.as_deref().map(parse_time).transpose()?,
            limit: self.limit,
            ..Filter::default()
        })
    }
}

async fn open(
    target: &Target,
) -> Result<(crate::config::Pipeline, std::sync::Arc<dyn DeadLetterStore>)> {
    let pipeline = super::load_pipeline(&target.pipeline)?;
    let store = dlq::open(&pipeline.dead_letters, &pipeline.name)
        .await
        .with_context(|| format!("cannot open the {}", dlq::describe(&pipeline.dead_letters)))?;
    Ok((pipeline, store))
}

/// The records a selection names.
async fn select(
    store: &dyn DeadLetterStore,
    select: &Selection,
    filter: &FilterArgs,
) -> Result<Filter> {
    let mut f = filter.to_filter()?;
    let chosen = usize::from(!select.ids.is_empty())
        + usize::from(select.group.is_some())
        + usize::from(select.all);
    if chosen != 1 {
        bail!("name the records: give ids, or --group FINGERPRINT, or --all (with filter options)");
    }
    if !select.ids.is_empty() {
        for id in &select.ids {
            match store.get(id).await? {
                Some(d) => f.ids.push(d.id),
                None => bail!("no dead letter with id `{id}`"),
            }
        }
    }
    f.fingerprint = select.group.clone();
    Ok(f)
}

pub(crate) fn time(ms: u64) -> String {
    // Times past the year 9999 cannot be written as RFC 3339: show the
    // number rather than fail.
    let mut out = String::new();
    match std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms)) {
        Some(t) if write!(out, "{}", humantime::format_rfc3339_seconds(t)).is_ok() => out,
        _ => format!("{ms} ms"),
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

pub async fn run(command: DlqCommand) -> Result<ExitCode> {
    match command {
        DlqCommand::List {
            target,
            filter,
            group,
            json,
        } => list(&target, &filter, group, json).await,
        DlqCommand::Show { target, id, json } => show(&target, &id, json).await,
        DlqCommand::Replay {
            target,
            select: selection,
            filter,
            dry_run,
            force,
            batch_size,
            rate,
        } => {
            let (pipeline, store) = open(&target).await?;
            let f = select(store.as_ref(), &selection, &filter).await?;
            let records = replay::candidates(store.as_ref(), &f).await?;
            let transport = runtime::open(&pipeline).await?;
            let options = ReplayOptions {
                dry_run,
                force,
                max_replays: pipeline.dead_letters.max_replays,
                batch_size,
                rate,
                routes: pipeline
                    .plugins
                    .iter()
                    .map(|p| p.name.to_string())
                    .collect(),
                claim_lease: replay::CLAIM_LEASE,
            };
            let total = records.len();
            let bar = progress_bar(total, dry_run);
            let report = replay::replay(
                store.as_ref(),
                transport.as_ref(),
                records,
                &options,
                |done, total| match &bar {
                    Some(b) => b.set_position(done as u64),
                    None => eprintln!("replay: {done}/{total}"),
                },
            )
            .await;
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let report = report?;
            print_replay(&report, dry_run);
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Edit {
            target,
            id,
            data,
            file,
        } => edit(&target, &id, data, file).await,
        DlqCommand::Resolve {
            target,
            select: selection,
            filter,
            note,
        } => {
            let (_, store) = open(&target).await?;
            let f = select(store.as_ref(), &selection, &filter).await?;
            let ids: Vec<String> = store.list(&f).await?.into_iter().map(|d| d.id).collect();
            let n = store.resolve(&ids, note.as_deref()).await?;
            eprintln!("resolved {n} dead letter{}", if n == 1 { "" } else { "s" });
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Delete {
            target,
            select: selection,
            filter,
        } => {
            let (_, store) = open(&target).await?;
            let f = select(store.as_ref(), &selection, &filter).await?;
            let ids: Vec<String> = store.list(&f).await?.into_iter().map(|d| d.id).collect();
            let n = store.delete(&ids).await?;
            eprintln!("deleted {n} dead letter{}", if n == 1 { "" } else { "s" });
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Export {
            target,
            filter,
            output,
        } => {
            let (_, store) = open(&target).await?;
            let records = store.list(&filter.to_filter()?).await?;
            let mut out: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            for d in &records {
                writeln!(out, "{}", serde_json::to_string(&record_json(d))?)?;
            }
            out.flush()?;
            if let Some(path) = output {
                eprintln!(
                    "exported {} dead letters to {}",
                    records.len(),
                    path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn edit(
    target: &Target,
    id: &str,
    data: Option<String>,
    file: Option<PathBuf>,
) -> Result<ExitCode> {
    let (pipeline, store) = open(target).await?;
    let Some(record) = store.get(id).await? else {
        bail!("no dead letter with id `{id}`");
    };
    if record.status != Status::Dead {
        bail!(
            "dead letter {} is `{}`: only a `dead` record can be edited and sent again",
            record.id,
            record.status
        );
    }
    let payload = match (data, file) {
        (Some(d), _) => d.into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
                .context("cannot read the new payload from stdin")?;
            buf
        }
        (None, Some(path)) => std::fs::read(&path)
            .with_context(|| format!("cannot read the new payload from {}", path.display()))?,
        (None, None) => match in_editor(&record)? {
            Some(p) => p,
            None => {
                eprintln!("the payload was not changed: nothing sent");
                return Ok(ExitCode::FAILURE);
            }
        },
    };
    let schemas = crate::schemas::Schemas::load(&pipeline)?;
    let transport = runtime::open(&pipeline).await?;
    let routes: Vec<String> = pipeline
        .plugins
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    let new_id = replay::edit(
        store.as_ref(),
        transport.as_ref(),
        &schemas,
        &record,
        payload,
        &routes,
    )
    .await?;
    println!("{new_id}");
    eprintln!(
        "sent {} {new_id} to route {} in place of dead letter {}, which is resolved",
        record.message.message_type, record.route, record.id
    );
    Ok(ExitCode::SUCCESS)
}

/// The payload after the user's editor (`$VISUAL`, `$EDITOR`, or `vi`)
/// changed it, or `None` if it came back the same.
fn in_editor(record: &DeadLetter) -> Result<Option<Vec<u8>>> {
    if !std::io::stdin().is_terminal() {
        bail!("give the new payload with --data or --file (there is no terminal to edit it in)");
    }
    // The payload as it is, byte for byte: pretty-printing it would
    // reorder keys and rewrite numbers the user never touched.
    if std::str::from_utf8(&record.message.payload).is_err() {
        bail!(
            "message {} is not text: give the new payload with --data or --file",
            record.message.id
        );
    }
    let original = record.message.payload.clone();
    let suffix = if record.message.content_type.contains("json") {
        ".json"
    } else {
        ".txt"
    };
    let mut tmp = tempfile::Builder::new()
        .prefix("switchyard-edit-")
        .suffix(suffix)
        .tempfile()
        .context("cannot create a file to edit the payload in")?;
    tmp.write_all(&original)?;
    tmp.flush()?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".to_owned());
    // The editor may be a command with arguments (`code --wait`).
    let mut words = editor.split_whitespace();
    let program = words.next().unwrap_or("vi");
    let status = std::process::Command::new(program)
        .args(words)
        .arg(tmp.path())
        .status()
        .with_context(|| format!("cannot start the editor `{editor}`"))?;
    if !status.success() {
        bail!("the editor `{editor}` failed ({status}): nothing sent");
    }
    let edited = std::fs::read(tmp.path()).context("cannot read the edited payload back")?;
    Ok((edited != original).then_some(edited))
}

fn progress_bar(total: usize, dry_run: bool) -> Option<indicatif::ProgressBar> {
    if dry_run || total < 2 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "replay {bar:40} {pos}/{len} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

fn print_replay(report: &replay::ReplayReport, dry_run: bool) {
    let verb = if dry_run { "would replay" } else { "replayed" };
    if dry_run {
        for d in &report.replayed {
            println!(
                "{}  {}  {}  {}",
                d.id,
                d.route,
                d.message.message_type,
                one_line(&d.error.message, 80)
            );
        }
    }
    eprintln!(
        "{verb} {} dead letter{}",
        report.replayed.len(),
        if report.replayed.len() == 1 { "" } else { "s" }
    );
    if report.resumed > 0 {
        eprintln!(
            "  {} of them were left mid-replay by an interrupted replay: their messages may be delivered twice",
            report.resumed
        );
    }
    let guarded: Vec<_> = report
        .skipped
        .iter()
        .filter_map(|(d, s)| match s {
            Skip::LoopGuard { replays } => Some((d, replays)),
            Skip::UnknownRoute => None,
        })
        .collect();
    if !guarded.is_empty() {
        eprintln!(
            "skipped {} by the loop guard (replayed too often and still failing; --force to replay anyway):",
            guarded.len()
        );
        for (d, n) in guarded {
            eprintln!(
                "  {}  replayed {n} times  {}",
                d.id,
                one_line(&d.error.message, 80)
            );
        }
    }
    let unknown: Vec<_> = report
        .skipped
        .iter()
        .filter(|(_, s)| *s == Skip::UnknownRoute)
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "skipped {} whose route is not in this pipeline:",
            unknown.len()
        );
        for (d, _) in unknown {
            eprintln!("  {}  route {}", d.id, d.route);
        }
    }
}

async fn list(
    target: &Target,
    filter: &FilterArgs,
    group: bool,
    as_json: bool,
) -> Result<ExitCode> {
    let (_, store) = open(target).await?;
    let f = filter.to_filter()?;
    let mut out = std::io::stdout().lock();
    if group {
        let groups = store.groups(&f).await?;
        if as_json {
            for g in &groups {
                writeln!(out, "{}", serde_json::to_string(g)?)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        if groups.is_empty() {
            eprintln!("no dead letters");
            return Ok(ExitCode::SUCCESS);
        }
        writeln!(
            out,
            "{:<12}  {:>5}  {:<20}  {:<14}  {:<20}  CAUSE",
            "FINGERPRINT", "COUNT", "LAST FAILED", "PLUGIN", "KIND"
        )?;
        for g in groups {
            writeln!(
                out,
                "{:<12}  {:>5}  {:<20}  {:<14}  {:<20}  {}",
                g.fingerprint,
                g.count,
                time(g.last_failed_at_ms),
                one_line(&g.route, 14),
                g.error_kind,
                one_line(&g.cause, 100)
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let records = store.list(&f).await?;
    if as_json {
        for d in &records {
            writeln!(out, "{}", serde_json::to_string(&summary_json(d))?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        eprintln!("no dead letters");
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<36}  {:<20}  {:<14}  {:<16}  {:<18}  {:>5}  {:<9}  ERROR",
        "ID", "LAST FAILED", "PLUGIN", "TYPE", "KIND", "TRIES", "STATUS"
    )?;
    for d in &records {
        writeln!(
            out,
            "{:<36}  {:<20}  {:<14}  {:<16}  {:<18}  {:>5}  {:<9}  {}",
            d.id,
            time(d.last_failed_at_ms),
            one_line(&d.route, 14),
            one_line(&d.message.message_type, 16),
            d.error.kind,
            d.attempts.len(),
            d.status.as_str(),
            one_line(&d.error.message, 80)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn summary_json(d: &DeadLetter) -> serde_json::Value {
    json!({
        "id": d.id,
        "route": d.route,
        "message_id": d.message.id,
        "message_type": d.message.message_type,
        "error_kind": d.error.kind,
        "error": d.error.message,
        "attempts": d.attempts.len(),
        "status": d.status.as_str(),
        "replay_count": d.replay_count,
        "fingerprint": d.fingerprint,
        "first_failed_at_ms": d.first_failed_at_ms,
        "last_failed_at_ms": d.last_failed_at_ms,
    })
}

/// The whole record as JSON; the payload as JSON when it is, else base16.
pub fn record_json(d: &DeadLetter) -> serde_json::Value {
    let m = &d.message;
    let payload = match serde_json::from_slice::<serde_json::Value>(&m.payload) {
        Ok(v) => json!({ "json": v }),
        Err(_) => match std::str::from_utf8(&m.payload) {
            Ok(text) => json!({ "text": text }),
            Err(_) => json!({ "hex": hex::encode(&m.payload) }),
        },
    };
    json!({
        "id": d.id,
        "pipeline": d.pipeline,
        "route": d.route,
        "plugin_version": d.plugin_version,
        "plugin_digest": d.plugin_digest,
        "message": {
            "id": m.id,
            "type": m.message_type,
            "kind": m.kind.as_str(),
            "content_type": m.content_type,
            "headers": m.headers,
            "correlation_id": m.correlation_id,
            "causation_id": m.causation_id,
            "reply_to": m.reply_to,
            "partition_key": m.partition_key,
            "created_at_ms": m.created_at_ms,
            "payload": payload,
        },
        "error": d.error,
        "attempts": d.attempts,
        "first_failed_at_ms": d.first_failed_at_ms,
        "last_failed_at_ms": d.last_failed_at_ms,
        "source": d.source,
        "trace_id": d.trace_id,
        "span_id": d.span_id,
        "host": d.host,
        "fingerprint": d.fingerprint,
        "cause": d.cause,
        "status": d.status.as_str(),
        "replay_count": d.replay_count,
        "replayed_at_ms": d.replayed_at_ms,
        "resolved_at_ms": d.resolved_at_ms,
        "note": d.note,
    })
}

async fn show(target: &Target, id: &str, as_json: bool) -> Result<ExitCode> {
    let (_, store) = open(target).await?;
    let Some(d) = store.get(id).await? else {
        bail!("no dead letter with id `{id}`");
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&record_json(&d))?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    show_summary(&mut out, &d);
    show_error(&mut out, &d);
    show_attempts(&mut out, &d);
    show_extras(&mut out, &d);
    show_payload(&mut out, &d);
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// What failed, where it came from and when.
fn show_summary(out: &mut String, d: &DeadLetter) {
    let m = &d.message;
    let _ = writeln!(
        out,
        "dead letter {}  ({}, replayed {} times)",
        d.id, d.status, d.replay_count
    );
    let _ = writeln!(
        out,
        "  plugin     {} {} ({}), pipeline {}",
        d.route, d.plugin_version, d.plugin_digest, d.pipeline
    );
    let _ = writeln!(
        out,
        "  message    {} {} id {}",
        m.kind, m.message_type, m.id
    );
    if let Some(c) = &m.correlation_id {
        let _ = writeln!(out, "  correlation {c}");
    }
    if let Some(c) = &m.causation_id {
        let _ = writeln!(out, "  caused by  {c}");
    }
    let _ = writeln!(
        out,
        "  source     {} {} {} {}{}{}",
        d.source.transport,
        d.source.location,
        if d.source.partition.is_some() {
            "topic"
        } else {
            "queue"
        },
        d.source.queue,
        match (d.source.partition, d.source.offset) {
            (Some(p), Some(o)) => format!(" partition {p} offset {o}"),
            _ => String::new(),
        },
        d.source
            .consumer_group
            .as_ref()
            .map(|g| format!(" group {g}"))
            .unwrap_or_default(),
    );
    let _ = writeln!(out, "  host       {}", d.host);
    let _ = writeln!(
        out,
        "  failed     first {}, last {} ({} attempt{})",
        time(d.first_failed_at_ms),
        time(d.last_failed_at_ms),
        d.attempts.len(),
        if d.attempts.len() == 1 { "" } else { "s" }
    );
}

/// The error, its cause and trace, and the operator's note.
fn show_error(out: &mut String, d: &DeadLetter) {
    let code = d
        .error
        .code
        .as_deref()
        .map(|c| format!(" [{c}]"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  error      {}{code}: {}",
        d.error.kind, d.error.message
    );
    for (k, v) in &d.error.details {
        let _ = writeln!(out, "             {k} = {v}");
    }
    let _ = writeln!(
        out,
        "  cause      {} (fingerprint {})",
        d.cause, d.fingerprint
    );
    let _ = writeln!(
        out,
        "  trace      {}",
        match (&d.trace_id, &d.span_id) {
            (Some(t), Some(s)) => format!("{t} span {s}"),
            (Some(t), None) => t.clone(),
            _ => "-".into(),
        }
    );
    if let Some(note) = &d.note {
        let _ = writeln!(out, "  note       {note}");
    }
}

/// One line per attempt.
fn show_attempts(out: &mut String, d: &DeadLetter) {
    let _ = writeln!(out, "\nattempts");
    for a in &d.attempts {
        let _ = writeln!(
            out,
            "  #{:<3} {}  {:>9}  {:<18}  {} → {}  ({})",
            a.number,
            time(a.started_at_ms),
            format!("{:.1}ms", a.duration_us as f64 / 1000.0),
            a.error_kind,
            one_line(&a.error, 100),
            a.then,
            a.plugin
        );
    }
}

/// The wasm backtrace, what the plugin wrote, the message's headers.
fn show_extras(out: &mut String, d: &DeadLetter) {
    let m = &d.message;
    if let Some(bt) = &d.error.backtrace {
        let _ = writeln!(out, "\nwasm backtrace");
        for line in bt.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if let Some(output) = &d.error.output {
        let _ = writeln!(out, "\nplugin output (end)");
        for line in output.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !m.headers.is_empty() {
        let _ = writeln!(out, "\nheaders");
        for (k, v) in &m.headers {
            let _ = writeln!(out, "  {k}: {v}");
        }
    }
}

/// The payload: pretty JSON, text, or the first bytes in hex.
fn show_payload(out: &mut String, d: &DeadLetter) {
    let m = &d.message;
    let _ = writeln!(
        out,
        "\npayload ({}, {} bytes)",
        m.content_type,
        m.payload.len()
    );
    match serde_json::from_slice::<serde_json::Value>(&m.payload) {
        Ok(v) => {
            for line in serde_json::to_string_pretty(&v).unwrap_or_default().lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        Err(_) => match std::str::from_utf8(&m.payload) {
            Ok(text) => {
                for line in text.lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Err(_) => {
                let _ = writeln!(
                    out,
                    "  (binary) {}",
                    hex::encode(&m.payload[..m.payload.len().min(256)])
                );
            }
        },
    }
}
