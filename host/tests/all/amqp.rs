//! The RabbitMQ transport against the real broker at 127.0.0.1:5672
//! (guest/guest; `.ci/run` starts it). Every test declares its own exchange
//! and queues under a fresh name and deletes them at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use switchyard::config::{self, Pipeline};
use switchyard::envelope::Kind;
use switchyard::runtime::{self, RunMode};

use crate::broker_contract;
use crate::common::{dead_letters, message, misbehave, write_pipeline};
use crate::reliability::{BATCH, Broker};

/// No user in the URL: AMQP clients default to guest/guest.
pub const BROKER: &str = "amqp://127.0.0.1:5672/%2f";

/// Tests share the broker; the one that restarts it takes it alone.
pub static BROKER_IN_USE: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(|| tokio::sync::RwLock::new(()));

/// RabbitMQ for the tests that run on every broker.
pub const RABBITMQ: Broker = Broker {
    name: "amqp",
    pipeline,
    batch_key: "prefetch",
    // The unacknowledged deliveries of the killed host.
    duplicates_per_kill: BATCH,
    joined: None,
};

/// A pipeline on its own exchange; `body` is the rest of the TOML.
pub fn pipeline(dir: &Path, body: &str) -> (PathBuf, Pipeline) {
    let exchange = format!("switchyard-test.{}", switchyard::envelope::new_id());
    let toml = format!(
        r#"
        [host]
        cache_dir = "{{cache}}"
        [transport]
        kind = "amqp"
        url = "{BROKER}"
        exchange = "{exchange}"
        connect_timeout = "5s"
        {body}
        "#
    );
    let path = write_pipeline(dir, "rabbit", &toml);
    let pipeline = config::load(&path).unwrap().pipeline;
    (path, pipeline)
}

/// The example pipeline (`pipelines/orders.toml`) with only its
/// `[transport]` section changed, to RabbitMQ on an exchange of its own.
fn example(dir: &Path) -> (PathBuf, Pipeline) {
    let exchange = format!("switchyard-test.{}", switchyard::envelope::new_id());
    let transport = format!(
        "[transport]\nkind = \"amqp\"\nurl = \"{BROKER}\"\nexchange = \"{exchange}\"\nconnect_timeout = \"5s\"\n"
    );
    let path = crate::common::example_pipeline(dir, &transport);
    let pipeline = config::load(&path).unwrap().pipeline;
    (path, pipeline)
}

pub async fn connection() -> Connection {
    Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("RabbitMQ runs at 127.0.0.1:5672 (rabbitmq-server -detached)")
}

pub fn short(s: &str) -> ShortString {
    ShortString::try_new(s.to_owned()).unwrap()
}

