//! Routes with `concurrency` above 1: several warm instances handle a
//! batch side by side, and what is settled is what one instance handling
//! the batch in order would have settled: no update of a shared state key
//! is lost, each key's messages keep their order, and saga instances step
//! one version at a time.

use serde_json::json;
use switchyard::envelope::{Envelope, Kind};
use switchyard::saga::Status;
use switchyard::state::Reader;

use crate::common::{dead_letters, message};

fn counter(concurrency: usize) -> String {
    format!(
        r#"
    [plugins.counter]
    wasm = "{{dist}}/counter.wasm"
    events = ["Count", "Store", "Forget", "Bump"]
    commands = ["Total"]
    concurrency = {concurrency}
    retry = {{ immediate = 1, delayed = 0 }}
"#
    )
}

fn count(key: &str, partition_key: Option<&str>) -> Envelope {
    let mut e = message(Kind::Event, "Count", json!({ "key": key }));
    e.partition_key = partition_key.map(str::to_owned);
    e
}

fn reader(pipeline: &switchyard::config::Pipeline) -> std::sync::Arc<dyn Reader> {
    let switchyard::config::TransportConfig::Embedded(e) = &pipeline.transport else {
        panic!("not embedded");
    };
    switchyard::state::sqlite::SqliteState::reader(&e.path)
}

fn value(r: &dyn Reader, key: &str) -> Option<String> {
    r.get("counter", key)
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn lanes_that_share_state_keys_lose_no_update_and_keep_each_keys_order() {
    let dir = tempfile::tempdir().unwrap();
    // Five keys; the messages of `a`..`c` carry no partition key, so they
    // are dealt to the lanes in turn and two lanes often count the same
    // key in one batch. Those of `d` and `e` carry their key as partition
    // key and stay in one lane each.
    let keys = ["a", "b", "c", "d", "e"];
    let mut messages = Vec::new();
    for i in 0..2_000 {
        let key = keys[i % keys.len()];
        let partition = matches!(key, "d" | "e").then_some(key);
        messages.push(count(key, partition));
    }
    let last: std::collections::BTreeMap<&str, String> = keys
        .iter()
        .map(|k| {
            let id = messages
                .iter()
                .rev()
                .find(|e| e.payload == serde_json::to_vec(&json!({ "key": k })).unwrap())
                .unwrap()
                .id
                .clone();
            (*k, id)
        })
        .collect();
    let (_, pipeline) =
        crate::common::drain_embedded(dir.path(), "lanes", &counter(4), messages).await;

    let state = reader(&pipeline);
    for k in keys {
        assert_eq!(
            value(state.as_ref(), &format!("count:{k}")).as_deref(),
            Some("400"),
            "count:{k}"
        );
        // The last message of each key wrote last, as in order.
        assert_eq!(
            value(state.as_ref(), &format!("last:{k}")),
            Some(format!("\"{}\"", last[k])),
            "last:{k}"
        );
    }
    assert!(dead_letters(&pipeline).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn saga_instances_step_one_version_at_a_time_on_lanes() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"
    [plugins.ledger]
    wasm = "{dist}/ledger.wasm"
    events = ["Open", "Add", "Close", "Reject", "Peek", "Remind", "Expire", "Charge", "Debit.Fault"]
    concurrency = 3
    retry = { immediate = 0, delayed = 0 }
    [plugins.ledger.saga]
    starts = ["Open"]
    instance_key = "$.id"

    [plugins.bank]
    wasm = "{dist}/bank.wasm"
    commands = ["Debit"]
"#;
    let ids: Vec<String> = (0..30).map(|i| format!("L-{i}")).collect();
    let mut messages: Vec<Envelope> = ids
        .iter()
        .map(|id| message(Kind::Event, "Open", json!({ "id": id })))
        .collect();
    // Each instance's adds are spread through the queue, between the
    // others'.
    for n in 1..=10 {
        for id in &ids {
            messages.push(message(Kind::Event, "Add", json!({ "id": id, "n": n })));
        }
    }
    messages.extend(
        ids.iter()
            .map(|id| message(Kind::Event, "Close", json!({ "id": id }))),
    );
    let (_, pipeline) = crate::common::drain_embedded(dir.path(), "lanes", body, messages).await;

    let state = reader(&pipeline);
    for id in &ids {
        let instance = state.instance("ledger", id).unwrap().unwrap();
        assert_eq!(instance.status, Status::Completed, "{id}");
        // Open, ten adds, close: one step each.
        assert_eq!(instance.version, 12, "{id}");
        let steps = state.steps("ledger", id).unwrap();
        let versions: Vec<u64> = steps.iter().map(|s| s.version()).collect();
        assert_eq!(versions, (1..=12).collect::<Vec<u64>>(), "{id}");
        let total = state
            .get("ledger", &switchyard::saga::stored_key(id, "total"))
            .unwrap()
            .unwrap();
        assert_eq!(total, b"55", "{id}");
    }
    assert!(dead_letters(&pipeline).await.is_empty());
}

#[test]
fn concurrency_out_of_range_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "65", "\"two\""] {
        let path = crate::common::write_pipeline(
            dir.path(),
            "bad",
            &format!(
                "[plugins.counter]\nwasm = \"{{dist}}/counter.wasm\"\nevents = [\"Count\"]\nconcurrency = {bad}\n"
            ),
        );
        let err = format!("{:#}", switchyard::config::load(&path).unwrap_err());
        assert!(err.contains("concurrency"), "{bad}: {err}");
    }
}
