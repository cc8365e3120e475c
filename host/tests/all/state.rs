//! Plugin state on a running host: committed with the message's outcome,
//! never what a failed attempt wrote, limits that fail the message, on the
//! embedded store and on RabbitMQ with PostgreSQL.

use serde_json::json;
use switchyard::config;
use switchyard::envelope::{Envelope, Kind};
use switchyard::runtime;
use switchyard::state::Reader;

use crate::common::{dead_letters, message, write_pipeline};

const COUNTER: &str = r#"
    [plugins.counter]
    wasm = "{dist}/counter.wasm"
    events = ["Count", "Store", "Forget", "Bump"]
    commands = ["Total"]
    retry = { immediate = 1, delayed = 0 }
"#;

fn count(key: &str, fail: Option<&str>) -> Envelope {
    message(Kind::Event, "Count", json!({ "key": key, "fail": fail }))
}

fn text(value: Option<Vec<u8>>) -> Option<String> {
    value.map(|v| String::from_utf8(v).unwrap())
}

/// Runs `messages` through an embedded pipeline with the counter until
/// none is left; returns the pipeline.
async fn run_embedded(
    dir: &std::path::Path,
    extra: &str,
    messages: Vec<Envelope>,
) -> config::Pipeline {
    crate::common::drain_embedded(dir, "state", &format!("{COUNTER}\n{extra}"), messages)
        .await
        .1
}

fn embedded_state(
    pipeline: &config::Pipeline,
) -> std::sync::Arc<switchyard::state::sqlite::SqliteState> {
    let config::TransportConfig::Embedded(e) = &pipeline.transport else {
        panic!("not embedded");
    };
    switchyard::state::sqlite::SqliteState::reader(&e.path)
}

