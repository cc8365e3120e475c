//! Replies to `Echo` with its own payload and does nothing with `Tick`:
//! the smallest useful handler, for benchmarks. A `Flaky` event whose
//! payload starts with `fail` fails transiently on its first attempt and
//! succeeds on the next, to measure and test the retry path.

use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo, Response};

pub struct Echo;

impl Plugin for Echo {
    fn describe() -> PluginInfo {
        PluginInfo::new("echo", env!("CARGO_PKG_VERSION"))
            .handles_command("Echo")
            .consumes_event("Tick")
            .consumes_event("Flaky")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        if msg.message_type == "Flaky" && msg.attempt == 1 && msg.payload.starts_with(b"fail") {
            return Err(HandlerError::transient(
                "failing the first attempt, as asked",
            ));
        }
        if msg.message_type == "Echo" {
            ctx.reply_response(Response {
                payload: msg.payload,
                content_type: msg.content_type,
                headers: Vec::new(),
            });
        }
        Ok(())
    }
}

switchyard_sdk::export_plugin!(Echo);
