//! State kept with its shape: `State::load` migrates older shapes, keeps
//! the migrated value, and refuses data a newer build wrote.

use serde::{Deserialize, Serialize};
use serde_json::json;
use switchyard_sdk::testing::TestHost;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo, Shaped};

/// Shape 2: cents. Shape 1 kept `total` as a float amount.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    customer: String,
    total_cents: u64,
}

impl Shaped for Order {
    const SHAPE: u32 = 2;

    fn migrate(from: u32, old: serde_json::Value) -> Result<Self, HandlerError> {
        match from {
            1 => Ok(Order {
                customer: old["customer"].as_str().unwrap_or_default().to_owned(),
                total_cents: (old["total"].as_f64().unwrap_or(0.0) * 100.0).round() as u64,
            }),
            _ => Err(HandlerError::permanent(format!(
                "no way from order shape {from}"
            ))),
        }
    }
}

/// Reads `order` and publishes what it found; `Touch` stores a new one.
struct Keeper;

impl Plugin for Keeper {
    fn describe() -> PluginInfo {
        PluginInfo::new("keeper", "1.0.0")
            .consumes_event("Read")
            .consumes_event("Write")
            .publishes("Found")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        if msg.message_type == "Write" {
            let order: Order = msg.json()?;
            return ctx.state().store("order", &order);
        }
        let order: Option<Order> = ctx.state().load("order")?;
        ctx.publish("Found", &order)
    }
}

fn read() -> Message {
    Message::event("Read").with_json(&json!({}))
}

#[test]
fn a_value_round_trips_in_its_shape() {
    let host = TestHost::<Keeper>::new();
    host.handle(
        Message::event("Write").with_json(&json!({"customer": "ada", "total_cents": 1250})),
    )
    .assert_ok();
    assert_eq!(
        host.state::<serde_json::Value>("order"),
        Some(json!({"shape": 2, "data": {"customer": "ada", "total_cents": 1250}}))
    );
    let out = host.handle(read());
    out.assert_ok();
    assert_eq!(
        out.published_json::<Option<Order>>("Found"),
        vec![Some(Order {
            customer: "ada".into(),
            total_cents: 1250
        })]
    );
}

#[test]
fn an_older_shape_is_migrated_and_kept_migrated() {
    let host = TestHost::<Keeper>::new().with_state(
        "order",
        &json!({"shape": 1, "data": {"customer": "ada", "total": 12.5}}),
    );
    let out = host.handle(read());
    out.assert_ok();
    assert_eq!(
        out.published_json::<Option<Order>>("Found")[0]
            .as_ref()
            .map(|o| o.total_cents),
        Some(1250)
    );
    assert_eq!(
        host.state::<serde_json::Value>("order"),
        Some(json!({"shape": 2, "data": {"customer": "ada", "total_cents": 1250}}))
    );
}

#[test]
fn a_value_stored_without_a_shape_is_shape_zero() {
    // Shape 0 has no migration here: the error says so and nothing changes.
    let before = json!({"customer": "ada", "total_cents": 5});
    let host = TestHost::<Keeper>::new().with_state("order", &before);
    let out = host.handle(read());
    let err = out.handler_error().expect("shape 0 has no migration");
    assert!(!err.is_transient());
    assert!(err.message.contains("shape 0"), "{}", err.message);
    assert_eq!(host.state::<serde_json::Value>("order"), Some(before));
}

#[test]
fn a_newer_shape_is_refused_as_transient() {
    let newer = json!({"shape": 3, "data": {"buyer": "ada"}});
    let host = TestHost::<Keeper>::new().with_state("order", &newer);
    let out = host.handle(read());
    let err = out.handler_error().expect("a newer shape cannot be read");
    assert!(err.is_transient());
    assert_eq!(err.code.as_deref(), Some("state-shape-newer"));
    assert!(err.message.contains("shape 3"), "{}", err.message);
    assert_eq!(host.state::<serde_json::Value>("order"), Some(newer));
}

#[test]
fn a_missing_value_is_none() {
    let out = TestHost::<Keeper>::new().handle(read());
    out.assert_ok();
    assert_eq!(out.published_json::<Option<Order>>("Found"), vec![None]);
}
