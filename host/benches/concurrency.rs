//! Routes with `concurrency = 2` against `concurrency = 1`, on the
//! embedded transport (fsync on): messages per second draining a backlog
//! through a CPU-heavy plugin, and the ratio.
//!
//! - `notices` (Python, the example; about 100 µs a message) handling
//!   `ReceiptSigned`, which counts each customer's notices in its state;
//!   500 customers, the customer as partition key.
//! - `fraud` (JavaScript, the example; about 200 µs a message) handling
//!   `OrderPlaced`, which counts each customer's orders; the same keys.
//!   Each order it accepts sends a `SignReceipt` command, handled by the C
//!   `receipts` example on a route with as many lanes, so the drain counts
//!   both.
//! - `counter` (Rust, a few µs a message) counting one key that every
//!   message updates, without partition keys: the worst case, where lanes
//!   keep reading what the other wrote and messages go back.
//!
//! Each round enqueues the backlog, loads the plugins, then times a host
//! in drain mode until every queue is empty. Run:
//! `cargo bench -p switchyard --bench concurrency` (plugins built first
//! with `cargo xtask build-plugins`). `CONCURRENCY_BENCH_MESSAGES`
//! (default 10,000) and `CONCURRENCY_BENCH_ROUNDS` (3) set the size.

// A benchmark fails loudly on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use switchyard::envelope::{Envelope, Kind};
use switchyard::runtime::{self, RunMode};
use switchyard::transport::Transport as _;

const CUSTOMERS: usize = 500;

struct Case {
    name: &'static str,
    plugin: &'static str,
    route: &'static str,
    message: fn(usize) -> Envelope,
}

fn event(t: &str, payload: serde_json::Value, key: Option<String>) -> Envelope {
    let mut e = Envelope::new(
        t,
        Kind::Event,
        serde_json::to_vec(&payload).unwrap(),
        "application/json",
    );
    e.partition_key = key;
    e
}

fn receipt(i: usize) -> Envelope {
    let customer = format!("c-{}", i % CUSTOMERS);
    event(
        "ReceiptSigned",
        json!({ "order_id": format!("A-{i}"), "customer": customer, "total_cents": 2800, "checksum": "crc32:194abd58" }),
        Some(customer),
    )
}

fn order(i: usize) -> Envelope {
    let customer = format!("c-{}", i % CUSTOMERS);
    event(
        "OrderPlaced",
        json!({ "order_id": format!("A-{i}"), "customer": customer, "items": [], "total_cents": 2800 }),
        Some(customer),
    )
}

fn hot(_: usize) -> Envelope {
    event("Count", json!({ "key": "hot" }), None)
}

const CASES: [Case; 3] = [
    Case {
        name: "python notices, per-customer state",
        plugin: "notices",
        route: "events = [\"ReceiptSigned\"]\nmemory = \"64 MiB\"\n[plugins.notices.grants]\nclock = true",
        message: receipt,
    },
    Case {
        name: "javascript fraud, per-customer state",
        plugin: "fraud",
        // Every order it accepts becomes a `SignReceipt` command, handled
        // by the C `receipts` example with as many lanes; `notices` takes
        // the `NotifyCustomer` commands of orders under review (none here).
        route: "events = [\"OrderPlaced\"]\nmemory = \"64 MiB\"\n\
                [plugins.receipts]\nwasm = \"{dist}/receipts.wasm\"\ncommands = [\"SignReceipt\"]\nconcurrency = {concurrency}\n\
                [plugins.notices]\nwasm = \"{dist}/notices.wasm\"\ncommands = [\"NotifyCustomer\"]\nmemory = \"64 MiB\"\n\
                [plugins.notices.grants]\nclock = true",
        message: order,
    },
    Case {
        name: "rust counter, one key for all",
        plugin: "counter",
        route: "events = [\"Count\"]",
        message: hot,
    },
];

/// The pipeline of `case` with `concurrency` lanes, on a store of its own.
fn pipeline(dir: &Path, case: &Case, concurrency: usize) -> switchyard::config::Pipeline {
    let name = format!("{}-{concurrency}", case.plugin);
    let path = dir.join(format!("{name}.toml"));
    // `concurrency` goes before the route's keys, which may open a
    // sub-table.
    std::fs::write(
        &path,
        format!(
            "[transport]\npath = \"{name}.db\"\n[plugins.{p}]\nwasm = \"{d}/{p}.wasm\"\nconcurrency = {concurrency}\n{r}\n",
            p = case.plugin,
            d = common::dist(),
            r = case
                .route
                .replace("{dist}", &common::dist())
                .replace("{concurrency}", &concurrency.to_string()),
        ),
    )
    .unwrap();
    switchyard::config::load(&path).unwrap().pipeline
}

/// Messages per second of one drained backlog of `n`.
async fn round(pipeline: &switchyard::config::Pipeline, case: &Case, n: usize) -> f64 {
    let transport = runtime::open_transport(pipeline).unwrap();
    let messages: Vec<Envelope> = (0..n).map(case.message).collect();
    for chunk in messages.chunks(5_000) {
        transport.enqueue(chunk.to_vec()).await.unwrap();
    }
    drop(transport);
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    let started = Instant::now();
    runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    if common::filtered_out("concurrency") {
        return;
    }
    let n = common::env_or("CONCURRENCY_BENCH_MESSAGES", 10_000);
    let rounds = common::env_or("CONCURRENCY_BENCH_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "concurrency: embedded transport, fsync on, {n} messages a round, {rounds} rounds, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    runtime.block_on(async {
        for case in &CASES {
            let dir = tempfile::tempdir().unwrap();
            let one = pipeline(dir.path(), case, 1);
            let two = pipeline(dir.path(), case, 2);
            // A first round of each warms the compile cache and the store.
            round(&one, case, n / 10).await;
            round(&two, case, n / 10).await;
            let mut ones = Vec::new();
            let mut twos = Vec::new();
            for _ in 0..rounds {
                ones.push(round(&one, case, n).await);
                twos.push(round(&two, case, n).await);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (a, b) = (median(&mut ones), median(&mut twos));
            println!(
                "{:<40} 1 lane {a:>8.0} msg/s   2 lanes {b:>8.0} msg/s   {:.2}x   (rounds: {:?} / {:?})",
                case.name,
                b / a,
                ones.iter().map(|r| r.round() as u64).collect::<Vec<_>>(),
                twos.iter().map(|r| r.round() as u64).collect::<Vec<_>>(),
            );
        }
    });
}
