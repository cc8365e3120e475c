//! Keeps counters in its state, for the tests of plugin state.
//!
//! - `Count {"key": k}` adds one to `count:<k>`, remembers the message id
//!   under `last:<k>` and publishes `Counted {"key", "count"}`. With
//!   `"fail": "first"` it fails its first attempt (transiently) after
//!   writing; with `"fail": "always"`, every attempt (permanently): what a
//!   failed attempt wrote must never be seen.
//! - `Store {"key": k, "bytes": n}` stores `n` bytes under `k` (to reach
//!   the value limit); `"keys": n` writes `n` keys `bulk:<i>` instead.
//! - `Forget {"prefix": p}` deletes every key that starts with `p`.
//! - `Counted` (its own event, when the pipeline routes it back) adds one
//!   to `seen`: how often its outputs were handled.
//! - `Tick` (any payload) adds one to `ticks`: the SIGKILL tests compare
//!   it with the number of messages sent.
//! - `Bump` (payload: a key as text) reads the integer under the key and
//!   stores it plus one: one `get` and one `set`, for the benchmarks.
//! - `Total {"prefix": p}` (a command) replies with the sum of the counters
//!   whose keys start with `count:<p>`, and their keys.

use serde::Deserialize;
use serde_json::json;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

pub struct Counter;

#[derive(Deserialize)]
struct Count {
    key: String,
    #[serde(default)]
    fail: Option<String>,
}

#[derive(Deserialize)]
struct Store {
    key: String,
    #[serde(default)]
    bytes: usize,
    #[serde(default)]
    keys: usize,
}

#[derive(Deserialize)]
struct Prefix {
    prefix: String,
}

impl Plugin for Counter {
    fn describe() -> PluginInfo {
        PluginInfo::new("counter", env!("CARGO_PKG_VERSION"))
            .consumes_event("Count")
            .consumes_event("Store")
            .consumes_event("Forget")
            .consumes_event("Bump")
            .consumes_event("Tick")
            .consumes_event("Counted")
            .handles_command("Total")
            .publishes("Counted")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        match msg.message_type.as_str() {
            "Count" => {
                let c: Count = msg.json()?;
                let count = ctx.state().increment(&format!("count:{}", c.key), 1);
                ctx.state().set(&format!("last:{}", c.key), &msg.id)?;
                ctx.publish("Counted", &json!({ "key": c.key, "count": count }))?;
                match c.fail.as_deref() {
                    Some("first") if msg.attempt == 1 => Err(HandlerError::transient(
                        "failing the first attempt after writing",
                    )),
                    Some("always") => Err(HandlerError::permanent("failing after writing")),
                    _ => Ok(()),
                }
            }
            "Store" => {
                let s: Store = msg.json()?;
                if s.keys > 0 {
                    for i in 0..s.keys {
                        ctx.state().set(&format!("bulk:{i}"), &i)?;
                    }
                } else {
                    ctx.state().set_bytes(&s.key, vec![b'x'; s.bytes]);
                }
                Ok(())
            }
            "Counted" => {
                ctx.state().increment("seen", 1);
                Ok(())
            }
            "Tick" => {
                ctx.state().increment("ticks", 1);
                Ok(())
            }
            "Bump" => {
                let key = String::from_utf8_lossy(&msg.payload);
                let n: i64 = ctx.state().get(&key)?.unwrap_or(0);
                ctx.state().set(&key, &(n + 1))
            }
            "Forget" => {
                let p: Prefix = msg.json()?;
                for key in ctx.state().keys(&p.prefix) {
                    ctx.state().delete(&key);
                }
                Ok(())
            }
            "Total" => {
                let p: Prefix = msg.json()?;
                let prefix = format!("count:{}", p.prefix);
                let keys = ctx.state().keys(&prefix);
                let mut total = 0i64;
                for key in &keys {
                    total += ctx.state().get::<i64>(key)?.unwrap_or(0);
                }
                ctx.reply(&json!({ "total": total, "keys": keys }))
            }
            other => Err(HandlerError::permanent(format!("unexpected {other}"))),
        }
    }
}

switchyard_sdk::export_plugin!(Counter);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::testing::TestHost;

    #[test]
    fn counts_and_keeps_nothing_of_a_failed_attempt() {
        let host = TestHost::<Counter>::new().with_state("count:a", &40);
        host.handle(Message::event("Count").with_json(&json!({"key": "a"})))
            .assert_ok();
        let failed =
            host.handle(Message::event("Count").with_json(&json!({"key": "a", "fail": "always"})));
        assert!(failed.handler_error().is_some());
        assert!(failed.published.is_empty());
        assert_eq!(host.state::<i64>("count:a"), Some(41));

        host.handle(Message::event("Count").with_json(&json!({"key": "b"})))
            .assert_ok();
        let total = host.handle(Message::command("Total").with_json(&json!({"prefix": ""})));
        total.assert_ok();
        assert_eq!(
            total.replies[0]
                .json_payload::<serde_json::Value>()
                .unwrap(),
            json!({"total": 42, "keys": ["count:a", "count:b"]})
        );

        host.handle(Message::event("Forget").with_json(&json!({"prefix": "count:"})))
            .assert_ok();
        assert_eq!(host.state::<i64>("count:a"), None);
        assert!(host.state_bytes().keys().all(|k| k.starts_with("last:")));
    }
}
