//! The `{{name}}` plugin: greets whoever asks.
//!
//! - It handles the `Greet` command (`{"name": "ada"}`): it replies with a
//!   greeting and publishes a `Greeted` event.
//! - It consumes the `Greeted` event and writes it to the host's log.
//!
//! A payload that is not the expected JSON fails for good (a permanent
//! error: the host dead-letters it and never retries it).

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

#[derive(Debug, Deserialize)]
pub struct Greet {
    pub name: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Greeted {
    pub name: String,
    pub greeting: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Greeting {
    pub greeting: String,
}

pub struct Greeter;

impl Plugin for Greeter {
    fn describe() -> PluginInfo {
        PluginInfo::new("{{name}}", env!("CARGO_PKG_VERSION"))
            .handles_command("Greet")
            .consumes_event("Greeted")
            .publishes("Greeted")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        match msg.message_type.as_str() {
            "Greet" => {
                let Greet { name } = msg.json()?;
                if name.is_empty() {
                    return Err(HandlerError::permanent("Greet needs a non-empty name")
                        .with_code("malformed-payload"));
                }
                let greeting = format!("Hello, {name}!");
                // Held until the handler returns Ok: a failed attempt
                // publishes and replies nothing.
                ctx.publish(
                    "Greeted",
                    &Greeted {
                        name,
                        greeting: greeting.clone(),
                    },
                )?;
                ctx.reply(&Greeting { greeting })
            }
            "Greeted" => {
                let greeted: Greeted = msg.json()?;
                ctx.info(&format!("{} was greeted: {}", greeted.name, greeted.greeting));
                Ok(())
            }
            other => Err(HandlerError::permanent(format!("{{name}} does not handle {other}"))
                .with_code("unknown-type")),
        }
    }
}

switchyard_sdk::export_plugin!(Greeter);

/// The same logic, natively: `cargo test`. The contract tests in
/// `tests/contract.toml` run the compiled component instead.
#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::testing::TestHost;

    #[test]
    fn a_greeting_is_replied_and_announced() {
        let out = TestHost::<Greeter>::new()
            .handle(Message::command("Greet").with_json(&serde_json::json!({"name": "ada"})));
        out.assert_ok();
        let greeted: Vec<Greeted> = out.published_json("Greeted");
        assert_eq!(
            greeted,
            vec![Greeted {
                name: "ada".into(),
                greeting: "Hello, ada!".into()
            }]
        );
        assert_eq!(out.replies.len(), 1);
    }

    #[test]
    fn a_greeting_without_a_name_is_refused_for_good() {
        let out = TestHost::<Greeter>::new()
            .handle(Message::command("Greet").with_json(&serde_json::json!({"name": ""})));
        let err = out.handler_error().expect("must fail");
        assert!(!err.is_transient());
        assert!(out.published.is_empty() && out.replies.is_empty());
    }
}
