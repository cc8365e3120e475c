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
//!
//! Both are timed the same way: from the start (creating and subscribing
//! the consumer, or starting the host) until a watcher, polling the group's
//! committed offsets every few milliseconds, sees them reach the end of
//! every partition, that is until the work is durable. Switchyard runs in
//! drain mode; how much later its run ends (it notices that it is drained,
//! then shuts down, leaving its group) is printed beside each round, not
//! counted, as the native consumer's close is not.
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
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
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

/// Runs `work`, which starts the clock (`go`) once it is set up, and times
/// the round until `group` has committed the end of every partition of
/// `topic`, as seen by a watcher polling every 5 ms. Returns the round and
/// how long `work` took from `go` to its end.
fn timed(
    servers: &str,
    group: &str,
    topic: &str,
    work: impl FnOnce(&dyn Fn()),
) -> (Round, Duration) {
    let watcher: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    let metadata = watcher
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let end = watcher
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        ends.insert(p.id(), end);
        tpl.add_partition(topic, p.id());
    }
    assert!(!ends.is_empty(), "{topic} has no partitions");
    // Finds the group's coordinator before the clock starts.
    watcher
        .committed_offsets(tpl.clone(), Duration::from_secs(10))
        .unwrap();
    let (start, started) = std::sync::mpsc::channel::<Timer>();
    let watch = std::thread::spawn(move || {
        let timer = started.recv().unwrap();
        let given_up = Instant::now() + Duration::from_secs(600);
        while Instant::now() < given_up {
            if let Ok(committed) = watcher.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                // A partition that was always empty has no commit.
                let at_end = |e: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>| {
                    let (low, high) = ends[&e.partition()];
                    match e.offset() {
                        Offset::Offset(o) => o >= high,
                        _ => low >= high,
                    }
                };
                if committed.elements().iter().all(at_end) {
                    return timer.stop();
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the group's commits never reached the end of the topic");
    });
    let started = std::cell::Cell::new(None);
    let go = || {
        start.send(Timer::start()).unwrap();
        started.set(Some(Instant::now()));
    };
    work(&go);
    let took = started.get().expect("the work started the clock").elapsed();
    (watch.join().unwrap(), took)
}

fn native(go: &dyn Fn(), servers: &str, group: &str, topic: &str, n: usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
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
    go();
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
}

/// Runs the host in drain mode; the plugins are loaded beforehand.
fn switchyard(go: &dyn Fn(), rt: &tokio::runtime::Runtime, pipeline: &Pipeline) {
    rt.block_on(async {
        let plugins = runtime::load_plugins(pipeline).await.unwrap();
        go();
        runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending())
            .await
            .unwrap();
    })
}

fn main() {
    if common::filtered_out("kafka_vs_native") {
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
    rt.block_on(fill_topic(&warm, 2_000));
    switchyard(&|| {}, &rt, &warm);

    println!(
        "kafka_vs_native: {messages} messages per round, {}, offsets stored per message, on {}",
        if mock {
            "partitions as the mock cluster creates them".to_owned()
        } else {
            format!("{PARTITIONS} partitions")
        },
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
        let (topic, group) = match &p.transport {
            config::TransportConfig::Kafka(k) => (
                format!("{}Tick", k.topic_prefix),
                format!("{}.echo", k.group_prefix),
            ),
            _ => unreachable!("a kafka pipeline"),
        };
        let native_group = format!("native-{}", switchyard::envelope::new_id());
        let run_native = || {
            timed(&servers, &native_group, &topic, |go| {
                native(go, &servers, &native_group, &topic, messages)
            })
        };
        let run_switchyard = || timed(&servers, &group, &topic, |go| switchyard(go, &rt, &p));
        // Alternate who reads first, so that neither always finds the
        // records warm in the broker's cache.
        let ((n, _), (s, drained)) = if round % 2 == 1 {
            let n = run_native();
            (n, run_switchyard())
        } else {
            let s = run_switchyard();
            (run_native(), s)
        };
        comparison.round(round, messages, &n, &s);
        println!(
            "         switchyard's run ended {} ms after its last commit (noticing it was drained, then shutting down)",
            drained.saturating_sub(s.elapsed).as_millis()
        );
    }
    comparison.summary();
}
