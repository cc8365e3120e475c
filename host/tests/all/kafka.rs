//! The Kafka transport against a real Kafka protocol broker: the cluster
//! named by `KAFKA_BOOTSTRAP_SERVERS` (e.g. tansu, started by
//! `scripts/kafka-broker.sh`), or else librdkafka's mock cluster, started
//! once per test binary. Every test uses its own topic and group prefix.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use switchyard::config::{self, Pipeline};
use switchyard::envelope::Kind;
use switchyard::runtime::{self, RunMode};

use crate::broker_contract;
use crate::common::{dead_letters, message, misbehave, write_pipeline};
use crate::reliability::{BATCH, Broker};

/// Whether the tests run on librdkafka's mock cluster. It has no
/// CreateTopics API; it creates topics on first use instead.
pub fn mock() -> bool {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").map_or(true, |s| s.is_empty())
}

/// The cluster the tests use.
pub fn bootstrap() -> String {
    static SERVERS: OnceLock<String> = OnceLock::new();
    SERVERS
        .get_or_init(|| {
            if let Ok(s) = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
                && !s.is_empty()
            {
                return s;
            }
            // The mock cluster is not Send: it lives on a thread of its
            // own for as long as the test binary runs.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let cluster = rdkafka::mocking::MockCluster::new(3).expect("mock Kafka cluster");
                tx.send(cluster.bootstrap_servers()).expect("send address");
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("mock cluster address")
        })
        .clone()
}

/// Kafka for the tests that run on every broker.
pub const KAFKA: Broker = Broker {
    name: "kafka",
    pipeline,
    batch_key: "batch_size",
    // The batch in hand, and the one before it if its commit had not
    // reached the cluster yet.
    duplicates_per_kill: 2 * BATCH,
    joined: Some("Partitions assigned"),
};

/// A pipeline on its own topics and groups; `body` is the rest of the TOML.
pub fn pipeline(dir: &Path, body: &str) -> (PathBuf, Pipeline) {
    let id = switchyard::envelope::new_id();
    let toml = format!(
        r#"
        [host]
        cache_dir = "{{cache}}"
        [admin]
        listen = "off"
        [transport]
        kind = "kafka"
        bootstrap_servers = "{servers}"
        topic_prefix = "t{id}."
        group_prefix = "g{id}"
        partitions = 3
        create_topics = {create}
        timeout = "20s"
        {body}
        "#,
        servers = bootstrap(),
        create = !mock(),
    );
    let path = write_pipeline(dir, "kafka", &toml);
    let pipeline = config::load(&path).unwrap().pipeline;
    (path, pipeline)
}

pub fn prefix(p: &Pipeline) -> String {
    match &p.transport {
        config::TransportConfig::Kafka(k) => k.topic_prefix.clone(),
        _ => panic!("not a kafka pipeline"),
    }
}

fn group_prefix(p: &Pipeline) -> String {
    match &p.transport {
        config::TransportConfig::Kafka(k) => k.group_prefix.clone(),
        _ => panic!("not a kafka pipeline"),
    }
}

pub async fn drain(pipeline: &Pipeline) {
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending()),
    )
    .await
    .expect("drained within two minutes")
    .unwrap();
}

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap()
}

/// A record as read back: its headers and payload.
type Record = (Vec<(String, String)>, Vec<u8>);

