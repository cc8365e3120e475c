//! Switchyard on Kafka against a native rdkafka consumer doing the same
//! work, on the same cluster, in one run.
//!
//! Each round fills a fresh topic of PARTITIONS partitions with MESSAGES
//! events in Switchyard's format; then a native `BaseConsumer` and a
//! Switchyard host each read all of it in a consumer group of their own
//! (in turns, alternating who goes first), with the same consumer settings:
//! earliest offset, `read_committed`, automatic commits every second,
//! `fetch.wait.max.ms` 100,
//! automatic offset storing off and offsets stored after handling (the
//! native consumer after each message, Switchyard after each batch is
//! settled), a final commit at the end. The native consumer's handling is
//! nothing; Switchyard's is a call into the trivial `echo` plugin.
//! Switchyard runs in drain mode, and its time includes noticing that its
//! partitions are finished (commits compared with the high watermarks,
//! at most a few hundred milliseconds per round).
//!
//! Prints messages per second and CPU time per message (this process: user
//! plus system) for each round, then the medians and the ratio.
//!
//! The cluster is `KAFKA_BOOTSTRAP_SERVERS` (e.g. tansu, started by
//! `scripts/kafka-broker.sh`), or else librdkafka's mock cluster running
//! inside this process, whose CPU time is then counted for both consumers.
//! Needs `dist/plugins/echo.wasm`.
//!
//! Run: `cargo bench -p switchyard --bench kafka_vs_native`
//! (`KAFKA_BENCH_MESSAGES` and `KAFKA_BENCH_ROUNDS` override the defaults).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use switchyard::config::{self, Pipeline};
use switchyard::runtime::{self, RunMode};

use crate::common::{Comparison, Round, Timer, env_or, fill};

const PARTITIONS: usize = 3;

/// The cluster: `KAFKA_BOOTSTRAP_SERVERS`, or a mock cluster of three
/// brokers kept alive on a thread of its own (it is not `Send`).
fn cluster() -> (String, bool) {
    if let Ok(s) = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        && !s.is_empty()
    {
        return (s, false);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let cluster = rdkafka::mocking::MockCluster::new(3).expect("mock Kafka cluster");
        tx.send(cluster.bootstrap_servers()).expect("send address");
        loop {
            std::thread::park();
        }
    });
    (rx.recv().expect("mock cluster address"), true)
}

/// A pipeline with the echo plugin on topics and groups of its own.
fn pipeline(dir: &Path, servers: &str, mock: bool, wasm: &Path) -> Pipeline {
    let id = switchyard::envelope::new_id();
    let path = dir.join(format!("bench-{id}.toml"));
    std::fs::write(
        &path,
        format!(
            "[transport]\nkind = \"kafka\"\nbootstrap_servers = \"{servers}\"\n\
             topic_prefix = \"bench{id}.\"\ngroup_prefix = \"bench{id}\"\n\
             partitions = {PARTITIONS}\ncreate_topics = {}\ntimeout = \"30s\"\n\
             [admin]\nlisten = \"off\"\n\
             [plugins.echo]\nwasm = \"{}\"\nevents = [\"Tick\"]\nretry = {{ delayed = 0 }}\n",
            !mock,
            wasm.display()
        ),
    )
    .unwrap();
    config::load(&path).unwrap().pipeline
}

async fn fill_topic(pipeline: &Pipeline, n: usize) {
    let transport = runtime::open(pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    fill(transport.as_ref(), n).await;
}

fn native(servers: &str, topic: &str, n: usize) -> Round {
    let group = format!("native-{}", switchyard::envelope::new_id());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", "1000")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "100")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let timer = Timer::start();
    consumer.subscribe(&[topic]).unwrap();
    let mut handled = 0;
    while handled < n {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        std::hint::black_box(m.payload());
        consumer.store_offset_from_message(&m).unwrap();
        handled += 1;
    }
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    timer.stop()
}

async fn switchyard(pipeline: &Pipeline) -> Round {
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    let timer = Timer::start();
    runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    timer.stop()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that excludes us skips the run.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with("--"))
        && !"kafka_vs_native".contains(&filter)
    {
        return;
    }
    let messages = env_or("KAFKA_BENCH_MESSAGES", 50_000);
    let rounds = env_or("KAFKA_BENCH_ROUNDS", 3);
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/plugins/echo.wasm");
    assert!(wasm.exists(), "run `cargo xtask build-plugins` first");
    let (servers, mock) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Warm up: the compile cache, the client paths.
    let warm = pipeline(dir.path(), &servers, mock, &wasm);
    rt.block_on(async {
        fill_topic(&warm, 2_000).await;
        switchyard(&warm).await;
    });

    println!(
        "kafka_vs_native: {messages} messages per round, {PARTITIONS} partitions, offsets stored per message, on {}",
        if mock {
            "librdkafka's mock cluster (in this process)".to_owned()
        } else {
            servers.clone()
        }
    );
    let mut comparison = Comparison::default();
    for round in 1..=rounds {
        let p = pipeline(dir.path(), &servers, mock, &wasm);
        rt.block_on(fill_topic(&p, messages));
        let topic = match &p.transport {
            config::TransportConfig::Kafka(k) => format!("{}Tick", k.topic_prefix),
            _ => unreachable!("a kafka pipeline"),
        };
        // Alternate who reads first, so that neither always finds the
        // records warm in the broker's cache.
        let (n, s) = if round % 2 == 1 {
            let n = native(&servers, &topic, messages);
            (n, rt.block_on(switchyard(&p)))
        } else {
            let s = rt.block_on(switchyard(&p));
            (native(&servers, &topic, messages), s)
        };
        comparison.round(round, messages, &n, &s);
    }
    comparison.summary();
}
