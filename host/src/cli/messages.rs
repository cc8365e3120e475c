//! `switchyard send` and `switchyard publish`: put messages into a
//! pipeline's store, running host or not.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};

use super::MessageArgs;
use crate::config::{MessageType, Pipeline};
use crate::envelope::{Envelope, Kind};
use crate::runtime;

/// Messages written per transaction when sending many.
const CHUNK: usize = 1_000;

fn read_source(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read stdin")?;
        Ok(buf)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

/// The payloads to send, each checked as JSON when the content type says so.
fn payloads(args: &MessageArgs) -> Result<Vec<Vec<u8>>> {
    let json = args.content_type.split(';').next().is_some_and(|m| {
        let m = m.trim();
        m == "application/json" || m.ends_with("+json")
    });
    let check = |bytes: &[u8], what: &str| -> Result<()> {
        if json && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            bail!("{what} is not valid JSON: {e} (pass --content-type to send something else)");
        }
        Ok(())
    };
    if let Some(data) = &args.data {
        check(data.as_bytes(), "--data")?;
        return Ok(vec![data.clone().into_bytes()]);
    }
    if let Some(path) = &args.data_file {
        let bytes = read_source(path)?;
        check(&bytes, &path.display().to_string())?;
        return Ok(vec![bytes]);
    }
    if let Some(path) = &args.lines {
        let reader: Box<dyn BufRead> = if path == Path::new("-") {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            ))
        };
        let mut out = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line =
                line.with_context(|| format!("cannot read line {} of {}", i + 1, path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            check(
                line.as_bytes(),
                &format!("line {} of {}", i + 1, path.display()),
            )?;
            out.push(line.into_bytes());
        }
        if out.is_empty() {
            bail!("{} has no non-empty lines", path.display());
        }
        return Ok(out);
    }
    bail!("give the payload with --data, --data-file or --lines")
}

fn headers(args: &MessageArgs) -> Result<Vec<(String, String)>> {
    args.headers
        .iter()
        .map(|h| match h.split_once('=') {
            Some((n, v)) if !n.trim().is_empty() => Ok((n.trim().to_owned(), v.to_owned())),
            _ => bail!("header `{h}` must look like NAME=VALUE"),
        })
        .collect()
}

pub async fn send(args: MessageArgs, kind: Kind) -> Result<ExitCode> {
    let pipeline = super::load_pipeline(&args.pipeline)?;
    let t = MessageType::try_from(args.message_type.as_str()).map_err(anyhow::Error::msg)?;
    check_kind(&pipeline, &t, kind)?;
    if kind == Kind::Event && args.wait_reply.is_some() {
        bail!("--wait-reply is for commands: events get no replies");
    }
    let payloads = payloads(&args)?;
    check_payloads(&pipeline, &t, &payloads)?;
    let headers = headers(&args)?;
    if args.wait_reply.is_some() && payloads.len() > 1 {
        bail!("--wait-reply waits for one reply; send one command at a time");
    }

    let transport = runtime::open(&pipeline).await?;
    // The inbox exists before the command goes out, so the reply has
    // somewhere to land however fast it comes.
    let mut inbox = match args.wait_reply {
        Some(_) => Some(transport.reply_inbox().await?),
        None => None,
    };
    // Start the trace here when tracing is configured: the flow's first span
    // is this `send`.
    let telemetry = match pipeline.telemetry.resolve(&pipeline.name)? {
        s if s.traces == crate::config::TraceExport::Otlp => {
            Some(crate::telemetry::Telemetry::start(&s)?)
        }
        _ => None,
    };
    let template = Template {
        message_type: &t,
        kind,
        content_type: &args.content_type,
        headers,
        correlation_id: args.correlation_id.clone(),
        reply_to: inbox.as_ref().map(|i| i.address().to_owned()),
        telemetry: telemetry.as_ref(),
    };
    let total = payloads.len();
    let (first_id, stored) = enqueue_all(&*transport, &template, payloads).await?;
    let to = pipeline
        .subscribers(t.as_str())
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let past = if kind == Kind::Command {
        "sent"
    } else {
        "published"
    };
    if total == 1 {
        eprintln!("{past} {kind} {t} {first_id} → {to}");
    } else {
        eprintln!("{past} {total} {kind}s {t} → {to} ({stored} deliveries)");
    }

    if let Some(t) = telemetry {
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    let (Some(inbox), Some(wait)) = (inbox.as_mut(), args.wait_reply) else {
        return Ok(ExitCode::SUCCESS);
    };
    match inbox.wait(&first_id, wait).await? {
        Some(reply) => {
            print_reply(&reply.payload)?;
            Ok(ExitCode::SUCCESS)
        }
        None => bail!(
            "no reply within {}; the command is queued and will be handled (or fail) when a host runs this pipeline (switchyard run {}); a failed command sends no reply",
            humantime::format_duration(wait),
            args.pipeline.display()
        ),
    }
}

/// Refuses a type the pipeline does not route as `kind`, naming what it
/// does route.
fn check_kind(pipeline: &Pipeline, t: &MessageType, kind: Kind) -> Result<()> {
    let other_verb = match kind {
        Kind::Command => "publish",
        Kind::Event => "send",
    };
    match pipeline.kind_of(t.as_str()) {
        Some(k) if k == kind => Ok(()),
        Some(k) => bail!(
            "`{t}` is {} in pipeline `{}`; use `switchyard {other_verb}`",
            k.with_article(),
            pipeline.name
        ),
        None => bail!(
            "no plugin in pipeline `{}` {} {kind} `{t}`; its {kind}s are {}",
            pipeline.name,
            if kind == Kind::Command {
                "handles"
            } else {
                "consumes"
            },
            pipeline.hint_types(kind)
        ),
    }
}

/// The pipeline's contract for this type holds for messages from here too;
/// nothing is sent unless every payload keeps it.
fn check_payloads(pipeline: &Pipeline, t: &MessageType, payloads: &[Vec<u8>]) -> Result<()> {
    let schemas = crate::schemas::Schemas::load(pipeline)?;
    for (i, p) in payloads.iter().enumerate() {
        if let Err(why) = schemas.check(t.as_str(), p) {
            if payloads.len() == 1 {
                bail!("not sent: {why}");
            }
            bail!(
                "nothing was sent: message {} of {}: {why}",
                i + 1,
                payloads.len()
            );
        }
    }
    Ok(())
}

/// What every message of one `send` or `publish` shares.
struct Template<'a> {
    message_type: &'a MessageType,
    kind: Kind,
    content_type: &'a str,
    headers: Vec<(String, String)>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    telemetry: Option<&'a crate::telemetry::Telemetry>,
}

