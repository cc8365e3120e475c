//! The embedded store's schema across versions.

use serde_json::json;
use switchyard::config;
use switchyard::envelope::Kind;
use switchyard::runtime;
use switchyard::transport::Transport;

use crate::common::{message, write_pipeline};

/// The schema the first version of the embedded store wrote.
const VERSION_1: &str = "
CREATE TABLE queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, id TEXT NOT NULL,
    type TEXT NOT NULL, kind TEXT NOT NULL, payload BLOB NOT NULL, content_type TEXT NOT NULL,
    headers TEXT NOT NULL, correlation_id TEXT, causation_id TEXT, reply_to TEXT, partition_key TEXT,
    created_at_ms INTEGER NOT NULL, attempt INTEGER NOT NULL, enqueued_at_ms INTEGER NOT NULL);
CREATE INDEX queue_by_route ON queue (route, seq);
CREATE TABLE failed (seq INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, id TEXT NOT NULL,
    type TEXT NOT NULL, kind TEXT NOT NULL, payload BLOB NOT NULL, content_type TEXT NOT NULL,
    headers TEXT NOT NULL, correlation_id TEXT, causation_id TEXT, reply_to TEXT, partition_key TEXT,
    created_at_ms INTEGER NOT NULL, attempt INTEGER NOT NULL, error_kind TEXT NOT NULL,
    error_message TEXT NOT NULL, error_code TEXT, error_details TEXT NOT NULL, backtrace TEXT,
    plugin TEXT NOT NULL, plugin_digest TEXT NOT NULL, failed_at_ms INTEGER NOT NULL);
CREATE TABLE replies (seq INTEGER PRIMARY KEY AUTOINCREMENT, address TEXT NOT NULL,
    in_reply_to TEXT NOT NULL, correlation_id TEXT NOT NULL, payload BLOB NOT NULL,
    content_type TEXT NOT NULL, headers TEXT NOT NULL, created_at_ms INTEGER NOT NULL);
INSERT INTO queue (route, id, type, kind, payload, content_type, headers, created_at_ms, attempt, enqueued_at_ms)
    VALUES ('echo', 'old-1', 'Tick', 'event', x'7b7d', 'application/json', '[]', 1, 1, 1);
PRAGMA user_version = 1;
";

#[tokio::test(flavor = "multi_thread")]
async fn a_store_of_the_first_version_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("old.db"))
        .unwrap()
        .execute_batch(VERSION_1)
        .unwrap();
    let path = write_pipeline(
        dir.path(),
        "old",
        r#"
        [host]
        cache_dir = "{cache}"
        [transport]
        path = "old.db"
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        events = ["Tick"]
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    transport
        .enqueue(vec![message(Kind::Event, "Tick", json!(2))])
        .await
        .unwrap();
    assert_eq!(
        transport.depths().await.unwrap(),
        vec![("echo".to_owned(), 2)]
    );
    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    runtime::run(
        &pipeline,
        plugins,
        runtime::RunMode::Drain,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert!(
        transport.is_idle().await.unwrap(),
        "the old message and the new one were handled"
    );
    let db = rusqlite::Connection::open(dir.path().join("old.db")).unwrap();
    let version: i64 = db
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 6);
    // Version 3 keeps plugin state, version 4 saga instances and steps,
    // version 5 counts them by status, version 6 has the journal's batch
    // rows.
    let index: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'saga_instances_by_status'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(index, 1);
    for table in ["state", "saga_instances", "saga_steps"] {
        let rows: i64 = db
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "{table}");
    }
}
