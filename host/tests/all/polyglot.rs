//! pipelines/polyglot.toml end to end: one order flow through plugins in
//! Rust, JavaScript, C and Python, driven by `switchyard::testing`.

use serde_json::json;
use switchyard::testing::{Payload, Settled, TestPipeline};

use crate::common::workspace_root;

fn order(id: &str, customer: &str, quantity: u32, unit_price_cents: u64) -> serde_json::Value {
    json!({
        "order_id": id,
        "customer": customer,
        "items": [{ "sku": "book", "quantity": quantity, "unit_price_cents": unit_price_cents }],
    })
}

async fn start() -> TestPipeline {
    let path = workspace_root().join("pipelines").join("polyglot.toml");
    for plugin in ["orders", "payments", "fraud", "receipts", "notices"] {
        crate::common::wasm(plugin);
    }
    TestPipeline::start(&path).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_order_goes_through_four_languages() {
    let p = start().await;

    // Rust: the command, and its reply.
    let reply = p
        .request("PlaceOrder", order("A-1", "ada", 2, 1400))
        .await
        .unwrap();
    assert_eq!(reply.json().unwrap()["total_cents"], 2800);
    let flow = reply.correlation_id.clone();

    // JavaScript: the verdict, and the command that follows it.
    let screened = p
        .published("OrderScreened", json!({ "order_id": "A-1" }))
        .await
        .unwrap();
    assert_eq!(
        screened.json().unwrap(),
        json!({ "order_id": "A-1", "verdict": "accept", "reasons": [] })
    );
    let sign = p
        .sent("SignReceipt", json!({ "order_id": "A-1" }))
        .await
        .unwrap();
    assert_eq!(sign.correlation_id.as_deref(), Some(flow.as_str()));

    // C: the receipt, with the CRC-32 of "A-1|ada|2800".
    let signed = p
        .published("ReceiptSigned", json!({ "order_id": "A-1" }))
        .await
        .unwrap();
    assert_eq!(
        signed.json().unwrap(),
        json!({ "order_id": "A-1", "customer": "ada", "total_cents": 2800, "checksum": "crc32:194abd58" })
    );
    assert_eq!(signed.causation_id.as_deref(), Some(sign.id.as_str()));

    // Python: the customer is told, in the same flow.
    let notice = p
        .published("CustomerNotified", json!({ "order_id": "A-1" }))
        .await
        .unwrap();
    assert_eq!(
        notice.json().unwrap()["text"],
        "your receipt for order A-1 (checksum crc32:194abd58)"
    );
    assert_eq!(notice.correlation_id.as_deref(), Some(flow.as_str()));
    assert_eq!(notice.causation_id.as_deref(), Some(signed.id.as_str()));

    p.idle().await.unwrap();
    // Nothing failed anywhere.
    let failures: Vec<Settled> = p
        .settled()
        .into_iter()
        .filter(|s| !matches!(s, Settled::Handled { .. }))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_order_is_a_command_to_the_python_plugin() {
    let p = start().await;
    p.send("PlaceOrder", order("B-7", "bob", 5, 50_000))
        .await
        .unwrap();
    let screened = p
        .published("OrderScreened", json!({ "order_id": "B-7" }))
        .await
        .unwrap();
    assert_eq!(screened.json().unwrap()["verdict"], "review");
    let notify = p
        .sent("NotifyCustomer", json!({ "order_id": "B-7" }))
        .await
        .unwrap();
    let notice = p
        .published("CustomerNotified", json!({ "order_id": "B-7" }))
        .await
        .unwrap();
    assert_eq!(
        notice.json().unwrap()["text"],
        "order B-7 is on hold: large order"
    );
    assert_eq!(notice.causation_id.as_deref(), Some(notify.id.as_str()));
    p.idle().await.unwrap();
    // No receipt for a held order.
    assert!(p.settled().iter().all(|s| match s {
        Settled::Handled { outputs, .. } => outputs.iter().all(|o| o.message_type != "SignReceipt"),
        _ => true,
    }));
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_in_each_language_are_retried() {
    let p = start().await;
    // `flaky` fails once in the JavaScript, C and Python plugins alike.
    p.send("PlaceOrder", order("F-1", "flaky", 1, 500))
        .await
        .unwrap();
    let notice = p
        .published("CustomerNotified", json!({ "order_id": "F-1" }))
        .await
        .unwrap();
    assert_eq!(notice.json().unwrap()["customer"], "flaky");
    p.idle().await.unwrap();

    let settled = p.settled();
    for route in ["fraud", "receipts", "notices"] {
        let retried = settled
            .iter()
            .filter(|s| matches!(s, Settled::Retried { .. }) && s.route() == route)
            .count();
        let handled: Vec<u32> = settled
            .iter()
            .filter(|s| matches!(s, Settled::Handled { .. }) && s.route() == route)
            .map(|s| s.message().attempt)
            .collect();
        // Retried at once is one more attempt within the same delivery;
        // the handled attempt is the second.
        assert_eq!(
            (retried, handled.as_slice()),
            (0, &[2][..]),
            "{route}: {settled:?}"
        );
    }
    let signed = p
        .published("ReceiptSigned", json!({ "order_id": "F-1" }))
        .await
        .unwrap();
    assert_eq!(signed.json().unwrap()["checksum"], "crc32:78c86a84");
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_by_each_language() {
    let p = start().await;
    // Straight to each plugin, as a faulty producer would send them.
    let to_js = p
        .publish("OrderPlaced", json!({ "order_id": "M-1" }))
        .await
        .unwrap();
    let to_c = p
        .send("SignReceipt", json!({ "total_cents": 5 }))
        .await
        .unwrap();
    let to_python = p
        .send(
            "NotifyCustomer",
            json!({ "order_id": "M-3", "customer": "ada" }),
        )
        .await
        .unwrap();
    for (id, route, complaint) in [
        (
            to_js,
            "fraud",
            "OrderPlaced payload lacks customer, total_cents",
        ),
        (to_c, "receipts", "SignReceipt payload lacks order_id"),
        (to_python, "notices", "NotifyCustomer payload lacks reason"),
    ] {
        let dead = p.dead_letter(&id).await.unwrap();
        assert_eq!(dead.route, route);
        assert_eq!(dead.error.kind, "permanent", "{route}: {:?}", dead.error);
        assert_eq!(dead.error.code.as_deref(), Some("bad-payload"), "{route}");
        assert!(
            dead.error.message.contains(complaint),
            "{route}: {}",
            dead.error.message
        );
        // Permanent: one attempt, never retried.
        assert_eq!(dead.attempts.len(), 1, "{route}");
    }
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_runs_out_says_what_happened() {
    let p = start()
        .await
        .with_deadline(std::time::Duration::from_millis(500));
    p.send("PlaceOrder", order("Q-1", "ada", 1, 100))
        .await
        .unwrap();
    let err = p
        .published("OrderScreened", json!({ "order_id": "nope" }))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"no event OrderScreened matching {"order_id":"nope"} within 500ms"#),
        "{err}"
    );
    // The summary lists what was settled: here, at least the order.
    assert!(
        err.contains("orders PlaceOrder") && err.contains("handled → event OrderPlaced"),
        "{err}"
    );
    // A type of the other kind is refused before anything is sent.
    let err = p
        .send("OrderPlaced", json!({}))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "OrderPlaced is an event in pipeline polyglot, not a command"
    );
    p.stop().await.unwrap();
}
