//! Replies to `Echo` with its own payload and does nothing with `Tick`:
//! the smallest useful handler, for benchmarks. A `Flaky` event whose
//! payload starts with `fail` fails transiently on its first attempt and
//! succeeds on the next, to measure and test the retry path. `Metadata`
//! replies with the metadata it reads from the host, and with what a copy
//! of the previous `Metadata` message shows now that its call is over.
//! The `v2` build is the same handler as version 0.2.0, a second build to
//! deploy.

use std::sync::Mutex;

use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo, Response};

pub struct Echo;

/// The previous `Metadata` message, kept past its call.
static KEPT: Mutex<Option<Message>> = Mutex::new(None);

impl Plugin for Echo {
    fn describe() -> PluginInfo {
        let version = if cfg!(feature = "v2") {
            "0.2.0"
        } else {
            env!("CARGO_PKG_VERSION")
        };
        PluginInfo::new("echo", version)
            .handles_command("Echo")
            .handles_command("Metadata")
            .consumes_event("Tick")
            .consumes_event("Flaky")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        match msg.message_type.as_str() {
            "Flaky" if msg.attempt == 1 && msg.payload.starts_with(b"fail") => Err(
                HandlerError::transient("failing the first attempt, as asked"),
            ),
            "Echo" => {
                ctx.reply_response(Response {
                    payload: msg.payload,
                    content_type: msg.content_type,
                    headers: Vec::new(),
                });
                Ok(())
            }
            "Metadata" => {
                let kept = KEPT
                    .lock()
                    .map_err(|_| HandlerError::permanent("lock poisoned"))?
                    .replace(msg.clone());
                let answer = serde_json::json!({
                    "headers": msg.headers(),
                    "correlation_id": msg.correlation_id(),
                    "causation_id": msg.causation_id(),
                    "reply_to": msg.reply_to(),
                    "kept_headers": kept.as_ref().map(Message::headers),
                });
                ctx.reply(&answer)
            }
            _ => Ok(()),
        }
    }
}

switchyard_sdk::export_plugin!(Echo);