/// Every record of a topic, from the start.
fn read_topic(topic: &str, want: usize) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set(
            "group.id",
            format!("reader-{}", switchyard::envelope::new_id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.len() < want && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((headers, m.payload().unwrap_or_default().to_vec()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_and_events_flow_through_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let queued = async |_: &Pipeline, transport: &dyn switchyard::transport::Transport| {
        assert!(!transport.is_idle().await.unwrap());
    };
    broker_contract::commands_and_events_flow(&KAFKA, dir.path(), queued, drain).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_reaches_the_requester_and_a_missing_one_times_out() {
    let dir = tempfile::tempdir().unwrap();
    broker_contract::a_reply_reaches_the_requester_and_a_missing_one_times_out(
        &KAFKA,
        dir.path(),
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_retries_wait_beside_the_partition_and_keep_their_history() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let (_, p) = pipeline(
        dir.path(),
        r#"
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        retry = { immediate = 0, delayed = 2, backoff = "300ms" }
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let failing = misbehave("fail-after-publish");
    // The commands behind the failing one are not held up by its retries.
    let ok: Vec<_> = (0..5).map(|_| misbehave("ok")).collect();
    let mut batch = vec![failing.clone()];
    batch.extend(ok.iter().cloned());
    transport.enqueue(batch).await.unwrap();

    drain(&p).await;

    let dead = dead_letters(&p).await;
    assert_eq!(dead.len(), 1, "only the always-failing command: {dead:?}");
    let d = &dead[0];
    assert_eq!(d.message.id, failing.id);
    assert_eq!(d.message.payload, failing.payload);
    let thens: Vec<&str> = d.attempts.iter().map(|a| a.then.as_str()).collect();
    assert_eq!(thens, ["retry-later", "retry-later", "dead-letter"]);
    assert_eq!(d.source.transport, "kafka");
    assert_eq!(
        d.source.consumer_group.as_deref(),
        Some(format!("g{}.rogue", &prefix(&p)[1..prefix(&p).len() - 1]).as_str())
    );
    assert!(transport.is_idle().await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_records_are_handled_and_malformed_ones_dead_lettered_intact() {
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
    let topic = format!("{}Tick", prefix(&p));
    let producer = producer();
    // A plain record: no headers at all.
    producer
        .send(
            FutureRecord::<(), _>::to(&topic).payload("{}"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // A record whose kind is garbage.
    producer
        .send(
            FutureRecord::<(), _>::to(&topic)
                .payload(b"\x00\x01 not json".as_slice())
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: "ce_id",
                            value: Some("bad-1"),
                        })
                        .insert(Header {
                            key: "ce_sykind",
                            value: Some("many"),
                        }),
                ),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    drain(&p).await;

    let tally = std::fs::read_to_string(dir.path().join("out").join("tally.log")).unwrap();
    let handled: Vec<&str> = tally.lines().collect();
    assert_eq!(handled.len(), 1, "{tally}");
    assert!(
        handled[0].starts_with(&format!("kafka-{topic}-")),
        "a record without an id is named by its place: {}",
        handled[0]
    );
    let dead = dead_letters(&p).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.payload, b"\x00\x01 not json");
    assert_eq!(dead[0].error.kind, "malformed");
    assert!(
        dead[0].error.message.contains("sykind `many`"),
        "{:?}",
        dead[0].error
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_copied_to_a_dlq_topic_with_their_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = pipeline(dir.path(), crate::common::ROGUE_WITH_BROKER_DEAD_LETTERS);
    let transport = runtime::open(&p).await.unwrap();
    let failing = crate::common::enqueue_failing(transport.as_ref()).await;

    drain(&p).await;

    let stored = dead_letters(&p).await;
    assert_eq!(stored.len(), 1, "the store keeps its record too");
    let source = &stored[0].source;
    assert_eq!(source.transport, "kafka");
    assert_eq!(source.queue, format!("{}Misbehave", prefix(&p)));
    assert!(
        source.partition.is_some() && source.offset == Some(0),
        "{source:?}"
    );
    assert_eq!(
        source.consumer_group.as_deref(),
        Some(format!("{}.rogue", group_prefix(&p)).as_str())
    );
    let topic = format!("{}Misbehave.dlq", prefix(&p));
    let records = tokio::task::spawn_blocking(move || read_topic(&topic, 1))
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "one copy");
    let (headers, payload) = &records[0];
    assert_eq!(payload, &failing.payload);
    let get = |k: &str| {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} missing from {headers:?}"))
    };
    assert_eq!(get("ce_id"), failing.id);
    assert_eq!(get("ce_type"), "Misbehave");
    assert_eq!(get("tenant"), "acme");
    assert_eq!(get("switchyard-dead-letter-id"), stored[0].id);
    assert_eq!(get("switchyard-error-kind"), stored[0].error.kind);
    assert_eq!(get("switchyard-error"), stored[0].error.message);
    assert_eq!(get("switchyard-attempts"), "2");
    assert!(get("switchyard-plugin").starts_with("rogue@"));
}

#[tokio::test(flavor = "multi_thread")]
async fn records_use_the_cloudevents_kafka_binary_mapping() {
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

    let topic = format!("{}Tick", prefix(&p));
    let records = tokio::task::spawn_blocking(move || read_topic(&topic, 1))
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    let (headers, payload) = &records[0];
    assert_eq!(payload, &tick.payload);
    let get = |k: &str| {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} missing from {headers:?}"))
    };
    assert_eq!(get("ce_specversion"), "1.0");
    assert_eq!(get("ce_id"), tick.id);
    assert_eq!(get("ce_type"), "Tick");
    assert_eq!(get("ce_source"), format!("switchyard/{}", p.name));
    assert_eq!(get("ce_correlationid"), "c-1");
    assert_eq!(get("content-type"), "application/json");
    assert_eq!(get("tenant"), "acme");
    assert!(get("ce_time").ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_cluster_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "nokafka",
        r#"
        [host]
        cache_dir = "{cache}"
        [admin]
        listen = "off"
        [transport]
        kind = "kafka"
        bootstrap_servers = "127.0.0.1:1"
        timeout = "2s"
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
    assert!(text.contains("Kafka cluster 127.0.0.1:1"), "{text}");
}

/// The example pipeline (`pipelines/orders.toml`) with only its
/// `[transport]` section changed, to Kafka on topics and groups of its own.
fn example(dir: &Path) -> (PathBuf, Pipeline) {
    let id = switchyard::envelope::new_id();
    let transport = format!(
        "[transport]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\ntopic_prefix = \"t{id}.\"\ngroup_prefix = \"g{id}\"\ncreate_topics = {}\ntimeout = \"20s\"\n",
        bootstrap(),
        !mock()
    );
    let path = crate::common::example_pipeline(dir, &transport);
    let pipeline = config::load(&path).unwrap().pipeline;
    (path, pipeline)
}

fn spawn_host(path: &Path) -> std::process::Child {
    std::process::Command::new(crate::common::bin())
        .arg("run")
        .arg(path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn the_example_pipeline_answers_the_cli_over_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = example(dir.path());
    let path = path.display().to_string();
    let host = spawn_host(Path::new(&path));
    let order = r#"{"order_id":"K-1","customer":"ada","items":[{"sku":"book","quantity":2,"unit_price_cents":1000}]}"#;
    let send = |wait: &str| {
        std::process::Command::new(crate::common::bin())
            .args([
                "send",
                "PlaceOrder",
                "-p",
                &path,
                "--data",
                order,
                "--wait",
                wait,
            ])
            .output()
            .unwrap()
    };
    let sent = send("60s");
    crate::common::stop(host);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(reply, json!({"order_id": "K-1", "total_cents": 2000}));

    let late = send("300ms");
    assert!(!late.status.success());
    let err = String::from_utf8_lossy(&late.stderr);
    assert!(err.contains("no reply within 300ms"), "{err}");
}

/// On Kafka the ingress's command is answered through the replies topic,
/// and an event is acknowledged by the cluster before its 202.
#[tokio::test(flavor = "multi_thread")]
async fn the_ingress_answers_a_command_and_accepts_an_event_over_kafka() {
    crate::ingress::a_command_is_answered_and_an_event_accepted(pipeline).await;
}

/// A record larger than the cluster takes (librdkafka's 1,000,000-byte
/// `message.max.bytes`, under the ingress's 1 MiB `max_body`) is refused
/// alone: the requests sent beside it, made durable in the same batch or
/// not, are accepted.
#[tokio::test(flavor = "multi_thread")]
async fn an_ingress_request_the_cluster_refuses_is_refused_alone() {
    let (statuses, big) = crate::ingress::events_beside_an_oversized_one(pipeline).await;
    assert_eq!(big, 503);
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
}

/// Creates a topic of one partition (not on the mock cluster, which has no
/// CreateTopics API).
async fn create_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            [&NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create {t}: {e}"));
    }
}

/// Runs kcat (at most a minute) and returns what it printed.
fn kcat(args: &[&str], input: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("timeout")
        .arg("60")
        .arg("kcat")
        .args(["-b", &bootstrap()])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kcat is installed (apt-get install kcat)");
    if let Some(text) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kcat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One record as kcat prints it with `-f '%h\n%s\n'`: headers, payload.
fn kcat_record(printed: &str) -> (std::collections::HashMap<String, String>, serde_json::Value) {
    let mut lines = printed.lines();
    let headers = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let payload = serde_json::from_str(lines.next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("kcat printed {printed:?}: {e}"));
    (headers, payload)
}

#[test]
fn kcat_talks_to_the_example_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = example(dir.path());
    let prefix = prefix(&p);
    let replies = format!("{prefix}kcat.replies");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The pipeline's topics exist before kcat produces, however long the
    // host takes to start, and so does the requester's reply topic.
    rt.block_on(async {
        let transport = runtime::open(&p).await.unwrap();
        transport.start_consuming().await.unwrap();
    });
    if mock() {
        // No CreateTopics on the mock cluster: a first record creates it.
        kcat(&["-P", "-t", &replies], Some("{}\n"));
    } else {
        rt.block_on(create_topic(&replies));
    }
    let host = spawn_host(&path);
    let id = switchyard::envelope::new_id();
    let order = r#"{"order_id":"K-9","customer":"grace","items":[{"sku":"lamp","quantity":2,"unit_price_cents":1999}]}"#;
    kcat(
        &[
            "-P",
            "-t",
            &format!("{prefix}PlaceOrder"),
            "-k",
            "K-9",
            "-H",
            "ce_specversion=1.0",
            "-H",
            &format!("ce_id={id}"),
            "-H",
            "ce_type=PlaceOrder",
            "-H",
            "ce_source=urn:example:kcat",
            "-H",
            &format!("ce_syreplyto={replies}"),
            "-H",
            "ce_correlationid=kcat-1",
            "-H",
            "content-type=application/json",
        ],
        Some(&format!("{order}\n")),
    );
    // The reply, after the record that made the topic on the mock cluster.
    let count = if mock() { "2" } else { "1" };
    let printed = kcat(
        &[
            "-C",
            "-t",
            &replies,
            "-o",
            "beginning",
            "-c",
            count,
            "-f",
            "%h\n%s\n",
        ],
        None,
    );
    let lines: Vec<&str> = printed.lines().collect();
    let reply = lines
        .chunks(2)
        .find(|r| r.get(1).is_some_and(|payload| *payload != "{}"))
        .map(|r| r.join("\n"))
        .unwrap_or_else(|| panic!("no reply in {printed:?}"));
    let event = kcat(
        &[
            "-C",
            "-t",
            &format!("{prefix}OrderPlaced"),
            "-o",
            "beginning",
            "-c",
            "1",
            "-f",
            "%h\n%s\n",
        ],
        None,
    );
    crate::common::stop(host);

    let (rh, rp) = kcat_record(&reply);
    assert_eq!(
        rp,
        json!({"order_id": "K-9", "total_cents": 3998}),
        "{reply}"
    );
    assert_eq!(rh["ce_causationid"], id);
    assert_eq!(rh["ce_correlationid"], "kcat-1");
    assert_eq!(rh["ce_specversion"], "1.0");

    let (eh, ep) = kcat_record(&event);
    assert_eq!(ep["order_id"], "K-9", "{event}");
    assert_eq!(eh["ce_specversion"], "1.0");
    assert_eq!(eh["ce_type"], "OrderPlaced");
    assert_eq!(eh["ce_source"], format!("switchyard/{}", p.name));
    assert_eq!(eh["ce_sykind"], "event");
    assert_eq!(eh["ce_causationid"], id);
    assert_eq!(eh["ce_correlationid"], "kcat-1");
    assert_eq!(eh["content-type"], "application/json");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_added_while_running_reads_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::create_dir(dir.path().join("out2")).unwrap();
    let (path, p) = pipeline(
        dir.path(),
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let host = crate::common::Running::start(&p, runtime::RunOptions::quiet(RunMode::Serve)).await;
    let transport = runtime::open(&p).await.unwrap();
    let log = |d: &str| crate::common::tally_ids(&dir.path().join(d));
    let text = std::fs::read_to_string(&path).unwrap();
    let dist = crate::common::wasm("tally");

    // A running route cannot change its topics on Kafka: refused whole.
    std::fs::write(
        &path,
        text.replace(r#"events = ["Tick"]"#, r#"events = ["Tick", "Published"]"#),
    )
    .unwrap();
    let why = crate::common::refused(host.control.reload_from_disk().await);
    assert!(why.contains("route tally"), "{why}");

    // A new consumer of Tick: its group reads the topic.
    let grown = format!(
        "{text}\n[plugins.second]\nwasm = \"{}\"\nevents = [\"Tick\"]\ngrants = {{ dirs = [{{ host = \"out2\", guest = \"/out\", writable = true }}] }}\n",
        dist.display()
    );
    std::fs::write(&path, &grown).unwrap();
    let report = host.control.reload_from_disk().await.unwrap();
    assert_eq!(report.added, vec!["second".to_owned()]);
    let ticks: Vec<_> = (0..5)
        .map(|n| message(Kind::Event, "Tick", json!(n)))
        .collect();
    transport.enqueue(ticks.clone()).await.unwrap();
    crate::common::eventually("both consumers to read", Duration::from_secs(60), || {
        let (a, b) = (log("out").len(), log("out2").len());
        async move { a == 5 && b == 5 }
    })
    .await;
    let second: std::collections::HashSet<String> = log("out2").into_iter().collect();
    assert_eq!(second, ticks.iter().map(|m| m.id.clone()).collect());
    host.stop().await;
}

/// A `Misbehave` command with a count (`publish-bytes`, `headers`, ...).
fn misbehave_n(action: &str, count: usize) -> switchyard::envelope::Envelope {
    message(
        Kind::Command,
        "Misbehave",
        json!({ "action": action, "count": count }),
    )
}

/// An output the producer may not send (over `message.max.bytes`) is
/// refused before anything of its outcome is written, and its input is
/// dead-lettered as undeliverable; before, the batch was rewound and
/// handled again for ever.
#[tokio::test(flavor = "multi_thread")]
async fn an_output_over_the_record_limit_is_dead_lettered_not_rewound_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let (_, p) = pipeline(
        dir.path(),
        r#"
        [transport.properties]
        "message.max.bytes" = "20000"
        [defaults.retry]
        immediate = 0
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
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let big = misbehave_n("publish-bytes", 50_000);
    let small = misbehave_n("publish-bytes", 1_000);
    transport
        .enqueue(vec![big.clone(), small.clone()])
        .await
        .unwrap();

    drain(&p).await;

    let tally = std::fs::read_to_string(dir.path().join("out").join("tally.log")).unwrap();
    assert_eq!(
        tally.lines().count(),
        1,
        "only the small event went out: {tally}"
    );
    let dead = dead_letters(&p).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].message.id, big.id);
    assert_eq!(dead[0].error.kind, "undeliverable");
    assert!(
        dead[0].error.message.contains("message.max.bytes"),
        "{}",
        dead[0].error.message
    );
}

/// Records given back after a failed settle are read again from the lowest
/// one; those already settled after it are skipped, not handled again (the
/// dead-letter store being down used to make a whole batch run again on
/// every cycle).
#[tokio::test(flavor = "multi_thread")]
async fn records_given_back_are_read_again_but_settled_ones_after_them_are_not() {
    use switchyard::transport::{Outcome, Settlement};
    let dir = tempfile::tempdir().unwrap();
    let (_, p) = pipeline(
        dir.path(),
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let ticks: Vec<_> = (0..5)
        .map(|i| {
            let mut m = message(Kind::Event, "Tick", json!(i));
            m.partition_key = Some("one-partition".into());
            m
        })
        .collect();
    transport.enqueue(ticks.clone()).await.unwrap();
    let mut sub = transport.subscribe("tally").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while got.len() < 5 {
            got.extend(sub.receive(10).await.unwrap());
        }
    })
    .await
    .expect("five records");
    let ids: Vec<&str> = got.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(ids, ticks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>());
    let mut got = got.into_iter();
    let first = got.next().unwrap();
    let settled: Vec<Settlement> = got
        .map(|delivery| Settlement {
            journal: None,
            delivery,
            outcome: Outcome::Handled {
                outputs: Vec::new(),
                reply: None,
                state: Default::default(),
                saga: None,
            },
        })
        .collect();
    assert!(sub.settle(settled).await.unwrap().is_empty());
    sub.release(vec![first.clone()]).await.unwrap();

    let again = tokio::time::timeout(Duration::from_secs(30), sub.receive(10))
        .await
        .expect("the record given back comes again")
        .unwrap();
    assert_eq!(
        again
            .iter()
            .map(|d| d.envelope.id.as_str())
            .collect::<Vec<_>>(),
        [first.envelope.id.as_str()]
    );
    let more = tokio::time::timeout(Duration::from_secs(2), sub.receive(10)).await;
    assert!(
        more.is_err(),
        "records settled after it are not handed out again: {:?}",
        more.map(|r| r.map(|b| b.into_iter().map(|d| d.envelope.id).collect::<Vec<_>>()))
    );
}