impl Template<'_> {
    /// A message with this payload, its `send` span (when tracing) in its
    /// headers; a trace the caller passed with `-H traceparent` continues.
    fn message(&self, payload: Vec<u8>) -> Envelope {
        let mut e = Envelope::new(
            self.message_type.as_str(),
            self.kind,
            payload,
            self.content_type.to_owned(),
        );
        e.headers = self.headers.clone();
        e.correlation_id = self.correlation_id.clone();
        e.reply_to = self.reply_to.clone();
        if let Some(t) = self.telemetry
            && let Some(cx) = t.start_span(
                format!("send {}", e.message_type),
                opentelemetry::trace::SpanKind::Producer,
                &t.extract(&e.headers, &e.id),
                vec![
                    opentelemetry::KeyValue::new("messaging.system", "switchyard"),
                    opentelemetry::KeyValue::new("messaging.operation.type", "send"),
                    opentelemetry::KeyValue::new(
                        "messaging.destination.name",
                        e.message_type.clone(),
                    ),
                    opentelemetry::KeyValue::new("messaging.message.id", e.id.clone()),
                ],
                Vec::new(),
            )
        {
            t.inject(&cx, &mut e.headers);
        }
        e
    }
}

/// Enqueues one message per payload, in chunks, with progress on a
/// terminal. Returns the first message's id and how many deliveries were
/// stored.
async fn enqueue_all(
    transport: &dyn crate::transport::Transport,
    template: &Template<'_>,
    payloads: Vec<Vec<u8>>,
) -> Result<(String, usize)> {
    let verb = match template.kind {
        Kind::Command => "send",
        Kind::Event => "publish",
    };
    let total = payloads.len();
    let progress = total > CHUNK && std::io::stderr().is_terminal();
    let mut first_id = None;
    let mut stored = 0;
    let mut sent = 0;
    let mut chunk = Vec::with_capacity(CHUNK.min(total));
    for payload in payloads {
        let e = template.message(payload);
        first_id.get_or_insert_with(|| e.id.clone());
        chunk.push(e);
        if chunk.len() == CHUNK {
            sent += chunk.len();
            stored += transport.enqueue(std::mem::take(&mut chunk)).await?;
            if progress {
                eprint!("\r{verb}: {sent}/{total}");
            }
        }
    }
    if !chunk.is_empty() {
        stored += transport.enqueue(chunk).await?;
    }
    if progress {
        eprintln!();
    }
    Ok((first_id.unwrap_or_default(), stored))
}

/// A reply's payload on stdout: pretty JSON, or as it came.
fn print_reply(payload: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(v) => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        )?,
        Err(_) => {
            out.write_all(payload)?;
            writeln!(out)?;
        }
    }
    Ok(())
}
