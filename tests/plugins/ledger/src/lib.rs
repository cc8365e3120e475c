//! A saga, for the tests of sagas: one ledger per id.
//!
//! - `Open {"id": k}` starts ledger `k`: `total` = 0, `opened_by` = the
//!   message id; publishes `Opened {"id"}`.
//! - `Add {"id": k, "n": n}` adds `n` to `total` (a read and a write, so
//!   two concurrent adds to one ledger conflict) and counts `adds`.
//! - `Close {"id": k}` publishes `Closed {"id", "total", "steps"}` and
//!   completes the ledger.
//! - `Reject {"id": k}` fails permanently (its dead letter names the
//!   instance).
//! - `Peek` (an event of another plugin's, found by correlation id) records
//!   the correlation under `peeked`.
//! - `Remind {"id": k, "after_ms": n}` asks for an `Expire {"id": k}`
//!   timeout after `n` ms; `Expire` sets `expired` and publishes
//!   `Expired {"id", "total"}`.
//! - `Charge {"id": k, "amount": n}` sends the command `Debit {"id",
//!   "amount"}` and records `charged`; `Debit.Fault` (the debit failed for
//!   good) undoes it: deletes `charged`, records the error code under
//!   `compensated` and publishes `Compensated {"id", "code", "dead_letter"}`.

use serde::Deserialize;
use serde_json::json;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

pub struct Ledger;

#[derive(Deserialize)]
struct Add {
    n: i64,
}

#[derive(Deserialize)]
struct Remind {
    after_ms: u64,
    /// The `Expire` it asks for fails for good.
    #[serde(default)]
    fail: bool,
}

impl Plugin for Ledger {
    fn describe() -> PluginInfo {
        PluginInfo::new("ledger", env!("CARGO_PKG_VERSION"))
            .consumes_event("Open")
            .consumes_event("Add")
            .consumes_event("Close")
            .consumes_event("Reject")
            .consumes_event("Peek")
            .consumes_event("Remind")
            .consumes_event("Expire")
            .consumes_event("Charge")
            .consumes_event("Debit.Fault")
            .sends("Debit")
            .publishes("Compensated")
            .publishes("Opened")
            .publishes("Closed")
            .publishes("Expired")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        let Some(saga) = ctx.saga() else {
            return Err(HandlerError::permanent("ledger runs only as a saga"));
        };
        match msg.message_type.as_str() {
            "Open" => {
                ctx.state().set("total", &0)?;
                ctx.state().set("opened_by", &msg.id)?;
                ctx.publish("Opened", &json!({ "id": saga.id }))?;
            }
            "Add" => {
                let add: Add = msg.json()?;
                let total: i64 = ctx.state().get("total")?.unwrap_or(0);
                ctx.state().set("total", &(total + add.n))?;
                ctx.state().increment("adds", 1);
            }
            "Close" => {
                let total: i64 = ctx.state().get("total")?.unwrap_or(0);
                ctx.publish(
                    "Closed",
                    &json!({ "id": saga.id, "total": total, "steps": saga.version + 1 }),
                )?;
                ctx.complete_saga();
            }
            "Reject" => return Err(HandlerError::permanent("the ledger rejects this")),
            "Peek" => ctx.state().set("peeked", &true)?,
            "Remind" => {
                let r: Remind = msg.json()?;
                if r.fail {
                    ctx.state().set("expire_fails", &true)?;
                }
                ctx.request_timeout(
                    std::time::Duration::from_millis(r.after_ms),
                    "Expire",
                    &json!({ "id": saga.id }),
                )?;
            }
            "Charge" => {
                let c: serde_json::Value = msg.json()?;
                let amount = c.get("amount").cloned().unwrap_or(json!(0));
                ctx.send("Debit", &json!({ "id": saga.id, "amount": amount }))?;
                ctx.state().set("charged", &amount)?;
            }
            "Debit.Fault" => {
                let fault: serde_json::Value = msg.json()?;
                let code = fault["error"]["code"].clone();
                ctx.state().delete("charged");
                ctx.state().set("compensated", &code)?;
                ctx.publish(
                    "Compensated",
                    &json!({ "id": saga.id, "code": code, "dead_letter": fault["dead_letter"] }),
                )?;
            }
            "Expire" => {
                if ctx.state().get::<bool>("expire_fails")?.unwrap_or(false) {
                    return Err(HandlerError::permanent("this ledger's expiry fails"));
                }
                let total: i64 = ctx.state().get("total")?.unwrap_or(0);
                ctx.state().set("expired", &true)?;
                ctx.publish("Expired", &json!({ "id": saga.id, "total": total }))?;
            }
            other => return Err(HandlerError::permanent(format!("unexpected {other}"))),
        }
        Ok(())
    }
}

switchyard_sdk::export_plugin!(Ledger);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::testing::TestHost;

    #[test]
    fn a_ledger_opens_adds_and_closes() {
        let host = TestHost::<Ledger>::new().with_saga("L-1", 0);
        host.handle(Message::event("Open").with_json(&json!({"id": "L-1"})))
            .assert_ok();
        host.handle(Message::event("Add").with_json(&json!({"id": "L-1", "n": 5})))
            .assert_ok();
        assert!(!host.saga_completed());
        let closed = host.handle(Message::event("Close").with_json(&json!({"id": "L-1"})));
        closed.assert_ok();
        assert!(closed.saga_completed);
        assert!(host.saga_completed());
        assert_eq!(
            closed.published[0]
                .json_payload::<serde_json::Value>()
                .unwrap(),
            json!({"id": "L-1", "total": 5, "steps": 3})
        );
    }

    #[test]
    fn a_reminder_requests_a_timeout() {
        let host = TestHost::<Ledger>::new().with_saga("L-1", 1);
        let out = host
            .handle(Message::event("Remind").with_json(&json!({"id": "L-1", "after_ms": 1800000})));
        out.assert_ok();
        assert_eq!(out.timeouts.len(), 1);
        assert_eq!(out.timeouts[0].0, std::time::Duration::from_secs(1800));
        assert_eq!(out.timeouts[0].1.message_type, "Expire");
    }

    #[test]
    fn outside_a_saga_it_refuses() {
        let out = TestHost::<Ledger>::new()
            .handle(Message::event("Open").with_json(&json!({"id": "L-1"})));
        assert!(out.handler_error().is_some());
    }
}