/// Ready messages in a queue.
pub async fn depth(queue: &str) -> u32 {
    let c = connection().await;
    let ch = c.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            short(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    q.message_count()
}

/// Deletes the exchange and every queue of the pipeline.
pub async fn clean_up(pipeline: &Pipeline) {
    let config::TransportConfig::Amqp(amqp) = &pipeline.transport else {
        panic!("not an amqp pipeline");
    };
    let c = connection().await;
    let ch = c.create_channel().await.unwrap();
    for p in &pipeline.plugins {
        let queue = format!("{}.{}", amqp.exchange, p.name);
        ch.queue_delete(short(&queue), QueueDeleteOptions::default())
            .await
            .unwrap();
        if pipeline.dead_letters.broker {
            ch.queue_delete(
                short(&format!("{queue}.dlq")),
                QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
        }
        for level in 1..=p.retry.delayed {
            ch.queue_delete(
                short(&format!("{queue}.retry.{level}")),
                QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
        }
    }
    ch.exchange_delete(short(&amqp.exchange), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

pub fn exchange(pipeline: &Pipeline) -> String {
    match &pipeline.transport {
        config::TransportConfig::Amqp(a) => a.exchange.clone(),
        _ => panic!("not an amqp pipeline"),
    }
}

/// Drains beside another host on the same queues: this one may find them
/// empty and stop just before the other gives messages back (a conflict's
/// batch, a host's own stop), which a later drain takes; any other error
/// fails the test.
pub async fn drain_beside_another(pipeline: &Pipeline) {
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending()),
    )
    .await
    .expect("drained within a minute");
    if let Err(e) = run {
        assert!(
            e.to_string()
                .contains("stopped before every queue was empty"),
            "{e:#}"
        );
    }
}

pub async fn drain(pipeline: &Pipeline) {
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending()),
    )
    .await
    .expect("drained within a minute")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_and_events_flow_through_rabbitmq() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let queued = async |p: &Pipeline, _: &dyn switchyard::transport::Transport| {
        assert_eq!(depth(&format!("{}.rogue", exchange(p))).await, 2);
        assert_eq!(depth(&format!("{}.tally", exchange(p))).await, 1);
    };
    let p = broker_contract::commands_and_events_flow(&RABBITMQ, dir.path(), queued, drain).await;
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_for_no_handler_is_refused_not_lost() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = pipeline(
        dir.path(),
        r#"
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        commands = ["Echo"]
        events = ["Tick"]
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let err = transport
        .enqueue(vec![message(Kind::Command, "Nobody", json!(1))])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("no plugin in this pipeline handles command Nobody"),
        "{err:#}"
    );
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_reaches_the_requester_and_a_missing_one_times_out() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let p = broker_contract::a_reply_reaches_the_requester_and_a_missing_one_times_out(
        &RABBITMQ,
        dir.path(),
        Duration::from_secs(20),
    )
    .await;
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_retries_go_through_retry_queues_and_keep_their_history() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = pipeline(
        dir.path(),
        r#"
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        retry = { immediate = 0, delayed = 2, backoff = "50ms" }
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        commands = ["Echo"]
        events = ["Tick", "Flaky"]
        retry = { immediate = 0, delayed = 2, backoff = "50ms" }
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let failing = misbehave("fail-after-publish");
    let flaky = message(Kind::Event, "Flaky", json!("fail once"));
    transport
        .enqueue(vec![failing.clone(), flaky.clone()])
        .await
        .unwrap();

    drain(&p).await;

    let dead = dead_letters(&p).await;
    assert_eq!(dead.len(), 1, "only the always-failing command: {dead:?}");
    let d = &dead[0];
    assert_eq!(d.message.id, failing.id);
    assert_eq!(d.message.payload, failing.payload);
    let thens: Vec<&str> = d.attempts.iter().map(|a| a.then.as_str()).collect();
    assert_eq!(
        thens,
        ["retry-later", "retry-later", "dead-letter"],
        "{:?}",
        d.attempts
    );
    assert_eq!(d.source.transport, "amqp");
    assert_eq!(d.source.queue, format!("{}.rogue", exchange(&p)));
    assert!(d.source.location.contains(&exchange(&p)), "{:?}", d.source);
    assert!(
        d.message.headers.iter().all(|(k, _)| !k.starts_with("x-")),
        "broker bookkeeping is not part of the message: {:?}",
        d.message.headers
    );
    assert!(transport.is_idle().await.unwrap());
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_copied_to_a_broker_queue_with_their_error() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = pipeline(dir.path(), crate::common::ROGUE_WITH_BROKER_DEAD_LETTERS);
    let transport = runtime::open(&p).await.unwrap();
    let failing = crate::common::enqueue_failing(transport.as_ref()).await;

    drain(&p).await;

    let stored = dead_letters(&p).await;
    assert_eq!(stored.len(), 1, "the store keeps its record too");
    let c = connection().await;
    let ch = c.create_channel().await.unwrap();
    let queue = format!("{}.rogue.dlq", exchange(&p));
    let got = ch
        .basic_get(short(&queue), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a copy in the dead-letter queue");
    assert_eq!(got.delivery.data, failing.payload);
    let headers = got.delivery.properties.headers().clone().expect("headers");
    let get = |k: &str| match headers.inner().get(k) {
        Some(AMQPValue::LongString(v)) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(get("cloudEvents:id"), failing.id);
    assert_eq!(get("cloudEvents:type"), "Misbehave");
    assert_eq!(get("tenant"), "acme");
    assert_eq!(get("switchyard-dead-letter-id"), stored[0].id);
    assert_eq!(get("switchyard-error-kind"), stored[0].error.kind);
    assert_eq!(get("switchyard-error"), stored[0].error.message);
    assert_eq!(get("switchyard-fingerprint"), stored[0].fingerprint);
    assert_eq!(get("switchyard-attempts"), "2");
    assert_eq!(get("switchyard-source"), format!("{}.rogue", exchange(&p)));
    assert!(get("switchyard-plugin").starts_with("rogue@"));
    let history: serde_json::Value = serde_json::from_str(&get("cloudEvents:syhistory")).unwrap();
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");
    assert!(
        ch.basic_get(short(&queue), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_none(),
        "one copy"
    );
    clean_up(&p).await;
}

/// Publishes raw AMQP messages, as a producer outside Switchyard would.
async fn publish_raw(exchange: &str, routing_key: &str, props: BasicProperties, body: &[u8]) {
    let c = connection().await;
    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        short(exchange),
        short(routing_key),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_messages_are_handled_and_malformed_ones_dead_lettered_intact() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let (_, p) = pipeline(
        dir.path(),
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        retry = { delayed = 0 }
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let x = exchange(&p);
    // A plain AMQP message: no CloudEvents attributes, just a message id.
    publish_raw(
        &x,
        "Tick",
        BasicProperties::default().with_message_id(short("plain-1")),
        b"{}",
    )
    .await;
    // A Switchyard message whose kind is garbage.
    let mut headers = FieldTable::default();
    headers.insert(
        short("cloudEvents:id"),
        AMQPValue::LongString(LongString::from("bad-1")),
    );
    headers.insert(
        short("cloudEvents:sykind"),
        AMQPValue::LongString(LongString::from("many")),
    );
    publish_raw(
        &x,
        "Tick",
        BasicProperties::default()
            .with_headers(headers)
            .with_message_id(short("bad-1")),
        b"\x00\x01 not json",
    )
    .await;

    drain(&p).await;

    let tally = std::fs::read_to_string(dir.path().join("out").join("tally.log")).unwrap();
    assert_eq!(tally.lines().collect::<Vec<_>>(), ["plain-1"]);
    let dead = dead_letters(&p).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.id, "bad-1");
    assert_eq!(dead[0].message.payload, b"\x00\x01 not json");
    assert_eq!(dead[0].error.kind, "malformed");
    assert!(
        dead[0].error.message.contains("sykind `many`"),
        "{:?}",
        dead[0].error
    );
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_use_the_cloudevents_amqp_binary_mapping() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = pipeline(
        dir.path(),
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        retry = { delayed = 0 }
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let mut tick = message(Kind::Event, "Tick", json!({"n": 1}));
    tick.headers = vec![("tenant".into(), "acme".into())];
    tick.correlation_id = Some("c-1".into());
    transport.enqueue(vec![tick.clone()]).await.unwrap();

    // Read it as any AMQP client would.
    let c = connection().await;
    let ch = c.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            short(&format!("{}.tally", exchange(&p))),
            short("inspector"),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, tick.payload);
    assert_eq!(d.routing_key.as_str(), "Tick");
    let props = &d.properties;
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        props.message_id().as_ref().map(|c| c.as_str()),
        Some(tick.id.as_str())
    );
    let headers = props.headers().as_ref().unwrap().inner();
    let get = |k: &str| match headers.get(k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(get("cloudEvents:specversion"), "1.0");
    assert_eq!(get("cloudEvents:id"), tick.id);
    assert_eq!(get("cloudEvents:type"), "Tick");
    assert_eq!(get("cloudEvents:source"), format!("switchyard/{}", p.name));
    assert_eq!(get("cloudEvents:correlationid"), "c-1");
    assert_eq!(get("tenant"), "acme");
    assert!(get("cloudEvents:time").ends_with('Z'));
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_is_a_clear_error() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "nobroker",
        r#"
        [host]
        cache_dir = "{cache}"
        [transport]
        kind = "amqp"
        url = "amqp://127.0.0.1:1/%2f"
        connect_timeout = "2s"
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        commands = ["Echo"]
        events = ["Tick"]
        "#,
    );
    let p = config::load(&path).unwrap().pipeline;
    let plugins = runtime::load_plugins(&p).await.unwrap();
    let err = runtime::run(&p, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("cannot connect to the broker amqp://127.0.0.1:1/%2f")
            || text.contains("no answer from the broker amqp://127.0.0.1:1/%2f"),
        "{text}"
    );
}

#[test]
fn the_example_pipeline_answers_the_cli_over_rabbitmq() {
    let _broker = BROKER_IN_USE.blocking_read();
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = example(dir.path());
    let path = path.display().to_string();
    let host = std::process::Command::new(crate::common::bin())
        .args(["run", &path])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let order = r#"{"order_id":"R-1","customer":"ada","items":[{"sku":"book","quantity":3,"unit_price_cents":1000}]}"#;
    let sent = std::process::Command::new(crate::common::bin())
        .args([
            "send",
            "PlaceOrder",
            "-p",
            &path,
            "--data",
            order,
            "--wait",
            "30s",
        ])
        .output()
        .unwrap();
    // A reply can reach the CLI before the host has acknowledged the
    // command; stopping the host gracefully lets it finish.
    crate::common::stop(host);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(reply, json!({"order_id": "R-1", "total_cents": 3000}));

    // Nobody answers now: a clear timeout, and the command waits in its queue.
    let late = std::process::Command::new(crate::common::bin())
        .args([
            "send",
            "PlaceOrder",
            "-p",
            &path,
            "--data",
            order,
            "--wait",
            "300ms",
        ])
        .output()
        .unwrap();
    assert!(!late.status.success());
    let err = String::from_utf8_lossy(&late.stderr);
    assert!(err.contains("no reply within 300ms"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(depth(&format!("{}.orders", exchange(&p))).await, 1);
        clean_up(&p).await;
    });
}

/// The Python the interop tests run: `SWITCHYARD_PYTHON`, or `python3`.
pub(crate) fn python() -> String {
    std::env::var("SWITCHYARD_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn a_pika_client_talks_to_the_example_pipeline() {
    let _broker = BROKER_IN_USE.blocking_read();
    let has_pika = std::process::Command::new(python())
        .args(["-c", "import pika"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_pika,
        "{} cannot import pika: install it (python3 -m pip install pika) or point SWITCHYARD_PYTHON at a Python that has it",
        python()
    );
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = example(dir.path());
    // The queues exist before the client publishes, however long the host
    // takes to start (it may be compiling the plugins).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let transport = runtime::open(&p).await.unwrap();
        transport.start_consuming().await.unwrap();
    });
    let host = std::process::Command::new(crate::common::bin())
        .arg("run")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let script = crate::common::workspace_root()
        .join("tests")
        .join("interop")
        .join("pika_client.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .args([BROKER, &exchange(&p), "P-7"])
        .output()
        .unwrap();
    crate::common::stop(host);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let command_id = seen["command_id"].as_str().unwrap();

    // The reply, routed back to the client's own queue.
    let reply = &seen["reply"];
    assert_eq!(
        reply["body"],
        json!({"order_id": "P-7", "total_cents": 3998}),
        "{seen}"
    );
    assert_eq!(reply["correlation_id"], "pika-P-7");
    assert_eq!(reply["headers"]["cloudEvents:specversion"], "1.0");
    assert_eq!(reply["headers"]["cloudEvents:causationid"], command_id);

    // The event the command caused, read from a queue the client bound.
    let event = &seen["event"];
    assert_eq!(event["routing_key"], "OrderPlaced", "{seen}");
    assert_eq!(event["body"]["order_id"], "P-7");
    assert_eq!(event["content_type"], "application/json");
    let h = &event["headers"];
    assert_eq!(h["cloudEvents:specversion"], "1.0");
    assert_eq!(h["cloudEvents:type"], "OrderPlaced");
    assert_eq!(h["cloudEvents:source"], format!("switchyard/{}", p.name));
    assert_eq!(h["cloudEvents:sykind"], "event");
    assert_eq!(h["cloudEvents:causationid"], command_id);
    assert_eq!(h["cloudEvents:correlationid"], "pika-P-7");
    assert_eq!(event["message_id"], h["cloudEvents:id"]);
    rt.block_on(clean_up(&p));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_added_while_running_gets_its_queue_and_messages() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::create_dir(dir.path().join("out2")).unwrap();
    let tally = r#"
        [admin]
        listen = "off"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#;
    let (path, p) = pipeline(dir.path(), tally);
    let host = crate::common::Running::start(&p, runtime::RunOptions::quiet(RunMode::Serve)).await;
    let transport = runtime::open(&p).await.unwrap();
    let log = |d: &str| crate::common::tally_ids(&dir.path().join(d));

    // A second consumer of Tick, and Published added to the first.
    let text = std::fs::read_to_string(&path).unwrap();
    let grown = text.replace(r#"events = ["Tick"]"#, r#"events = ["Tick", "Published"]"#)
        + r#"
        [plugins.second]
        wasm = "../dist/plugins/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out2", guest = "/out", writable = true }] }
        "#;
    let grown = grown.replace(
        "../dist/plugins",
        crate::common::wasm("tally")
            .parent()
            .unwrap()
            .to_str()
            .unwrap(),
    );
    std::fs::write(&path, &grown).unwrap();
    let report = host.control.reload_from_disk().await.unwrap();
    assert_eq!(report.added, vec!["second".to_owned()]);
    assert_eq!(report.swapped, vec!["tally".to_owned()]);

    let ticks: Vec<_> = (0..5)
        .map(|n| message(Kind::Event, "Tick", json!(n)))
        .collect();
    let published = message(Kind::Event, "Published", json!(1));
    // Routed by the broker's bindings, whoever publishes.
    let mut all = ticks.clone();
    all.push(published.clone());
    transport.enqueue(all).await.unwrap();
    crate::common::eventually("both consumers to receive", Duration::from_secs(20), || {
        let (a, b) = (log("out").len(), log("out2").len());
        async move { a == 6 && b == 5 }
    })
    .await;
    let second: std::collections::HashSet<String> = log("out2").into_iter().collect();
    assert_eq!(
        second,
        ticks.iter().map(|m| m.id.clone()).collect(),
        "the new consumer got the ticks, not the Published event"
    );

    // Removed again: its queue is unbound, so it no longer fills.
    std::fs::write(&path, &text).unwrap();
    let report = host.control.reload_from_disk().await.unwrap();
    assert_eq!(report.removed, vec!["second".to_owned()]);
    transport
        .enqueue(vec![message(Kind::Event, "Tick", json!(9))])
        .await
        .unwrap();
    crate::common::eventually("tally to receive", Duration::from_secs(20), || {
        let a = log("out").len();
        async move { a == 7 }
    })
    .await;
    assert_eq!(depth(&format!("{}.second", exchange(&p))).await, 0);
    host.stop().await;
    let mut with_second = p.clone();
    with_second.plugins = config::load(&{
        std::fs::write(&path, &grown).unwrap();
        path.clone()
    })
    .unwrap()
    .pipeline
    .plugins;
    clean_up(&with_second).await;
}

/// Every field at and past its limit, sent by pika as another team's
/// service would: what is at the limit is handled exactly once, what is
/// past it is dead-lettered as malformed without reaching the plugin, and
/// nothing loops or holds the rest of its batch hostage. (Before the
/// limits, a 300-byte reply address made the settle fail after the order's
/// outputs were published, and the order was charged again on every
/// redelivery.)
#[test]
fn a_foreign_client_at_every_field_limit_gets_each_order_handled_once_or_refused() {
    let _broker = BROKER_IN_USE.blocking_read();
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = example(dir.path());
    let x = exchange(&p);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A queue of the test's own sees every OrderPlaced the orders plugin
    // publishes: one per handled order.
    let probe = format!("{x}.probe");
    rt.block_on(async {
        let transport = runtime::open(&p).await.unwrap();
        transport.start_consuming().await.unwrap();
        let c = connection().await;
        let ch = c.create_channel().await.unwrap();
        ch.queue_declare(
            short(&probe),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            short(&probe),
            short(&x),
            short("OrderPlaced"),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    });
    let script = crate::common::workspace_root()
        .join("tests")
        .join("interop")
        .join("pika_limits.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .args([BROKER, &x])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let handled: Vec<&str> = sent["handled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let refused = sent["refused"].as_object().unwrap();

    rt.block_on(async {
        // Drains within its deadline: nothing loops.
        drain(&p).await;
        let c = connection().await;
        let ch = c.create_channel().await.unwrap();
        let mut caused = Vec::new();
        while let Some(m) = ch
            .basic_get(short(&probe), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let h = m.properties.headers().clone().unwrap_or_default();
            let cause = h
                .inner()
                .iter()
                .find(|(k, _)| k.as_str() == "cloudEvents:causationid")
                .and_then(|(_, v)| match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                })
                .unwrap();
            caused.push(cause);
        }
        caused.sort();
        let mut expected: Vec<String> = handled.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(
            caused, expected,
            "each order at a limit was handled exactly once"
        );

        let dead = dead_letters(&p).await;
        assert_eq!(dead.len(), refused.len(), "{dead:#?}");
        for d in &dead {
            assert_eq!(d.error.kind, "malformed", "{d:#?}");
            assert!(
                d.message.id.len() <= 255 && !d.message.id.contains('\n'),
                "a dead letter's id is safe to index and log: {:?}",
                d.message.id
            );
            assert!(d.error.message.len() < 1024, "{}", d.error.message);
        }
        let reasons: Vec<&str> = dead.iter().map(|d| d.error.message.as_str()).collect();
        for needle in [
            "reply-to address is 300 bytes",
            "names one of this pipeline's own queues",
            "message id is 256 bytes",
            "message id has control characters",
            "is not a message type name",
            "`Refund` is not one this route takes",
            "takes as a command",
            "129 headers",
        ] {
            assert!(
                reasons.iter().any(|r| r.contains(needle)),
                "no dead letter says {needle:?}: {reasons:#?}"
            );
        }
        ch.queue_delete(short(&probe), QueueDeleteOptions::default())
            .await
            .unwrap();
        clean_up(&p).await;
    });
}