#[tokio::test(flavor = "multi_thread")]
async fn state_commits_with_the_outcome_and_a_failed_attempt_leaves_none() {
    let dir = tempfile::tempdir().unwrap();
    // Many messages, so that batches see what earlier messages of the same
    // batch wrote before it is committed.
    let mut messages: Vec<Envelope> = (0..500).map(|_| count("a", None)).collect();
    // Fails its first attempt after writing, succeeds on the retry.
    messages.extend((0..3).map(|_| count("b", Some("first"))));
    // Fails for good after writing.
    let doomed = count("c", Some("always"));
    messages.push(doomed.clone());
    let last_a = messages[499].id.clone();
    let pipeline = run_embedded(dir.path(), "", messages).await;

    let state = embedded_state(&pipeline);
    assert_eq!(
        text(state.get("counter", "count:a").unwrap()).as_deref(),
        Some("500")
    );
    assert_eq!(
        text(state.get("counter", "last:a").unwrap()),
        Some(format!("\"{last_a}\""))
    );
    // Written twice (once per attempt), counted once.
    assert_eq!(
        text(state.get("counter", "count:b").unwrap()).as_deref(),
        Some("3")
    );
    assert_eq!(state.get("counter", "count:c").unwrap(), None);
    assert_eq!(
        state.keys("counter", "count:", None, 10).unwrap(),
        ["count:a", "count:b"]
    );
    let failed = dead_letters(&pipeline).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].message.id, doomed.id);

    // What the operator sees.
    let source = pipeline.source.to_str().unwrap();
    let out = std::process::Command::new(crate::common::bin())
        .args([
            "state", "list", "-p", source, "counter", "--prefix", "count:",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text, "count:a  500\ncount:b  3\n");
    let out = std::process::Command::new(crate::common::bin())
        .args(["state", "get", "-p", source, "counter", "count:c"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key \"count:c\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn state_over_its_limits_fails_the_message_as_a_contract_violation() {
    let dir = tempfile::tempdir().unwrap();
    let limits = "    max_state_value = \"1 KiB\"\n    max_state_keys = 10\n";
    let big = message(Kind::Event, "Store", json!({ "key": "big", "bytes": 1025 }));
    let many = message(Kind::Event, "Store", json!({ "key": "", "keys": 11 }));
    let fits = message(
        Kind::Event,
        "Store",
        json!({ "key": "fits", "bytes": 1024 }),
    );
    let ten = message(Kind::Event, "Store", json!({ "key": "", "keys": 10 }));
    // Keys at their limits: 1 to 1,024 bytes.
    let longest = "k".repeat(1024);
    let long_key = message(Kind::Event, "Store", json!({ "key": longest, "bytes": 1 }));
    let too_long = message(
        Kind::Event,
        "Store",
        json!({ "key": "k".repeat(1025), "bytes": 1 }),
    );
    let empty = message(Kind::Event, "Store", json!({ "key": "", "bytes": 1 }));
    let pipeline = run_embedded(
        dir.path(),
        &format!("[defaults]\n{limits}"),
        vec![
            big.clone(),
            many.clone(),
            fits,
            ten,
            long_key,
            too_long.clone(),
            empty.clone(),
        ],
    )
    .await;
    let state = embedded_state(&pipeline);
    assert_eq!(state.get("counter", "big").unwrap(), None);
    assert_eq!(
        state.get("counter", "fits").unwrap().map(|v| v.len()),
        Some(1024)
    );
    assert_eq!(state.keys("counter", "bulk:", None, 100).unwrap().len(), 10);

    assert_eq!(state.get("counter", &longest).unwrap(), Some(b"x".to_vec()));
    let failed = dead_letters(&pipeline).await;
    assert_eq!(failed.len(), 4, "{failed:?}");
    let of = |id: &str| failed.iter().find(|d| d.message.id == id).unwrap();
    let big_error = &of(&big.id).error;
    assert_eq!(big_error.kind, "contract-violation");
    assert!(
        big_error
            .message
            .contains("over its limit of 1 KiB (max_state_value)"),
        "{}",
        big_error.message
    );
    let many_error = &of(&many.id).error;
    assert_eq!(many_error.kind, "contract-violation");
    assert!(
        many_error.message.contains("more than 10 state keys"),
        "{}",
        many_error.message
    );
    let too_long_error = &of(&too_long.id).error;
    assert_eq!(too_long_error.kind, "contract-violation");
    assert!(
        too_long_error
            .message
            .contains("a state key of 1025 bytes (at most 1024)"),
        "{}",
        too_long_error.message
    );
    let empty_error = &of(&empty.id).error;
    assert_eq!(empty_error.kind, "contract-violation");
    assert!(
        empty_error.message.contains("an empty state key"),
        "{}",
        empty_error.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_state_section_is_refused_on_the_embedded_transport() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "state",
        &format!("{COUNTER}\n[state]\nurl = \"postgres://127.0.0.1/test\"\n"),
    );
    let Err(e) = config::load(&path) else {
        panic!("a [state] table on the embedded transport loaded");
    };
    let text = format!("{e:#}");
    assert!(
        text.contains("`[state]` is for broker transports"),
        "{text}"
    );
}

/// A PostgreSQL schema of its own for one test.
pub(crate) fn schema() -> String {
    format!(
        "state_test_{}",
        // The random end of the id: its start is the time, which two
        // tests can share.
        switchyard::envelope::new_id().replace('-', "")[20..].to_owned()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn on_rabbitmq_state_commits_to_postgresql_before_the_ack() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let (_, pipeline) = crate::amqp::pipeline(
        dir.path(),
        &format!(
            "{COUNTER}\n[state]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\n"
        ),
    );
    let transport = runtime::open(&pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    let mut messages: Vec<Envelope> = (0..300)
        .map(|i| count(if i % 2 == 0 { "even" } else { "odd" }, None))
        .collect();
    messages.push(count("odd", Some("first")));
    transport.enqueue(messages).await.unwrap();
    crate::amqp::drain(&pipeline).await;

    let config::StoreConfig::Postgres { url, schema } = &pipeline.state.store else {
        panic!("not a PostgreSQL state store");
    };
    let (client, connection) =
        tokio_postgres::connect(&url.resolve("state").unwrap(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let rows = client
        .query(
            &format!("SELECT key, convert_from(value, 'UTF8') FROM {schema}.plugin_state WHERE pipeline = $1 AND plugin = 'counter' AND key LIKE 'count:%' ORDER BY key"),
            &[&pipeline.name],
        )
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [
            ("count:even".to_owned(), "150".to_owned()),
            ("count:odd".to_owned(), "151".to_owned())
        ]
    );
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
    crate::amqp::clean_up(&pipeline).await;
}

/// The same message delivered three times, twice in one batch (as a
/// producer's retries or a broker's redelivery after a lost ack do):
/// handled three times by a plain plugin, once by an exactly-once one, whose recorded output goes out again with its
/// id and is itself not handled twice.
async fn duplicate_on_rabbitmq(exactly_once: bool, store: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (_, pipeline) = crate::amqp::pipeline(
        dir.path(),
        &format!(
            r#"
    [plugins.counter]
    wasm = "{{dist}}/counter.wasm"
    events = ["Count", "Counted"]
    exactly_once = {exactly_once}
    {store}
"#
        ),
    );
    let transport = runtime::open(&pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    let m = count("a", None);
    // Two copies in one batch, then a third after the first was handled.
    for copies in [2, 1] {
        transport.enqueue(vec![m.clone(); copies]).await.unwrap();
        crate::amqp::drain(&pipeline).await;
    }
    let state = switchyard::state::open(&pipeline.state, &pipeline.name)
        .await
        .unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let read = |key: &str| text(state.get("counter", key).unwrap()).unwrap_or_default();
        (read("count:a"), read("seen"))
    })
    .await
    .unwrap();
    if let config::StoreConfig::Postgres { url, schema } = &pipeline.state.store {
        let (client, connection) =
            tokio_postgres::connect(&url.resolve("state").unwrap(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        let done: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {schema}.processed_messages WHERE pipeline = $1 AND message_id = $2"),
                &[&pipeline.name, &m.id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(done, 1, "the message is recorded as done once");
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
    crate::amqp::clean_up(&pipeline).await;
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exactly_once_plugin_does_not_handle_a_redelivery_again() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let postgres = format!(
        "[state]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{}\"",
        schema()
    );
    let (count, seen) = duplicate_on_rabbitmq(true, &postgres).await;
    assert_eq!((count.as_str(), seen.as_str()), ("1", "1"));
    // The same on the default SQLite state file.
    let (count, seen) = duplicate_on_rabbitmq(true, "").await;
    assert_eq!((count.as_str(), seen.as_str()), ("1", "1"));
    // A plain plugin handles every copy, and each output (new ids each).
    let (count, seen) = duplicate_on_rabbitmq(false, "").await;
    assert_eq!((count.as_str(), seen.as_str()), ("3", "3"));
}
