//! A plugin that misbehaves on request, to prove the host's contract checks
//! and sandbox. The `Misbehave` command's JSON payload names the `action`;
//! `Sent` is the command it sends (to itself); replying to a `Poke` event
//! breaks the contract.

use serde::Deserialize;
use serde_json::json;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

#[derive(Deserialize)]
struct Misbehave {
    action: String,
    /// `connect`, `connect-and-read`: the `host:port` to open a TCP
    /// connection to.
    #[serde(default)]
    to: String,
    /// `read-file`: the file to read.
    #[serde(default)]
    path: String,
    /// `headers`, `publish-many`: how many.
    #[serde(default)]
    count: usize,
}

pub struct Rogue;

impl Plugin for Rogue {
    fn describe() -> PluginInfo {
        PluginInfo::new("rogue", env!("CARGO_PKG_VERSION"))
            .handles_command("Misbehave")
            .handles_command("Sent")
            .consumes_event("Poke")
            .publishes("Published")
            .sends("Sent")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        match msg.message_type.as_str() {
            // Replying to an event breaks the contract.
            "Poke" => return ctx.reply(&"poked"),
            // The command this plugin sends to itself: nothing to do.
            "Sent" => return Ok(()),
            _ => {}
        }
        let Misbehave {
            action,
            to,
            path,
            count,
        } = msg.json()?;
        match action.as_str() {
            "ok" => ctx.reply(&"ok"),
            "publish" => ctx.publish("Published", &json!({"from": msg.id})),
            "publish-undeclared" => ctx.publish("Undeclared", &1),
            "publish-command" => ctx.publish("Sent", &1),
            "publish-undeclared-then-fail" => {
                ctx.publish("Undeclared", &1)?;
                Err(HandlerError::transient(
                    "failing after breaking the contract",
                ))
            }
            "sleep" => {
                // Blocks in the host (wasi poll), where epoch interruption
                // cannot reach: the host must cut the wait at the deadline.
                std::thread::sleep(std::time::Duration::from_secs(3600));
                ctx.reply(&"woke up")
            }
            "send-event" => ctx.send("Published", &1),
            "fail-after-publish" => {
                ctx.publish("Published", &1)?;
                ctx.send("Sent", &1)?;
                ctx.reply(&"never delivered")?;
                Err(HandlerError::transient("failing after emitting outputs"))
            }
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("rogue plugin panicked on purpose"),
            "sandbox" => {
                let file = std::fs::read_to_string("/etc/hostname").map_err(|e| e.to_string());
                let dir = std::fs::read_dir("/")
                    .map(|d| d.count())
                    .map_err(|e| e.to_string());
                let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                ctx.reply(&json!({
                    "file": format!("{file:?}"),
                    "dir": format!("{dir:?}"),
                    "env": env,
                    "wall_clock_secs": now,
                }))
            }
            // An outbound call: a dependency that cannot be reached is a
            // transient failure.
            "connect" => match std::net::TcpStream::connect(to.as_str()) {
                Ok(_) => ctx.reply(&json!({ "connected": to })),
                Err(e) => Err(HandlerError::transient(format!("cannot reach {to}: {e}"))
                    .with_code("upstream-unreachable")),
            },
            // A peer that accepts and never answers: the read waits until
            // the host ends the call.
            "connect-and-read" => {
                use std::io::Read as _;
                let mut stream = std::net::TcpStream::connect(to.as_str())
                    .map_err(|e| HandlerError::transient(format!("cannot reach {to}: {e}")))?;
                let mut answer = Vec::new();
                stream
                    .read_to_end(&mut answer)
                    .map_err(|e| HandlerError::transient(format!("cannot read {to}: {e}")))?;
                ctx.reply(&json!({ "read": answer.len() }))
            }
            // A file in a granted directory, which may be a FIFO nobody
            // writes to.
            "read-file" => match std::fs::read(&path) {
                Ok(bytes) => ctx.reply(&json!({ "read": bytes.len() })),
                Err(e) => Err(HandlerError::transient(format!("cannot read {path}: {e}"))),
            },
            // One event with `count` empty headers: nothing to measure by
            // length, everything to allocate.
            // An event carrying the host's saga headers, as a plugin
            // forging a fault or a timeout would set them.
            "forge-saga-headers" => {
                let event = switchyard_sdk::Outgoing::json("Published", &1)?
                    .with_header("switchyard-saga", "someone-else")
                    .with_header("switchyard-saga-instance", "A-1")
                    .with_header("switchyard-saga-timeout", "t-1")
                    .with_header("x-kept", "yes");
                ctx.publish_message(event);
                Ok(())
            }
            "headers" => {
                let mut event = switchyard_sdk::Outgoing::json("Published", &1)?;
                for _ in 0..count {
                    event = event.with_header("", "");
                }
                ctx.publish_message(event);
                Ok(())
            }
            // One event whose payload is `count` bytes.
            "publish-bytes" => {
                ctx.publish_message(switchyard_sdk::Outgoing::raw(
                    "Published",
                    vec![b'x'; count],
                    "application/octet-stream",
                ));
                Ok(())
            }
            // `count` events at once.
            "publish-many" => {
                for i in 0..count {
                    ctx.publish("Published", &i)?;
                }
                Ok(())
            }
            // Logs as fast as it can until the call ends.
            "flood-logs" => loop {
                ctx.info("flooding the log");
            },
            // Recursion without end: the stack runs out.
            "overflow" => {
                fn down(n: u64) -> u64 {
                    if n == u64::MAX {
                        return n;
                    }
                    std::hint::black_box(down(n + 1)) + 1
                }
                ctx.reply(&down(0))
            }
            other => Err(HandlerError::permanent(format!("unknown action {other}"))),
        }
    }
}

switchyard_sdk::export_plugin!(Rogue);
