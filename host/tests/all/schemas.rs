//! Event contracts: `[schemas]` checked on what plugins publish and send,
//! a violation dead-lettered with the schema's complaint; the same
//! contracts in `switchyard validate` and `switchyard test`.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use switchyard::config;
use switchyard::envelope::Kind;
use switchyard::runtime::{self, RunMode};
use switchyard::transport::Transport as _;

use crate::common::{bin, dead_letters, message, wasm, write_pipeline};

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["order_id", "total_cents"],
  "properties": { "total_cents": { "type": "integer", "maximum": 1000 } }
}"#;

fn orders(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    std::fs::write(dir.join("schemas").join("order-placed.json"), SCHEMA).unwrap();
    write_pipeline(
        dir,
        "contracts",
        r#"
        [host]
        cache_dir = "{cache}"
        [admin]
        listen = "off"
        [schemas]
        OrderPlaced = "schemas/order-placed.json"
        [plugins.orders]
        wasm = "{dist}/orders.wasm"
        commands = ["PlaceOrder"]
        [plugins.payments]
        wasm = "{dist}/payments.wasm"
        commands = ["ChargePayment"]
        "#,
    )
}

fn order(id: &str, cents: u64) -> switchyard::envelope::Envelope {
    message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": id, "customer": "ada", "items": [{"sku": "book", "quantity": 1, "unit_price_cents": cents}]}),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payload_that_breaks_its_schema_is_refused_and_dead_lettered_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let p = config::load(&orders(dir.path())).unwrap().pipeline;
    let transport = runtime::open_transport(&p).unwrap();
    let bad = order("A-2", 2400);
    transport
        .enqueue(vec![order("A-1", 900), bad.clone()])
        .await
        .unwrap();
    let plugins = runtime::load_plugins(&p).await.unwrap();
    runtime::run(&p, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();

    let letters = dead_letters(&p).await;
    assert_eq!(
        letters.len(),
        1,
        "only the order whose event breaks the contract"
    );
    let l = &letters[0];
    assert_eq!(l.message.id, bad.id);
    assert_eq!(l.route, "orders");
    assert_eq!(l.error.kind, "permanent");
    assert_eq!(l.error.code.as_deref(), Some("schema-violation"));
    assert!(
        l.error
            .message
            .contains("OrderPlaced does not match its schema (order-placed.json)")
            && l.error.message.contains("/total_cents")
            && l.error.message.contains("1000"),
        "{}",
        l.error.message
    );
    // Nothing of the refused call left: one charge only, for A-1.
    assert_eq!(l.attempts.len(), 1, "permanent: not retried");
}

#[test]
fn validate_and_test_use_the_same_contracts() {
    let dir = tempfile::tempdir().unwrap();
    let path = orders(dir.path());

    // A schema that is not a schema: validate names the file.
    std::fs::write(
        dir.path().join("schemas").join("order-placed.json"),
        "{\"type\": 12}",
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("order-placed.json is not a valid JSON Schema"),
        "{err}"
    );
    std::fs::write(dir.path().join("schemas").join("order-placed.json"), SCHEMA).unwrap();

    // `send` keeps the contract of the type it sends: nothing goes out.
    std::fs::write(
        dir.path().join("schemas").join("place-order.json"),
        r#"{"type": "object", "properties": {"items": {"type": "array", "minItems": 1}}}"#,
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[schemas]",
        "[schemas]\nPlaceOrder = \"schemas/place-order.json\"",
    );
    std::fs::write(&path, text).unwrap();
    let send = |data: &str| {
        Command::new(bin())
            .args(["send", "PlaceOrder", "-p"])
            .arg(&path)
            .args(["--data", data])
            .output()
            .unwrap()
    };
    let out = send(r#"{"order_id": "A-9", "customer": "ada", "items": []}"#);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not sent: PlaceOrder does not match its schema (place-order.json): /items"),
        "{err}"
    );
    let out = send(
        r#"{"order_id": "A-9", "customer": "ada", "items": [{"sku": "pen", "quantity": 1, "unit_price_cents": 150}]}"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // switchyard test with the pipeline's contracts, and a schema match.
    std::fs::write(
        dir.path().join("charge.json"),
        r#"{"type": "object", "required": ["order_id", "customer", "amount_cents"]}"#,
    )
    .unwrap();
    let tests = dir.path().join("orders.toml");
    std::fs::write(
        &tests,
        r#"
[[case]]
name = "a small order passes its contracts"
input = { type = "PlaceOrder", json = { order_id = "A-1", customer = "ada", items = [{ sku = "pen", quantity = 1, unit_price_cents = 150 }] } }
[case.expect]
published = [{ type = "OrderPlaced", schema = "schemas/order-placed.json" }]
sent = [{ type = "ChargePayment", schema = "charge.json" }]
reply = { json = { total_cents = 150 }, match = "subset" }

[[case]]
name = "a large order breaks the OrderPlaced contract"
input = { type = "PlaceOrder", json = { order_id = "A-2", customer = "ada", items = [{ sku = "book", quantity = 2, unit_price_cents = 1200 }] } }
expect = { error = "permanent", error_code = "schema-violation", error_contains = "/total_cents" }
"#,
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("test")
        .arg(wasm("orders"))
        .arg(&tests)
        .arg("-p")
        .arg(&path)
        .args(["--plugin", "orders"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 passed, 0 failed"), "{text}");

    // Without the pipeline, the large order is not checked: that case fails.
    let out = Command::new(bin())
        .arg("test")
        .arg(wasm("orders"))
        .arg(&tests)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("expected a permanent failure; the handler succeeded"),
        "{text}"
    );
}
