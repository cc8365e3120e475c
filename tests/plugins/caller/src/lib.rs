//! Sends the HTTP request its `Call` command describes and replies with
//! what came back: `{"method": "POST", "url": "...", "body": "..."}` in,
//! `{"status": 200, "body": "...", "length": 2}` out. A request that got
//! no response fails the message with the SDK's error (permanent when the
//! host refused it, transient otherwise), so the host's dead letters show
//! exactly what the plugin saw.

use serde::Deserialize;
use switchyard_sdk::http::Request;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

pub struct Caller;

#[derive(Deserialize)]
struct Call {
    #[serde(default = "get")]
    method: String,
    url: String,
    #[serde(default)]
    body: String,
}

fn get() -> String {
    "GET".into()
}

impl Plugin for Caller {
    fn describe() -> PluginInfo {
        PluginInfo::new("caller", env!("CARGO_PKG_VERSION")).handles_command("Call")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        let call: Call = msg.json()?;
        let answer = ctx.http(Request::new(&call.method, &call.url).body(call.body))?;
        let text = answer.text();
        ctx.reply(&serde_json::json!({
            "status": answer.status,
            "length": answer.body.len(),
            // Enough to check; a large body is measured, not echoed.
            "body": text.chars().take(200).collect::<String>(),
        }))
    }
}

switchyard_sdk::export_plugin!(Caller);

#[cfg(test)]
mod tests {
    use switchyard_sdk::http::Response;
    use switchyard_sdk::testing::TestHost;
    use switchyard_sdk::{ErrorKind, Message};

    use super::Caller;

    #[test]
    fn a_stubbed_answer_is_replied_and_an_unstubbed_request_refused() {
        let host = TestHost::<Caller>::new().with_http(
            "POST",
            "https://gateway.example.com/charges",
            Response {
                status: 201,
                headers: Vec::new(),
                body: b"{\"ok\":true}".to_vec(),
            },
        );
        let ok = host.handle(Message::command("Call").with_json(
            &serde_json::json!({"method": "POST", "url": "https://gateway.example.com/charges", "body": "x"}),
        ));
        ok.assert_ok();
        assert_eq!(ok.http_requests[0].body, b"x");
        let reply: serde_json::Value = ok.replies[0].json_payload().unwrap();
        assert_eq!(reply["status"], 201);
        assert_eq!(reply["length"], 11);

        let refused = host.handle(
            Message::command("Call")
                .with_json(&serde_json::json!({"url": "https://elsewhere.example.com/"})),
        );
        let error = refused.handler_error().unwrap();
        assert_eq!(error.kind, ErrorKind::Permanent);
        assert_eq!(error.code.as_deref(), Some("http-denied"));

        let down = TestHost::<Caller>::new().with_network_down().handle(
            Message::command("Call")
                .with_json(&serde_json::json!({"url": "https://gateway.example.com/charges"})),
        );
        let error = down.handler_error().unwrap();
        assert_eq!(error.kind, ErrorKind::Transient);
        assert_eq!(error.code.as_deref(), Some("http-connect"));
    }
}
