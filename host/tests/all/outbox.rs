//! Outbox semantics and route isolation, on a running host with the real
//! embedded store.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::config;
use switchyard::envelope::Kind;
use switchyard::runtime::{self, RunMode};
use switchyard::testing::TestPipeline;
use switchyard::transport::Transport;

use crate::common::{dead_letters, message, misbehave, write_pipeline};

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_attempt_publishes_sends_and_replies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let path = write_pipeline(
        dir.path(),
        "outbox",
        r#"
        [host]
        cache_dir = "{cache}"
        [defaults.retry]
        immediate = 1
        delayed = 0
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Published"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    let mut failing = misbehave("fail-after-publish");
    failing.reply_to = Some("test:failing".into());
    let mut ok = misbehave("ok");
    ok.reply_to = Some("test:ok".into());
    let published = misbehave("publish");
    transport
        .enqueue(vec![failing.clone(), ok.clone(), published.clone()])
        .await
        .unwrap();

    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    runtime::run(&pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();

    // Only the successful `publish` reached the consumer.
    let tally = std::fs::read_to_string(dir.path().join("out").join("tally.log")).unwrap();
    assert_eq!(tally.lines().count(), 1, "{tally}");
    // The failed attempt's reply was discarded; the successful one arrived.
    assert!(
        transport
            .take_reply("test:failing")
            .await
            .unwrap()
            .is_none()
    );
    let reply = transport
        .take_reply("test:ok")
        .await
        .unwrap()
        .expect("reply to ok");
    assert_eq!(reply.in_reply_to, ok.id);
    assert_eq!(reply.payload, br#""ok""#);
    // The failed message itself is kept, with its error.
    let failed = dead_letters(&pipeline).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].message.id, failing.id);
    assert_eq!(failed[0].message.payload, failing.payload);
    assert_eq!(failed[0].error.kind, "transient");
    assert_eq!(failed[0].route, "rogue");
    assert_eq!(failed[0].plugin_version, "0.1.0");
    assert!(failed[0].plugin_digest.starts_with("sha256:"));
    // One immediate retry, also failed, also published nothing.
    assert_eq!(failed[0].attempts.len(), 2, "{:?}", failed[0].attempts);
    assert!(transport.is_idle().await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_carry_correlation_and_causation() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "links",
        r#"
        [host]
        cache_dir = "{cache}"
        [plugins.orders]
        wasm = "{dist}/orders.wasm"
        commands = ["PlaceOrder"]
        [plugins.payments]
        wasm = "{dist}/payments.wasm"
        commands = ["ChargePayment"]
        timeout = "1s"
        retry = { immediate = 0, delayed = 0 }
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    let mut cmd = message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": "C-1", "customer": "c", "items": [{"sku": "s", "quantity": 1, "unit_price_cents": 113}]}),
    );
    cmd.correlation_id = Some("flow-42".into());
    transport.enqueue(vec![cmd.clone()]).await.unwrap();
    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    runtime::run(&pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    // 113 cents: the payment gateway fails on the first attempt, so the
    // ChargePayment command the orders plugin sent is kept, and shows its links.
    let failed = dead_letters(&pipeline).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    let charge = &failed[0].message;
    assert_eq!(charge.message_type, "ChargePayment");
    assert_eq!(charge.kind, Kind::Command);
    assert_eq!(charge.correlation_id.as_deref(), Some("flow-42"));
    assert_eq!(charge.causation_id.as_deref(), Some(cmd.id.as_str()));
    assert_ne!(charge.id, cmd.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_plugin_does_not_stall_other_routes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "isolation",
        r#"
        [host]
        cache_dir = "{cache}"
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        timeout = "400ms"
        retry = { immediate = 0, delayed = 0 }
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        events = ["Tick"]
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let p = TestPipeline::run(pipeline).await.unwrap();
    let mut batch = vec![
        misbehave("loop"),
        misbehave("loop"),
        misbehave("loop"),
        misbehave("ok"),
    ];
    batch.extend((0..200).map(|i| message(Kind::Event, "Tick", json!({ "n": i }))));
    let ids = p.enqueue_all(batch).await.unwrap();
    let (loops, ok, last_tick) = (&ids[..3], &ids[3], &ids[203]);

    // While rogue burns through three 400 ms deadlines, echo must finish.
    p.handled("echo", last_tick).await.unwrap();
    let rogue_settled = p.settled().iter().filter(|s| s.route() == "rogue").count();
    assert!(
        rogue_settled < 4,
        "echo waited for rogue: rogue had settled all {rogue_settled} of its messages"
    );
    for id in loops {
        let dead = p.dead_letter(id).await.unwrap();
        assert_eq!(dead.error.kind, "timeout", "{:?}", dead.error);
    }
    // The message after the loops was handled.
    p.handled("rogue", ok).await.unwrap();
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_stored_message_is_set_aside_and_the_route_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "malformed",
        r#"
        [host]
        cache_dir = "{cache}"
        [transport]
        path = "store.db"
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        events = ["Tick"]
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    transport
        .enqueue(vec![message(Kind::Event, "Tick", json!(1))])
        .await
        .unwrap();
    // Another writer puts rows the host cannot decode between good ones.
    {
        let conn = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
        conn.execute(
            "INSERT INTO queue (route, id, type, kind, payload, content_type, headers, created_at_ms, attempt, history, enqueued_at_ms)
             VALUES ('echo', 'bad-kind', 'Tick', 'gossip', x'00', 'application/json', '[]', 0, 1, '[]', 0),
                    ('echo', 'bad-headers', 'Tick', 'event', x'00', 'application/json', '{oops', 0, 1, '[]', 0)",
            [],
        )
        .unwrap();
    }
    transport
        .enqueue(vec![message(Kind::Event, "Tick", json!(2))])
        .await
        .unwrap();

    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    runtime::run(&pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();

    let mut failed = dead_letters(&pipeline).await;
    failed.sort_by(|a, b| a.message.id.cmp(&b.message.id));
    let ids: Vec<&str> = failed.iter().map(|f| f.message.id.as_str()).collect();
    assert_eq!(ids, ["bad-headers", "bad-kind"]);
    assert!(failed.iter().all(|f| f.error.kind == "malformed"));
    assert!(failed.iter().all(|f| f.attempts.len() == 1));
    assert!(
        failed[1]
            .error
            .message
            .contains("`gossip` is neither command nor event"),
        "{:?}",
        failed[1]
    );
    assert!(
        failed[0].error.message.contains("column headers"),
        "{:?}",
        failed[0]
    );
    // What could not be parsed is kept as it was.
    assert_eq!(
        failed[0].message.headers,
        vec![(
            "switchyard-unreadable-headers".to_owned(),
            "{oops".to_owned()
        )]
    );
    assert_eq!(failed[1].message.payload, vec![0]);
    assert!(
        transport.is_idle().await.unwrap(),
        "the good messages around them were handled"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_waits_for_one_message_not_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "shutdown",
        r#"
        [host]
        cache_dir = "{cache}"
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        timeout = "500ms"
        retry = { immediate = 0, delayed = 0 }
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    transport
        .enqueue((0..6).map(|_| misbehave("loop")).collect())
        .await
        .unwrap();
    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    let started = Instant::now();
    runtime::run(
        &pipeline,
        plugins,
        RunMode::Serve,
        tokio::time::sleep(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    // Six 500 ms loops would take 3 s; shutdown waits for the one in hand.
    assert!(took < Duration::from_millis(2000), "shutdown took {took:?}");
    let depth: u64 = transport
        .depths()
        .await
        .unwrap()
        .iter()
        .map(|(_, d)| d)
        .sum();
    let failed = dead_letters(&pipeline).await.len() as u64;
    assert_eq!(
        depth + failed,
        6,
        "every message is either failed or still queued"
    );
    assert!(
        depth >= 4,
        "the rest of the batch was given back: {depth} queued"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_cannot_start_fails_no_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let path = write_pipeline(
        dir.path(),
        "nostart",
        r#"
        [host]
        cache_dir = "{cache}"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    transport
        .enqueue(
            (0..5)
                .map(|i| message(Kind::Event, "Tick", json!(i)))
                .collect(),
        )
        .await
        .unwrap();
    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    // The granted directory disappears after loading: instances cannot start.
    std::fs::remove_dir(dir.path().join("out")).unwrap();
    runtime::run(
        &pipeline,
        plugins,
        RunMode::Serve,
        tokio::time::sleep(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    assert!(
        dead_letters(&pipeline).await.is_empty(),
        "no message is blamed"
    );
    assert_eq!(
        transport.depths().await.unwrap(),
        vec![("tally".to_owned(), 5)]
    );

    // In drain mode the run fails instead of waiting for ever.
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    std::fs::remove_dir(dir.path().join("out")).unwrap();
    let err = runtime::run(&pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("cannot start"), "{err:#}");

    // Once the directory is back, every message is handled.
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let plugins = runtime::load_plugins(&pipeline).await.unwrap();
    runtime::run(&pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    let tally = std::fs::read_to_string(dir.path().join("out").join("tally.log")).unwrap();
    assert_eq!(tally.lines().count(), 5);
}
