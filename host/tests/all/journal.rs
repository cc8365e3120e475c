//! The journal and `switchyard why`: a record of every handling, written in
//! the settle transaction on the embedded transport and by the writer on
//! RabbitMQ (journal in PostgreSQL) and Kafka (journal in a SQLite file),
//! read back as the story of a retried payment and of a dead-lettered order.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use switchyard::cli::why::{self, Story};
use switchyard::config::{self, Pipeline};
use switchyard::envelope::{Envelope, Kind};
use switchyard::journal::{self, Outcome, Record};
use switchyard::runtime::{self, RunMode};

use crate::common::{bin, dead_letters, message, write_pipeline};
use crate::dead_letters::{ORDERS, Scratch, order, postgres_url};

fn load(path: &Path) -> Pipeline {
    config::load(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .pipeline
}

/// Queues `messages` on the pipeline's transport and runs it until every
/// queue is empty.
async fn run(p: &Pipeline, messages: Vec<Envelope>) {
    let transport = runtime::open(p).await.unwrap();
    transport.start_consuming().await.unwrap();
    transport.enqueue(messages).await.unwrap();
    drop(transport);
    let plugins = runtime::load_plugins(p).await.unwrap();
    runtime::run(p, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
}

async fn story(p: &Pipeline, id: &str) -> Story {
    let journal = journal::open(&p.journal, &p.name).await.unwrap();
    let letters = switchyard::dlq::open(&p.dead_letters, &p.name)
        .await
        .unwrap();
    why::story_of(journal, letters, id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("the journal knows {id}"))
}

/// `switchyard why ARGS -p PIPELINE`: whether it succeeded, its stdout
/// and its stderr.
fn why_cli(pipeline: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("why")
        .args(args)
        .arg("-p")
        .arg(pipeline)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn node<'a>(story: &'a Story, message_type: &str) -> &'a why::Node {
    story
        .messages
        .iter()
        .find(|n| n.message_type == message_type)
        .unwrap_or_else(|| panic!("{message_type} in the story: {story:#?}"))
}

fn outcomes(records: &[Record]) -> Vec<(&str, Outcome)> {
    records
        .iter()
        .map(|r| (r.plugin.as_str(), r.outcome))
        .collect()
}

/// A payment that times out twice (retried at once, then later) and is
/// then handled, and an order that is poison: what the journal says of
/// each, whatever the transport and the journal's store.
async fn retried_payment_and_dead_order(p: &Pipeline) {
    let paid = order("R-1", 4513);
    let poison = message(Kind::Command, "PlaceOrder", json!({"order_id": 42}));
    run(p, vec![paid.clone(), poison.clone()]).await;

    let s = story(p, &paid.id).await;
    assert_eq!(s.messages[0].id, paid.id, "the order started the flow");
    let placed = node(&s, "PlaceOrder");
    assert_eq!(outcomes(&placed.handlings), [("orders", Outcome::Handled)]);
    let r = &placed.handlings[0];
    assert_eq!(r.attempt, 1);
    assert_eq!(r.kind, "command");
    assert!(
        r.plugin_digest.starts_with("sha256:"),
        "{}",
        r.plugin_digest
    );
    assert!(!r.host.is_empty());
    let mut sent: Vec<&str> = r.sent.iter().map(|m| m.message_type.as_str()).collect();
    sent.sort_unstable();
    assert_eq!(sent, ["ChargePayment", "OrderPlaced"]);

    // Both consumers of the event, once each.
    let mut by: Vec<(&str, Outcome)> = outcomes(&node(&s, "OrderPlaced").handlings);
    by.sort_unstable_by_key(|(p, _)| *p);
    assert_eq!(
        by,
        [
            ("inventory", Outcome::Handled),
            ("notifications", Outcome::Handled)
        ]
    );

    // The payment: two tries in the first handling, then handled on 3.
    let charge = node(&s, "ChargePayment");
    assert_eq!(charge.causation_id.as_deref(), Some(paid.id.as_str()));
    assert_eq!(
        outcomes(&charge.handlings),
        [
            ("payments", Outcome::RetriedLater),
            ("payments", Outcome::Handled)
        ]
    );
    let first = &charge.handlings[0];
    assert_eq!(
        first
            .failures
            .iter()
            .map(|t| (t.number, t.then.as_str()))
            .collect::<Vec<_>>(),
        [(1, "retry-now"), (2, "retry-later")]
    );
    assert_eq!(first.attempt, 2);
    assert!(first.retry_at_ms.is_some_and(|t| t >= first.at_ms));
    let error = first.error.as_ref().expect("the error it ended with");
    assert_eq!(error.kind, "transient");
    let second = &charge.handlings[1];
    assert_eq!(second.attempt, 3);
    assert!(second.failures.is_empty(), "{:?}", second.failures);
    assert_eq!(second.sent.len(), 1);
    assert_eq!(second.sent[0].message_type, "PaymentCaptured");
    let captured = node(&s, "PaymentCaptured");
    assert_eq!(captured.causation_id.as_deref(), Some(charge.id.as_str()));
    assert_eq!(
        outcomes(&captured.handlings),
        [("notifications", Outcome::Handled)]
    );
    // Every message of the flow carries the flow's correlation.
    for n in &s.messages {
        for r in &n.handlings {
            assert_eq!(r.flow_id(), paid.id, "{r:?}");
        }
    }
    // Asked about the payment, the story starts where the flow did.
    let from_charge = story(p, &charge.id).await;
    assert_eq!(from_charge.subject, charge.id);
    assert_eq!(from_charge.messages[0].id, paid.id);
    let told = why::tell(&from_charge);
    assert!(
        told.starts_with(&format!(
            "ChargePayment {} (command): handled by payments.",
            charge.id
        )),
        "{told}"
    );
    assert!(told.contains("retry due at"), "{told}");
    assert!(
        told.contains(&format!(
            "handled by payments@{} on attempt 3",
            second.plugin_version
        )),
        "{told}"
    );

    // The poison order: dead-lettered on its first attempt, the record
    // named and as it is now.
    let letters = dead_letters(p).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    let s = story(p, &poison.id).await;
    assert_eq!(s.messages.len(), 1, "{s:#?}");
    let n = &s.messages[0];
    assert_eq!(outcomes(&n.handlings), [("orders", Outcome::DeadLettered)]);
    let r = &n.handlings[0];
    assert_eq!(r.dead_letter.as_deref(), Some(letter.id.as_str()));
    assert_eq!(
        r.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("malformed-payload")
    );
    assert_eq!(n.dead_letters.len(), 1);
    assert_eq!(n.dead_letters[0].status, "dead");
    let told = why::tell(&s);
    assert!(
        told.contains(&format!("dead-lettered in orders as {}", letter.id)),
        "{told}"
    );
    // The dead-letter record's id finds the same story.
    let by_record = story(p, &letter.id).await;
    assert_eq!(by_record.subject, poison.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_journal_tells_the_story_from_the_settle_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "orders",
        &format!("[host]\ncache_dir = \"{{cache}}\"\n{ORDERS}"),
    );
    let p = load(&path);
    assert!(p.journal.enabled, "the journal is on by default");
    retried_payment_and_dead_order(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_journal_in_postgresql_tells_the_same_story() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let scratch = Scratch::new();
    let (_, p) = crate::amqp::pipeline(
        dir.path(),
        &format!(
            "[journal]\nurl = \"{}\"\nschema = \"{}\"\n{ORDERS}",
            postgres_url(),
            scratch.schema
        ),
    );
    assert!(matches!(
        p.journal.store,
        config::StoreConfig::Postgres { .. }
    ));
    retried_payment_and_dead_order(&p).await;
    crate::amqp::clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_journal_in_its_own_file_tells_the_same_story() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = crate::kafka::pipeline(dir.path(), ORDERS);
    match &p.journal.store {
        config::StoreConfig::Embedded { path } => assert!(
            path.ends_with(format!(".switchyard/{}-journal.db", p.name)),
            "{}",
            path.display()
        ),
        other => panic!("{other:?}"),
    }
    retried_payment_and_dead_order(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn why_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "orders",
        &format!("[host]\ncache_dir = \"{{cache}}\"\n{ORDERS}"),
    );
    let p = load(&path);
    let poison = message(Kind::Command, "PlaceOrder", json!({"order_id": 42}));
    // A client that names the message as its own cause: the story still
    // ends.
    let mut looped = order("L-1", 100);
    looped.causation_id = Some(looped.id.clone());
    run(&p, vec![poison.clone(), looped.clone()]).await;

    let why = |args: &[&str]| why_cli(&path, args);
    let (ok, out, err) = why(&[&poison.id]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!(
            "PlaceOrder {} (command): dead-lettered in orders as ",
            poison.id
        )),
        "{out}"
    );
    assert!(out.contains("malformed-payload"), "{out}");
    // A prefix of the id will do.
    let (ok, short_out, err) = why(&[&poison.id[..32]]);
    assert!(ok, "{err}");
    assert_eq!(short_out, out);

    let (ok, out, err) = why(&[&looped.id, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["subject"], looped.id.as_str());
    assert_eq!(v["messages"][0]["id"], looped.id.as_str());
    assert_eq!(v["messages"][0]["handlings"][0]["outcome"], "handled");

    let (ok, out, err) = why(&["0000-no-such-message"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("No message `0000-no-such-message` is known. Searched: journal in "),
        "{err}"
    );

    let (ok, out, err) = why(&["--correlation", &looped.id]);
    assert!(ok, "{err}");
    assert!(out.contains("OrderPlaced"), "{out}");
    assert!(out.contains("ChargePayment"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn payloads_are_kept_only_when_asked_and_clipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "orders",
        &format!(
            "[host]\ncache_dir = \"{{cache}}\"\n[journal]\npayloads = true\nmax_payload = 16\n{ORDERS}"
        ),
    );
    let p = load(&path);
    let poison = message(Kind::Command, "PlaceOrder", json!({"order_id": 42}));
    run(&p, vec![poison.clone()]).await;
    let s = story(&p, &poison.id).await;
    let kept = s.messages[0].handlings[0]
        .payload
        .as_ref()
        .expect("payloads = true");
    assert_eq!(kept.text.as_deref(), Some(r#"{"order_id":42}"#));
    assert!(!kept.truncated);

    let big = order("B-1", 100);
    run(&p, vec![big.clone()]).await;
    let s = story(&p, &big.id).await;
    let kept = s.messages[0].handlings[0].payload.as_ref().unwrap();
    assert_eq!(kept.text.as_deref().map(str::len), Some(16));
    assert!(kept.truncated);
    assert_eq!(kept.size, big.payload.len() as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_turned_off_records_nothing_and_why_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "orders",
        &format!("[host]\ncache_dir = \"{{cache}}\"\n[journal]\nenabled = false\n{ORDERS}"),
    );
    let p = load(&path);
    run(&p, vec![order("O-1", 100)]).await;
    let j = journal::sqlite::SqliteJournal::open(&p.embedded().unwrap().path).unwrap();
    use switchyard::journal::Store as _;
    assert_eq!(j.count().await.unwrap(), 0);
    let out = Command::new(bin())
        .args(["why", "anything", "-p"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the journal is off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_that_cannot_be_opened_stops_no_message() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let (_, p) = crate::amqp::pipeline(
        dir.path(),
        &format!("[journal]\nurl = \"postgres://postgres@127.0.0.1:1/test\"\n{ORDERS}"),
    );
    run(&p, vec![order("N-1", 100)]).await;
    assert!(dead_letters(&p).await.is_empty());
    crate::amqp::clean_up(&p).await;
}

fn record(at_ms: u64, id: &str) -> Record {
    Record {
        at_ms,
        message_id: id.into(),
        message_type: "T".into(),
        kind: "event".into(),
        plugin: "p".into(),
        plugin_version: "1".into(),
        plugin_digest: "sha256:00".into(),
        attempt: 1,
        outcome: Outcome::Handled,
        took_us: 5,
        failures: Vec::new(),
        error: None,
        retry_at_ms: None,
        dead_letter: None,
        replay_of: None,
        sent: Vec::new(),
        replied: false,
        saga_instance: None,
        correlation_id: Some("flow".into()),
        causation_id: None,
        trace_id: None,
        host: "h".into(),
        payload: None,
        attributes: Vec::new(),
    }
}

/// Retention by age, then by count, on a store.
async fn prunes_by_age_then_by_count(store: Arc<dyn journal::Store>) {
    store
        .write((1..=10).map(|i| record(i, &format!("m{i:02}"))).collect())
        .await
        .unwrap();
    assert_eq!(store.count().await.unwrap(), 10);
    // Older than 6: five go.
    assert_eq!(store.prune(6, 1000).await.unwrap(), 5);
    assert_eq!(store.count().await.unwrap(), 5);
    assert!(store.of_message("m05").await.unwrap().is_empty());
    // At most two: the newest stay.
    assert_eq!(store.prune(0, 2).await.unwrap(), 3);
    let left: Vec<String> = store
        .of_flow("flow", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.message_id)
        .collect();
    assert_eq!(left, ["m09", "m10"]);
    assert_eq!(store.ids_like("m1", 10).await.unwrap(), ["m10"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_journal_prunes_by_age_then_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = journal::sqlite::SqliteJournal::open(&dir.path().join("j.db")).unwrap();
    prunes_by_age_then_by_count(Arc::new(store)).await;
}

/// 600 records in one write: batch rows of at most 256, records of two
/// plugin versions and hosts mixed in them and one without a version,
/// every one read back whole through each index, then pruned from the
/// middle of a row.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_journal_reads_back_every_record_of_its_batches_whole() {
    use switchyard::journal::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let store = journal::sqlite::SqliteJournal::open(&dir.path().join("j.db")).unwrap();
    let written: Vec<Record> = (0..600u64)
        .map(|i| {
            let mut r = record(1_000 + i, &format!("m{i:03}"));
            if i % 7 == 0 {
                // Not what the batch's header says: kept in its own line.
                r.plugin_version = "2".into();
                r.plugin_digest = "sha256:11".into();
                r.host = "other".into();
            }
            if i == 400 {
                // Empty where the header has a value: a row of its own.
                r.plugin_version = String::new();
            }
            r.correlation_id = Some(format!("flow-{}", i % 3));
            r.causation_id = (i > 0).then(|| format!("m{:03}", i - 1));
            r.attributes = vec![("order.id".into(), format!("O-{}", i % 10))];
            r.sent = vec![journal::Sent {
                id: format!("out-{i}"),
                message_type: "Out\n\"quoted\"".into(),
                kind: "event".into(),
            }];
            r
        })
        .collect();
    store.write(written.clone()).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 600);
    // Every record through the message index: its entries are added many
    // to a statement, so a slip at a chunk's edge would lose some.
    for (i, r) in written.iter().enumerate() {
        let id = format!("m{i:03}");
        assert_eq!(
            store.of_message(&id).await.unwrap(),
            std::slice::from_ref(r),
            "{id}"
        );
    }
    // And through the cause and flow indexes, whole.
    for i in 0..written.len() {
        let id = format!("m{i:03}");
        let caused = store
            .caused_by(std::slice::from_ref(&id), 10)
            .await
            .unwrap();
        assert_eq!(
            caused,
            written.get(i + 1).cloned().into_iter().collect::<Vec<_>>(),
            "{id}"
        );
    }
    for f in 0..3 {
        let flow = store.of_flow(&format!("flow-{f}"), 1000).await.unwrap();
        assert_eq!(flow.len(), 200);
        assert!(
            flow.iter()
                .zip(written.iter().skip(f).step_by(3))
                .all(|(a, b)| a == b),
            "flow-{f}"
        );
    }
    let tagged = store.with_attribute("order.id", "O-3", 1000).await.unwrap();
    assert_eq!(tagged.len(), 60);
    assert_eq!(tagged[0], written[593]);
    // The cut falls inside the second batch row.
    assert_eq!(store.prune(1_300, 1_000_000).await.unwrap(), 300);
    assert_eq!(store.count().await.unwrap(), 300);
    assert!(store.of_message("m299").await.unwrap().is_empty());
    assert_eq!(
        store.of_message("m300").await.unwrap(),
        [written[300].clone()]
    );
    assert_eq!(
        store
            .with_attribute("order.id", "O-3", 1000)
            .await
            .unwrap()
            .len(),
        30
    );
    assert_eq!(store.of_flow("flow-1", 1000).await.unwrap().len(), 100);
    assert_eq!(
        store.ids_like("m29", 100).await.unwrap(),
        Vec::<String>::new()
    );
    // Numbering goes on after the pruned ones.
    store.write(vec![record(5_000, "late")]).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 301);
    assert_eq!(
        store.of_message("late").await.unwrap(),
        [record(5_000, "late")]
    );
}

/// A file an earlier version wrote (a row per record in `journal`) is
/// moved into batches when opened, and reads the same.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_journal_reads_the_files_of_earlier_versions() {
    use switchyard::journal::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let mut old = record(7, "m1");
    old.causation_id = Some("m0".into());
    old.attributes = vec![
        ("customer".into(), "C-1".into()),
        ("order.id".into(), "O-1".into()),
    ];
    // The earlier version's tables, as it created them; its first record
    // is number 1.
    let old_insert = "INSERT INTO journal (at_ms, message_id, correlation_id, causation_id, record) VALUES (?1, ?2, ?3, ?4, ?5)";
    let old_attribute = "INSERT OR REPLACE INTO journal_attributes VALUES (?1, ?2, ?3)";
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE journal (seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, message_id TEXT NOT NULL,
                correlation_id TEXT, causation_id TEXT, record TEXT NOT NULL);
             CREATE INDEX journal_by_message ON journal (message_id);
             CREATE TABLE journal_attributes (seq INTEGER NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
                PRIMARY KEY (seq, name)) WITHOUT ROWID;",
        )
        .unwrap();
        conn.execute(
            old_insert,
            rusqlite::params![7, "m1", "flow", "m0", serde_json::to_string(&old).unwrap()],
        )
        .unwrap();
        assert_eq!(conn.last_insert_rowid(), 1);
        for (name, value) in &old.attributes {
            conn.execute(old_attribute, rusqlite::params![1, name, value])
                .unwrap();
        }
    }
    let store = journal::sqlite::SqliteJournal::open(&path).unwrap();
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(store.of_message("m1").await.unwrap(), [old.clone()]);
    assert_eq!(store.of_flow("flow", 10).await.unwrap(), [old.clone()]);
    assert_eq!(
        store.caused_by(&["m0".into()], 10).await.unwrap(),
        [old.clone()]
    );
    assert_eq!(
        store.with_attribute("order.id", "O-1", 10).await.unwrap(),
        [old.clone()]
    );
    // New records are numbered after it.
    store.write(vec![record(8, "m2")]).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 2);
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(message_numbers(&conn), [1, 2]);

    // A host of the earlier version, still running on the file, goes on
    // writing its table, which stays for it: its numbers now fall far
    // below this version's, so its attributes overwrite none of theirs.
    let mut late = record(9, "m3");
    late.attributes = vec![("order.id".into(), "O-3".into())];
    conn.execute(
        old_insert,
        rusqlite::params![
            9,
            "m3",
            "flow",
            None::<String>,
            serde_json::to_string(&late).unwrap()
        ],
    )
    .unwrap();
    let old_seq = conn.last_insert_rowid();
    assert!(old_seq < 0, "the earlier version numbers below: {old_seq}");
    conn.execute(old_attribute, rusqlite::params![old_seq, "order.id", "O-3"])
        .unwrap();
    drop(conn);
    // The next open moves its record, and its attribute, after the newest.
    let store = journal::sqlite::SqliteJournal::open(&path).unwrap();
    assert_eq!(store.count().await.unwrap(), 3);
    assert_eq!(store.of_message("m3").await.unwrap(), [late.clone()]);
    assert_eq!(
        store.with_attribute("order.id", "O-3", 10).await.unwrap(),
        [late]
    );
    assert_eq!(
        store.with_attribute("order.id", "O-1", 10).await.unwrap(),
        [old.clone()]
    );
    assert_eq!(
        store.with_attribute("customer", "C-1", 10).await.unwrap(),
        [old]
    );
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(message_numbers(&conn), [1, 2, 3]);
    let left: i64 = conn
        .query_row("SELECT count(*) FROM journal WHERE seq > -1000", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(left, 0, "the earlier version's table is emptied");
}

/// The record numbers the message index holds, in order.
fn message_numbers(conn: &rusqlite::Connection) -> Vec<i64> {
    conn.prepare("SELECT seq FROM journal_messages ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_journal_gives_records_with_large_payloads_rows_of_fewer() {
    use switchyard::journal::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let store = journal::sqlite::SqliteJournal::open(&path).unwrap();
    let written: Vec<Record> = (0..10u64)
        .map(|i| {
            let mut r = record(i, &format!("big{i}"));
            r.payload = Some(journal::Payload {
                text: Some("x".repeat(100 * 1024)),
                hex: None,
                size: 100 * 1024,
                truncated: false,
            });
            r
        })
        .collect();
    store.write(written.clone()).await.unwrap();
    for r in &written {
        assert_eq!(
            store.of_message(&r.message_id).await.unwrap(),
            std::slice::from_ref(r)
        );
    }
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (rows, widest): (i64, i64) = conn
        .query_row(
            "SELECT count(*), max(records) FROM journal_batches",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (rows, widest),
        (5, 2),
        "two payloads of 100 KiB to a row of at most 256 KiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_journal_pruned_empty_numbers_on_from_where_it_was() {
    use switchyard::journal::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let store = journal::sqlite::SqliteJournal::open(&path).unwrap();
    store
        .write((0..300).map(|i| record(i, &format!("a{i}"))).collect())
        .await
        .unwrap();
    // Everything is older than the cut.
    assert_eq!(store.prune(1_000, 1_000_000).await.unwrap(), 300);
    assert_eq!(store.count().await.unwrap(), 0);
    store.write(vec![record(2_000, "b0")]).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 1);
    // Pruning by age again finds nothing to remove: the new record is
    // not taken for one of the old ones.
    assert_eq!(store.prune(1_000, 1_000_000).await.unwrap(), 0);
    assert_eq!(store.of_message("b0").await.unwrap(), [record(2_000, "b0")]);
    assert!(store.of_message("a0").await.unwrap().is_empty());
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(message_numbers(&conn), [301], "no number is used twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_journal_prunes_by_age_then_by_count() {
    let scratch = Scratch::new();
    let store = journal::postgres::PostgresJournal::connect(&postgres_url(), &scratch.schema, "p")
        .await
        .unwrap();
    prunes_by_age_then_by_count(Arc::new(store)).await;
}

#[test]
fn journal_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bad = |body: &str| {
        let path = dir.path().join("bad.toml");
        let (p, diags) = config::parse(
            &format!(
                "[transport]\nkind = \"embedded\"\n{body}\n{}",
                ORDERS.replace("{dist}", "/d")
            ),
            &path,
        );
        assert!(p.is_none(), "{body} is refused");
        diags
            .iter()
            .map(|d| d.message.clone())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        bad("[journal]\npath = \"j.db\"")
            .contains("`[journal]` takes no store on the embedded transport")
    );
    assert!(bad("[journal]\nmax_records = 0").contains("`journal.max_records` must be at least 1"));
    assert!(bad("[journal]\nmax_payload = \"2 MiB\"").contains("between 1 byte and 1 MiB"));
    assert!(
        bad("[journal]\nretention = \"0s\"").contains("`journal.retention` must be more than zero")
    );
    assert!(bad("[journal]\npayload = true").contains("payload"));
}

/// `why` on an order the example saga undoes: each message the saga
/// handled shows the step it drove, what the step changed and sent, and
/// where the instance is now.
#[tokio::test(flavor = "multi_thread")]
async fn why_tells_the_saga_steps_a_message_drove() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(
        crate::common::workspace_root()
            .join("pipelines")
            .join("orders.toml"),
    )
    .unwrap()
    .replace("../dist/plugins", "{dist}");
    let path = write_pipeline(
        dir.path(),
        "orders",
        &format!("[host]\ncache_dir = \"{{cache}}\"\n{example}"),
    );
    let p = load(&path);
    // 150 units: no carrier takes the parcel, so the saga refunds,
    // releases and cancels.
    let place = message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": "W-1", "customer": "ada",
               "items": [{"sku": "lamp", "quantity": 150, "unit_price_cents": 1000}]}),
    );
    run(&p, vec![place.clone()]).await;

    let why = |args: &[&str]| {
        let (ok, out, err) = why_cli(&path, args);
        assert!(ok, "{err}");
        out
    };
    let out = why(&[&place.id]);
    assert!(
        out.contains(
            "step 1 of saga fulfilment's instance W-1, which it started (now completed, at step "
        ),
        "{out}"
    );
    for effect in [
        "timeout  FulfilmentOverdue due ",
        "set      reserved_units = 150",
        "set      cancelled = true",
        "completed the instance",
        "(now completed, at this step):",
    ] {
        assert!(out.contains(effect), "{effect} in {out}");
    }
    // The messages a step sent are told once, with the handling.
    assert_eq!(out.matches("CancelOrder ").count(), 2, "{out}");

    let v: serde_json::Value = serde_json::from_str(&why(&[&place.id, "--json"])).unwrap();
    let searched = v["searched"].as_array().unwrap();
    assert!(
        searched
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("saga state in ")),
        "{searched:?}"
    );
    let nodes = v["messages"].as_array().unwrap();
    let steps: Vec<&serde_json::Value> = nodes
        .iter()
        .flat_map(|n| n["saga_steps"].as_array().into_iter().flatten())
        .collect();
    // One step for each message the saga handled, numbered 1, 2, ... in
    // the order they committed.
    let mut versions: Vec<u64> = steps
        .iter()
        .map(|s| s["step"]["read_version"].as_u64().unwrap() + 1)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=steps.len() as u64).collect::<Vec<_>>());
    assert!(steps.len() >= 4, "{steps:#?}");
    let fault = nodes
        .iter()
        .find(|n| n["message_type"] == "ShipOrder.Fault")
        .unwrap_or_else(|| panic!("a fault in {nodes:#?}"));
    let sent: Vec<&str> = fault["saga_steps"][0]["step"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(sent, ["RefundPayment", "ReleaseStock", "CancelOrder"]);
    assert_eq!(fault["saga_steps"][0]["instance_now"], "completed");
    assert_eq!(fault["saga_steps"][0]["step"]["completed"], true);
    // Handlings by plugins that are not sagas drive no step.
    let placed = nodes.iter().find(|n| n["id"] == place.id.as_str()).unwrap();
    assert!(placed.get("saga_steps").is_none(), "{placed:#}");
}
