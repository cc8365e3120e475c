//! Saga steps on the embedded store: how long one step takes from enqueue
//! to settled (p50, p99), one message at a time, and how many steps a
//! second a drained backlog gets through; beside the same for a plain
//! plugin that keeps state (`counter`, one increment per message).
//!
//! Run: `cargo bench -p switchyard --bench saga` (plugins built first with
//! `cargo xtask build-plugins`). `SAGA_STEPS` (default 2,000) sets the
//! number of timed single steps, `SAGA_BACKLOG` (default 20,000) the size
//! of the drained backlog.

// A benchmark fails loudly on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::envelope::{Envelope, Kind};
use switchyard::testing::TestPipeline;

const INSTANCES: usize = 100;

fn dist() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("dist").join("plugins"))
        .unwrap_or_default();
    root.display().to_string()
}

fn pipeline(dir: &std::path::Path) -> std::path::PathBuf {
    let toml = format!(
        r#"
[plugins.ledger]
wasm = "{d}/ledger.wasm"
events = ["Open", "Add", "Close", "Reject", "Peek", "Remind", "Expire", "Charge", "Debit.Fault"]
[plugins.ledger.saga]
starts = ["Open"]
instance_key = "$.id"
instance_keys = {{ Peek = "correlation-id" }}

[plugins.bank]
wasm = "{d}/bank.wasm"
commands = ["Debit"]

[plugins.counter]
wasm = "{d}/counter.wasm"
events = ["Count", "Store", "Forget", "Bump", "Tick", "Counted"]
commands = ["Total"]
"#,
        d = dist()
    );
    let path = dir.join("saga-bench.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn event(t: &str, payload: serde_json::Value) -> Envelope {
    Envelope::new(
        t,
        Kind::Event,
        serde_json::to_vec(&payload).unwrap(),
        "application/json",
    )
}

fn add(i: usize) -> Envelope {
    event(
        "Add",
        json!({ "id": format!("L-{}", i % INSTANCES), "n": 1 }),
    )
}

fn tick(_: usize) -> Envelope {
    event("Tick", json!({}))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One message at a time: enqueue, wait until its route settled it.
async fn single_steps(
    p: &TestPipeline,
    route: &str,
    n: usize,
    make: fn(usize) -> Envelope,
) -> Vec<Duration> {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let id = p.enqueue(make(i)).await.unwrap();
        p.handled(route, &id).await.unwrap();
        took.push(started.elapsed());
    }
    took.sort();
    took
}

/// A backlog of `n` messages enqueued at once and drained: messages/s.
async fn backlog(p: &TestPipeline, n: usize, make: fn(usize) -> Envelope) -> f64 {
    let messages: Vec<Envelope> = (0..n).map(make).collect();
    let started = Instant::now();
    for chunk in messages.chunks(5_000) {
        p.enqueue_all(chunk.to_vec()).await.unwrap();
    }
    p.idle().await.unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

fn report(what: &str, took: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<34} p50 {:>6.3} ms   p99 {:>6.3} ms   max {:>6.3} ms   ({} steps)",
        ms(percentile(took, 0.5)),
        ms(percentile(took, 0.99)),
        ms(took[took.len() - 1]),
        took.len()
    );
}

fn main() {
    if common::filtered_out("saga") {
        return;
    }
    let steps = common::env_or("SAGA_STEPS", 2_000);
    let backlog_n = common::env_or("SAGA_BACKLOG", 20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let p = TestPipeline::start(pipeline(dir.path()))
            .await
            .unwrap()
            .with_deadline(Duration::from_secs(300));
        let opens: Vec<Envelope> = (0..INSTANCES)
            .map(|i| event("Open", json!({ "id": format!("L-{i}") })))
            .collect();
        p.enqueue_all(opens).await.unwrap();
        p.idle().await.unwrap();
        // Warm both routes.
        single_steps(&p, "ledger", 100, add).await;
        single_steps(&p, "counter", 100, tick).await;

        println!("saga: embedded store, {INSTANCES} instances, fsync on");
        report("saga step (ledger Add)", &single_steps(&p, "ledger", steps, add).await);
        report("state step (counter Tick)", &single_steps(&p, "counter", steps, tick).await);
        let saga_rate = backlog(&p, backlog_n, add).await;
        let state_rate = backlog(&p, backlog_n, tick).await;
        println!(
            "backlog of {backlog_n}: saga {saga_rate:.0} steps/s, state {state_rate:.0} msg/s ({:.0} %)",
            100.0 * saga_rate / state_rate
        );
        p.stop().await.unwrap();
    });
}
