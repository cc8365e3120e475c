//! What the journal costs, and how fast `switchyard why` reads it.
//!
//! 1. Throughput with the journal off, on, and on with payloads, in turns,
//!    on the embedded transport (fsync on: records commit in the settle
//!    transaction) and, when RabbitMQ runs on 127.0.0.1:5672, on RabbitMQ
//!    (records written after the settle to the journal's own SQLite file).
//!    The `echo` test plugin, 1 KiB events; each round enqueues the
//!    backlog, then times a host in drain mode until every queue is empty.
//! 2. `why`'s story of one message in a journal of 100,000 records (10,000
//!    flows of ten messages), read from the SQLite file.
//!
//! Run: `cargo bench -p switchyard --bench journal` (plugins built first
//! with `cargo xtask build-plugins`). `JOURNAL_BENCH_MESSAGES` (default
//! 20,000) and `JOURNAL_BENCH_ROUNDS` (3) set the size;
//! `JOURNAL_BENCH_TRANSPORTS` (default `embedded,rabbitmq`) the transports;
//! `JOURNAL_BENCH_WHY=0` leaves out part 2 (to profile the settle alone).

// A benchmark fails loudly on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use switchyard::envelope::{Envelope, Kind};
use switchyard::journal::{self, Record};
use switchyard::runtime::{self, RunMode};

/// The journal settings compared.
const SETTINGS: [(&str, &str); 3] = [
    ("off", "[journal]\nenabled = false\n"),
    ("on", ""),
    (
        "on, payloads",
        "[journal]\npayloads = true\nmax_payload = \"1 KiB\"\n",
    ),
];

fn pipeline(
    dir: &Path,
    name: &str,
    transport: &str,
    journal: &str,
) -> switchyard::config::Pipeline {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "{transport}\n{journal}\n[plugins.echo]\nwasm = \"{}/echo.wasm\"\nevents = [\"Tick\"]\n",
            common::dist()
        ),
    )
    .unwrap();
    switchyard::config::load(&path).unwrap().pipeline
}

/// Messages per second of one drained backlog of `n`.
async fn round(pipeline: &switchyard::config::Pipeline, n: usize) -> f64 {
    let transport = runtime::open(pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    let body = vec![b'x'; 1000];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(5_000);
        let batch: Vec<Envelope> = (0..chunk)
            .map(|i| {
                let mut payload = format!("{{\"n\":{i},\"pad\":\"").into_bytes();
                payload.extend_from_slice(&body);
                payload.extend_from_slice(b"\"}");
                Envelope::new("Tick", Kind::Event, payload, "application/json")
            })
            .collect();
        transport.enqueue(batch).await.unwrap();
        left -= chunk;
    }
    drop(transport);
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    let started = Instant::now();
    runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

async fn compare(label: &str, pipelines: &[switchyard::config::Pipeline], n: usize, rounds: usize) {
    // A first round of each warms the compile cache and the stores.
    for p in pipelines {
        round(p, n / 10).await;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); pipelines.len()];
    for _ in 0..rounds {
        for (i, p) in pipelines.iter().enumerate() {
            rates[i].push(round(p, n).await);
        }
    }
    let medians: Vec<f64> = rates.iter().map(|r| common::median(r.clone())).collect();
    for (i, (name, _)) in SETTINGS.iter().enumerate() {
        println!(
            "{label:<10} journal {name:<13} {:>8.0} msg/s  ({:>5.1} % of off)  rounds {:?}",
            medians[i],
            100.0 * medians[i] / medians[0],
            rates[i]
                .iter()
                .map(|r| r.round() as u64)
                .collect::<Vec<_>>()
        );
    }
}

/// `why` on the middle message of flows in a journal of 100,000 records.
async fn why_speed(dir: &Path) {
    let file = dir.join("why.db");
    let store: Arc<dyn journal::Store> =
        Arc::new(journal::sqlite::SqliteJournal::open(&file).unwrap());
    for chunk in 0..100 {
        let records: Vec<Record> = (chunk * 100..(chunk + 1) * 100)
            .flat_map(|flow| (0..10).map(move |hop| common::journal_record(flow, hop)))
            .collect();
        store.write(records).await.unwrap();
    }
    let path = dir.join("why.toml");
    std::fs::write(
        &path,
        format!(
            "[transport]\npath = \"why.db\"\n[plugins.echo]\nwasm = \"{}/echo.wasm\"\nevents = [\"Tick\"]\n",
            common::dist()
        ),
    )
    .unwrap();
    let p = switchyard::config::load(&path).unwrap().pipeline;
    let letters = switchyard::dlq::open(&p.dead_letters, &p.name)
        .await
        .unwrap();
    let mut times = Vec::new();
    for flow in (0..10_000).step_by(97) {
        let id = common::journal_record(flow, 5).message_id;
        let started = Instant::now();
        let story = switchyard::cli::why::story_of(store.clone(), letters.clone(), &id)
            .await
            .unwrap()
            .unwrap();
        let _ = switchyard::cli::why::tell(&story);
        times.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(story.messages.len(), 10);
    }
    let n = times.len();
    times.sort_by(f64::total_cmp);
    println!(
        "why, journal of {} records: {n} stories of 10 messages, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        store.count().await.unwrap(),
        times[n / 2],
        times[(n * 99 / 100).min(n - 1)],
        times[n - 1]
    );
}

fn main() {
    if common::filtered_out("journal") {
        return;
    }
    let n = common::env_or("JOURNAL_BENCH_MESSAGES", 20_000);
    let rounds = common::env_or("JOURNAL_BENCH_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let transports =
        std::env::var("JOURNAL_BENCH_TRANSPORTS").unwrap_or_else(|_| "embedded,rabbitmq".into());
    let wanted = |t: &str| transports.split(',').any(|w| w.trim() == t);
    println!("journal: {n} messages of 1 KiB a round, {rounds} rounds, echo plugin");
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let embedded: Vec<_> = SETTINGS
            .iter()
            .enumerate()
            .map(|(i, (_, j))| {
                pipeline(
                    dir.path(),
                    &format!("embedded{i}"),
                    &format!("[transport]\npath = \"embedded{i}.db\"\n"),
                    j,
                )
            })
            .collect();
        if wanted("embedded") {
            compare("embedded", &embedded, n, rounds).await;
        }
        let broker = wanted("rabbitmq")
            && tokio::net::TcpStream::connect("127.0.0.1:5672").await.is_ok();
        if broker {
            let amqp: Vec<_> = SETTINGS
                .iter()
                .enumerate()
                .map(|(i, (_, j))| {
                    let exchange = format!("switchyard-bench.{}", switchyard::envelope::new_id());
                    pipeline(
                        dir.path(),
                        &format!("amqp{i}"),
                        &format!(
                            "[transport]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1:5672/%2f\"\nexchange = \"{exchange}\"\n"
                        ),
                        j,
                    )
                })
                .collect();
            compare("rabbitmq", &amqp, n, rounds).await;
        } else {
            println!("rabbitmq: left out (not asked for, or nothing on 127.0.0.1:5672)");
        }
        if common::env_or("JOURNAL_BENCH_WHY", 1) != 0 {
            why_speed(dir.path()).await;
        }
    });
}
