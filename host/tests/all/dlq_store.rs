//! The dead-letter store contract, checked the same way against SQLite and
//! PostgreSQL: recording (and re-recording), filters, groups, lookups,
//! status changes, deletion, migrations.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard::dlq::{DeadLetter, DeadLetterStore, ErrorInfo, Filter, Source, Status};
use switchyard::envelope::{Attempt, Envelope, Kind, new_id};

use crate::dead_letters::{Scratch, postgres_url};

fn letter(route: &str, kind: &str, error: &str, failed_at: u64) -> DeadLetter {
    let message = Envelope::new(
        "Charge",
        Kind::Command,
        br#"{"n":1}"#.to_vec(),
        "application/json",
    );
    let (fingerprint, cause) = switchyard::recover::fingerprint(route, kind, error, None);
    DeadLetter {
        id: new_id(),
        pipeline: "shop".into(),
        route: route.into(),
        plugin_version: "1.0.0".into(),
        plugin_digest: "sha256:00".into(),
        message,
        error: ErrorInfo {
            kind: kind.into(),
            message: error.into(),
            ..ErrorInfo::default()
        },
        attempts: vec![Attempt {
            number: 1,
            started_at_ms: failed_at,
            duration_us: 10,
            error_kind: kind.into(),
            error: error.into(),
            plugin: format!("{route}@1.0.0"),
            then: "dead-letter".into(),
            trace_id: None,
            span_id: None,
        }],
        first_failed_at_ms: failed_at,
        last_failed_at_ms: failed_at,
        source: Source {
            transport: "embedded".into(),
            queue: route.into(),
            ..Source::default()
        },
        trace_id: None,
        span_id: None,
        host: "test".into(),
        fingerprint,
        cause,
        status: Status::Dead,
        replay_count: 0,
        replayed_at_ms: None,
        resolved_at_ms: None,
        note: None,
    }
}

