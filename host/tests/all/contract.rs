//! The contract round trip through real compiled plugins, and the runtime
//! refusals of outputs a plugin did not declare.

use serde_json::json;
use switchyard::envelope::Kind;
use switchyard::plugin::{FailureKind, Output};

use crate::common::{load, message, misbehave};

#[test]
fn describe_reports_what_the_plugin_declares() {
    let orders = load("orders");
    let info = orders.info();
    assert_eq!(info.name, "orders");
    assert_eq!(info.version, "1.0.0");
    assert_eq!(
        info.handles,
        vec![
            ("PlaceOrder".to_owned(), Kind::Command),
            ("CancelOrder".to_owned(), Kind::Command)
        ]
    );
    assert_eq!(info.publishes, vec!["OrderPlaced"]);
    assert_eq!(info.sends, vec!["ChargePayment"]);
    assert!(orders.digest().starts_with("sha256:") && orders.digest().len() == 7 + 64);
}

#[test]
fn a_command_round_trips_through_the_component() {
    let orders = load("orders");
    let mut instance = orders.instantiate().unwrap();
    let mut cmd = message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": "A-7", "customer": "ada",
               "items": [{"sku": "book", "quantity": 3, "unit_price_cents": 1000}]}),
    );
    cmd.reply_to = Some("test:reply".into());
    cmd.headers.push(("x-test".into(), "1".into()));
    let before = cmd.clone();
    let outputs = instance.handle(&mut cmd).expect("handled");
    assert_eq!(
        cmd, before,
        "the envelope is lent to the call and given back intact"
    );
    assert_eq!(outputs.len(), 3, "{outputs:?}");
    let Output::Event(placed) = &outputs[0] else {
        panic!("expected an event first, got {:?}", outputs[0]);
    };
    assert_eq!(placed.message_type, "OrderPlaced");
    let placed: serde_json::Value = serde_json::from_slice(&placed.payload).unwrap();
    assert_eq!(placed["total_cents"], 3000);
    assert_eq!(placed["items"][0]["sku"], "book");
    let Output::Command(charge) = &outputs[1] else {
        panic!("expected a command second, got {:?}", outputs[1]);
    };
    assert_eq!(charge.message_type, "ChargePayment");
    let Output::Reply(reply) = &outputs[2] else {
        panic!("expected a reply third, got {:?}", outputs[2]);
    };
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap(),
        json!({"order_id": "A-7", "total_cents": 3000})
    );
    assert_eq!(instance.handled(), 1);
}

#[test]
fn metadata_reaches_the_plugin_on_demand_and_only_during_its_call() {
    let echo = load("echo");
    let mut instance = echo.instantiate().unwrap();
    let mut cmd = message(Kind::Command, "Metadata", json!({}));
    cmd.headers = vec![
        ("tenant".into(), "acme".into()),
        ("tenant".into(), "second".into()),
    ];
    cmd.correlation_id = Some("flow-1".into());
    cmd.causation_id = Some("cause-1".into());
    cmd.reply_to = Some("test:reply".into());
    let before = cmd.clone();
    let outputs = instance.handle(&mut cmd).expect("handled");
    assert_eq!(cmd, before, "the metadata is given back with the envelope");
    let reply = |outputs: &[Output]| -> serde_json::Value {
        let [Output::Reply(reply)] = outputs else {
            panic!("expected one reply, got {outputs:?}");
        };
        serde_json::from_slice(&reply.payload).unwrap()
    };
    assert_eq!(
        reply(&outputs),
        json!({
            "headers": [["tenant", "acme"], ["tenant", "second"]],
            "correlation_id": "flow-1",
            "causation_id": "cause-1",
            "reply_to": "test:reply",
            "kept_headers": null,
        })
    );

    // The plugin kept a copy of that message; read now, in another call,
    // it has no metadata rather than this message's.
    let mut next = message(Kind::Command, "Metadata", json!({}));
    next.headers = vec![("tenant".into(), "other".into())];
    let outputs = instance.handle(&mut next).expect("handled");
    assert_eq!(
        reply(&outputs),
        json!({
            "headers": [["tenant", "other"]],
            "correlation_id": null,
            "causation_id": null,
            "reply_to": null,
            "kept_headers": [],
        })
    );
}

#[test]
fn handler_errors_keep_their_kind_code_and_details() {
    let orders = load("orders");
    let mut instance = orders.instantiate().unwrap();
    let mut empty = message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": "A-8", "customer": "x", "items": []}),
    );
    let failure = instance.handle(&mut empty).unwrap_err();
    assert_eq!(failure.kind, FailureKind::Permanent);
    assert_eq!(failure.code.as_deref(), Some("empty-order"));
    assert_eq!(
        failure.details,
        vec![("order_id".to_owned(), "A-8".to_owned())]
    );

    let payments = load("payments");
    let mut instance = payments.instantiate().unwrap();
    let mut flaky = message(
        Kind::Command,
        "ChargePayment",
        json!({"order_id": "A-9", "customer": "x", "amount_cents": 1013}),
    );
    let failure = instance.handle(&mut flaky).unwrap_err();
    assert_eq!(failure.kind, FailureKind::Transient);
    assert!(failure.message.contains("timed out"), "{failure}");
    // The attempt number reaches the plugin: the third attempt succeeds.
    let mut third = flaky.clone();
    third.attempt = 3;
    assert!(instance.handle(&mut third).is_ok());
}

#[test]
fn a_malformed_payload_is_a_permanent_failure_naming_the_message() {
    let orders = load("orders");
    let mut instance = orders.instantiate().unwrap();
    let mut bad = message(Kind::Command, "PlaceOrder", json!({"order_id": 42}));
    bad.payload = b"\xff not json".to_vec();
    let failure = instance.handle(&mut bad).unwrap_err();
    assert_eq!(failure.kind, FailureKind::Permanent);
    assert!(failure.message.contains(&bad.id), "{failure}");
    // A handler error is not a trap: the instance stays warm.
    assert!(!instance.is_spent());
}

fn violation(action: &str) -> String {
    let rogue = load("rogue");
    let mut instance = rogue.instantiate().unwrap();
    let failure = instance.handle(&mut misbehave(action)).unwrap_err();
    assert_eq!(
        failure.kind,
        FailureKind::ContractViolation,
        "{action}: {failure}"
    );
    failure.message
}

#[test]
fn publishing_an_undeclared_type_is_refused() {
    let m = violation("publish-undeclared");
    assert!(
        m.contains("published Undeclared") && m.contains("does not list"),
        "{m}"
    );
}

#[test]
fn publishing_a_command_as_an_event_is_refused() {
    let m = violation("publish-command");
    assert!(
        m.contains("published Sent, which it declares as a command; use send"),
        "{m}"
    );
}

#[test]
fn sending_an_event_as_a_command_is_refused() {
    let m = violation("send-event");
    assert!(
        m.contains("sent Published, which it declares as an event; use publish"),
        "{m}"
    );
}

#[test]
fn replying_while_handling_an_event_is_refused() {
    let rogue = load("rogue");
    let mut instance = rogue.instantiate().unwrap();
    let failure = instance
        .handle(&mut message(Kind::Event, "Poke", json!({})))
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::ContractViolation);
    assert!(
        failure
            .message
            .contains("replied while handling event Poke"),
        "{failure}"
    );
}

#[test]
fn a_declared_publish_is_allowed() {
    let rogue = load("rogue");
    let mut instance = rogue.instantiate().unwrap();
    let outputs = instance.handle(&mut misbehave("publish")).unwrap();
    assert!(matches!(&outputs[..], [Output::Event(e)] if e.message_type == "Published"));
}

#[test]
fn a_plugin_cannot_set_the_saga_headers_of_the_host() {
    let rogue = load("rogue");
    let mut instance = rogue.instantiate().unwrap();
    let outputs = instance
        .handle(&mut misbehave("forge-saga-headers"))
        .unwrap();
    let [Output::Event(e)] = &outputs[..] else {
        panic!("{outputs:?}");
    };
    assert_eq!(e.headers, [("x-kept".to_owned(), "yes".to_owned())]);
}

#[test]
fn a_broken_contract_wins_over_the_error_the_handler_returns() {
    let m = violation("publish-undeclared-then-fail");
    assert!(m.contains("published Undeclared"), "{m}");
}