async fn contract(store: Arc<dyn DeadLetterStore>, other_pipeline: Arc<dyn DeadLetterStore>) {
    let a = letter(
        "payments",
        "transient",
        "gateway timed out after 30s",
        1_000,
    );
    let b = letter(
        "payments",
        "transient",
        "gateway timed out after 45s",
        2_000,
    );
    let c = letter("stock", "trap", "wasm trap: unreachable", 3_000);
    let ids = store
        .record(vec![a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    assert_eq!(ids, vec![a.id.clone(), b.id.clone(), c.id.clone()]);

    // Newest failure first; every field survives the round trip.
    let all = store.list(&Filter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        [&c.id, &b.id, &a.id]
    );
    assert_eq!(all[2], a);

    // Filters.
    let by_route = store
        .list(&Filter {
            route: Some("payments".into()),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(by_route.len(), 2);
    let by_kind = store
        .list(&Filter {
            error_kind: Some("trap".into()),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(by_kind.len(), 1);
    let by_time = store
        .list(&Filter {
            since_ms: Some(1_500),
            until_ms: Some(2_500),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(by_time.iter().map(|d| &d.id).collect::<Vec<_>>(), [&b.id]);
    let limited = store
        .list(&Filter {
            limit: Some(1),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(limited.len(), 1);
    // Found by fuzzing: a limit past i64 was SQL SQLite refused.
    let unlimited = Filter {
        limit: Some(u64::MAX),
        ..Filter::default()
    };
    assert_eq!(store.list(&unlimited).await.unwrap().len(), 3);
    assert_eq!(store.groups(&unlimited).await.unwrap().len(), 2);

    // Groups: both time-outs share a cause despite different numbers.
    let groups = store.groups(&Filter::default()).await.unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let timeouts = groups.iter().find(|g| g.route == "payments").unwrap();
    assert_eq!(timeouts.count, 2);
    assert_eq!(timeouts.cause, "gateway timed out after #s");
    assert_eq!(groups[0].route, "stock", "newest group first");

    // Lookup by a unique prefix; a prefix shared by several is refused.
    let found = store.get(&c.id[..30]).await.unwrap().unwrap();
    assert_eq!(found.id, c.id);
    let ambiguous = store.get(&c.id[..8]).await.unwrap_err().to_string();
    assert!(
        ambiguous.contains("matches several dead letters"),
        "{ambiguous}"
    );
    assert!(store.get("no-such-id").await.unwrap().is_none());

    // The same message failing again adds to its record.
    let mut again = a.clone();
    again.id = new_id();
    again.attempts[0].number = 2;
    again.last_failed_at_ms = 4_000;
    let ids = store.record(vec![again]).await.unwrap();
    assert_eq!(ids, vec![a.id.clone()], "no duplicate record");
    let a2 = store.get(&a.id).await.unwrap().unwrap();
    assert_eq!(a2.attempts.len(), 2);
    assert_eq!(a2.last_failed_at_ms, 4_000);
    assert_eq!(a2.first_failed_at_ms, 1_000);

    // Recording the same failure again (a redelivery after a crash) does not
    // repeat its attempts; another message that shares the id (a different
    // payload) gets a record of its own.
    let mut same = a.clone();
    same.id = new_id();
    store.record(vec![same]).await.unwrap();
    assert_eq!(store.get(&a.id).await.unwrap().unwrap().attempts.len(), 2);
    let mut twin = a.clone();
    twin.id = new_id();
    twin.message.payload = br#"{"n":2}"#.to_vec();
    let twin_ids = store.record(vec![twin.clone()]).await.unwrap();
    assert_eq!(twin_ids, vec![twin.id.clone()]);
    store.delete(&twin_ids).await.unwrap();

    // Replay life cycle.
    let started = store
        .begin_replay(&[a.id.clone(), c.id.clone()], "replay-1", 0)
        .await
        .unwrap();
    assert_eq!(started.len(), 2);
    // A second replay running meanwhile gets neither record, and the
    // first one's claim is not counted twice.
    assert!(
        store
            .begin_replay(&[a.id.clone(), c.id.clone()], "replay-2", 0)
            .await
            .unwrap()
            .is_empty(),
        "a record claimed by one replay is not claimed by another"
    );
    assert_eq!(
        store
            .begin_replay(std::slice::from_ref(&c.id), "replay-1", 0)
            .await
            .unwrap()
            .len(),
        1,
        "a replay keeps its own claim"
    );
    assert!(
        started
            .iter()
            .all(|d| d.status == Status::Replaying && d.replay_count == 1)
    );
    store
        .finish_replay(std::slice::from_ref(&a.id))
        .await
        .unwrap();
    assert_eq!(
        store.get(&a.id).await.unwrap().unwrap().status,
        Status::Replayed
    );
    assert_eq!(
        store
            .mark_handled(std::slice::from_ref(&a.id))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.get(&a.id).await.unwrap().unwrap().status,
        Status::Handled
    );
    // A handled record is not replayed again.
    assert!(
        store
            .begin_replay(std::slice::from_ref(&a.id), "replay-3", u64::MAX)
            .await
            .unwrap()
            .is_empty()
    );

    // Resolve with a note; delete.
    assert_eq!(
        store
            .resolve(std::slice::from_ref(&b.id), Some("refunded by hand"))
            .await
            .unwrap(),
        1
    );
    let b2 = store.get(&b.id).await.unwrap().unwrap();
    assert_eq!(
        (b2.status, b2.note.as_deref()),
        (Status::Resolved, Some("refunded by hand"))
    );
    assert!(b2.resolved_at_ms.is_some());
    let counts: HashMap<Status, u64> = store.counts().await.unwrap().into_iter().collect();
    assert_eq!(counts.get(&Status::Handled), Some(&1));
    assert_eq!(counts.get(&Status::Resolved), Some(&1));
    assert_eq!(counts.get(&Status::Replaying), Some(&1));
    // A replay that could not be enqueued goes back to dead, uncounted.
    store
        .abort_replay(std::slice::from_ref(&c.id))
        .await
        .unwrap();
    let c2 = store.get(&c.id).await.unwrap().unwrap();
    assert_eq!((c2.status, c2.replay_count), (Status::Dead, 0));
    assert_eq!(
        store.delete(&[b.id.clone(), c.id.clone()]).await.unwrap(),
        2
    );
    assert_eq!(store.list(&Filter::default()).await.unwrap().len(), 1);

    // Another pipeline sharing the store sees none of it.
    assert!(
        other_pipeline
            .list(&Filter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.db");
    let store = switchyard::dlq::sqlite::SqliteStore::open(&path, "shop").unwrap();
    // Opening again runs no migration twice.
    let other = switchyard::dlq::sqlite::SqliteStore::open(&path, "elsewhere").unwrap();
    contract(Arc::new(store), Arc::new(other)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_store_keeps_the_contract() {
    let scratch = Scratch::new();
    let url = postgres_url();
    let store = switchyard::dlq::postgres::PostgresStore::connect(&url, &scratch.schema, "shop")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be running at {url} for this test: {e:#}"));
    let other =
        switchyard::dlq::postgres::PostgresStore::connect(&url, &scratch.schema, "elsewhere")
            .await
            .unwrap();
    contract(Arc::new(store), Arc::new(other)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_postgres_is_a_clear_error() {
    let err = switchyard::dlq::postgres::PostgresStore::connect(
        "postgres://nobody:secret@127.0.0.1:1/none",
        "s",
        "p",
    )
    .await
    .err()
    .expect("nothing listens on port 1");
    let text = format!("{err:#}");
    assert!(
        text.contains(
            "cannot connect to the dead-letter store postgres://nobody:***@127.0.0.1:1/none"
        ),
        "{text}"
    );
    assert!(
        !text.contains("secret"),
        "the password is not shown: {text}"
    );
}

/// Whether the server sees the connection named `application_name` as TLS.
async fn uses_tls(application_name: &str) -> bool {
    let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&application_name],
        )
        .await
        .unwrap();
    row.get(0)
}

fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_connections_are_encrypted_as_sslmode_asks() {
    let scratch = Scratch::new();
    let url = postgres_url();
    let connect = |params: String| {
        let url = with_params(&url, &params);
        let schema = scratch.schema.clone();
        async move { switchyard::dlq::postgres::PostgresStore::connect(&url, &schema, "shop").await }
    };
    let name = |mode: &str| format!("tls-{mode}-{}", &scratch.schema[2..]);

    // The test server encrypts when asked (Debian's PostgreSQL has TLS on,
    // with its own self-signed certificate).
    let _require = connect(format!(
        "sslmode=require&application_name={}",
        name("require")
    ))
    .await
    .unwrap();
    assert!(uses_tls(&name("require")).await, "sslmode=require encrypts");
    let _prefer = connect(format!("application_name={}", name("prefer")))
        .await
        .unwrap();
    assert!(
        uses_tls(&name("prefer")).await,
        "the default, prefer, encrypts when it can"
    );
    let _plain = connect(format!(
        "sslmode=disable&application_name={}",
        name("disable")
    ))
    .await
    .unwrap();
    assert!(!uses_tls(&name("disable")).await);

    // Verifying modes check the certificate against the roots given.
    let err = connect("sslmode=verify-full".into()).await.err().unwrap();
    let text = format!("{err:#}");
    assert!(
        text.to_lowercase().contains("certificate"),
        "a self-signed certificate is not trusted by the built-in roots: {text}"
    );
    let snakeoil = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    if std::path::Path::new(snakeoil).exists() {
        let _ca = connect(format!(
            "sslmode=verify-ca&sslrootcert={snakeoil}&application_name={}",
            name("verify-ca")
        ))
        .await
        .unwrap();
        assert!(uses_tls(&name("verify-ca")).await);
    }
    let err = connect("sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem".into())
        .await
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("/nonexistent/ca.pem"),
        "{err:#}"
    );
}
