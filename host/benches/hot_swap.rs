//! What a hot swap costs, on a host running the tally plugin on the
//! embedded transport under a steady load:
//!
//! - from a changed `.wasm` file to the route serving it (`--watch`), with
//!   the component already in the compile cache and compiled afresh;
//! - from a deploy call (the admin API's work) to the route serving it;
//! - the swap itself, as the route measures it;
//! - throughput and handling latency within 100 ms of a swap against the
//!   rest of the run.
//!
//! Needs `dist/plugins/tally.wasm` and `tally_v2.wasm`
//! (`cargo xtask build-plugins`). Run with
//! `cargo bench -p switchyard --bench hot_swap`; `SWAPS` (default 20) and
//! `RATE` (messages/s, default 4000) change the run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::env_or;
use switchyard::config;
use switchyard::envelope::{Envelope, Kind};
use switchyard::runtime::{self, RunMode, RunOptions};
use switchyard::supervisor::Supervisor;
use switchyard::transport::Transport as _;

fn dist(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/plugins")
        .join(format!("{name}.wasm"));
    assert!(p.exists(), "run `cargo xtask build-plugins` first");
    p
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The same component with a custom section appended: valid, but with a
/// digest the compile cache has never seen.
fn fresh_build(bytes: &[u8], n: u64) -> Vec<u8> {
    let name = b"switchyard-bench";
    let payload = n.to_le_bytes();
    let mut section = Vec::new();
    leb(&mut section, name.len() as u64);
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    let mut out = bytes.to_vec();
    out.push(0);
    leb(&mut out, section.len() as u64);
    out.extend(section);
    out
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn serving(control: &Supervisor, digest: &str) -> bool {
    control
        .list()
        .await
        .iter()
        .any(|r| r.plugin == "tally" && r.digest == digest)
}

/// Waits (polling every 200 µs) until the route serves `digest`.
async fn until_serving(control: &Supervisor, digest: &str) -> Duration {
    let started = Instant::now();
    while !serving(control, digest).await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "swap never happened"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    started.elapsed()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let swaps = env_or("SWAPS", 20);
    let rate = env_or("RATE", 4000);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let component = dir.path().join("plugins").join("tally.wasm");
    let v1 = std::fs::read(dist("tally")).unwrap();
    let v2 = std::fs::read(dist("tally_v2")).unwrap();
    std::fs::write(&component, &v1).unwrap();
    let cache = dir.path().join("cache");
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[transport]
sync = "normal"
poll_interval = "5ms"

[host]
cache_dir = "{}"

[admin]
listen = "off"

[plugins.tally]
wasm = "plugins/tally.wasm"
events = ["Tick"]
grants = {{ clock = true, dirs = [{{ host = "out", guest = "/out", writable = true }}] }}
"#,
            cache.display()
        ),
    )
    .unwrap();
    let p = config::load(&path).unwrap().pipeline;
    let interval = p.watch_interval;
    let plugins = runtime::load_plugins(&p).await.unwrap();
    // Both builds in the compile cache, as after any earlier load.
    plugins
        .engine
        .load(
            &dist("tally_v2"),
            switchyard::supervisor::sandbox_of(&p.plugins[0]),
        )
        .unwrap();
    let (started, control) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let host = {
        let p = p.clone();
        tokio::spawn(async move {
            let options = RunOptions {
                watch: true,
                on_started: Some(started),
                ..RunOptions::quiet(RunMode::Serve)
            };
            runtime::run_with(&p, plugins, options, async move {
                let _ = stopped.await;
            })
            .await
        })
    };
    let control = control.await.unwrap();

    // Steady load, from a second connection to the store.
    let running = Arc::new(AtomicBool::new(true));
    let producer = {
        let running = running.clone();
        let p = p.clone();
        tokio::spawn(async move {
            let transport = runtime::open_transport(&p).unwrap();
            let mut sent: HashMap<String, u64> = HashMap::new();
            let per_tick = (rate / 200).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                let at = now_us();
                let batch: Vec<Envelope> = (0..per_tick)
                    .map(|_| Envelope::new("Tick", Kind::Event, b"{}".to_vec(), "application/json"))
                    .collect();
                sent.extend(batch.iter().map(|m| (m.id.clone(), at)));
                transport.enqueue(batch).await.unwrap();
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // File change → serving, with the component compiled before.
    let mut cached = Vec::new();
    let mut swap_at_us = Vec::new();
    let mut swap_us = Vec::new();
    for i in 0..swaps {
        let bytes = if i % 2 == 0 { &v2 } else { &v1 };
        let digest = switchyard::plugin::digest_of(bytes);
        replace(&component, bytes);
        cached.push(ms(until_serving(&control, &digest).await));
        swap_at_us.push(now_us());
        swap_us.extend(control.list().await[0].last_swap_us.map(|u| u as f64));
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // File change → serving, compiled from the new .wasm.
    let mut compiled = Vec::new();
    for i in 0..(swaps / 4).max(3) {
        let bytes = fresh_build(if i % 2 == 0 { &v1 } else { &v2 }, i as u64);
        let digest = switchyard::plugin::digest_of(&bytes);
        replace(&component, &bytes);
        compiled.push(ms(until_serving(&control, &digest).await));
        swap_at_us.push(now_us());
        swap_us.extend(control.list().await[0].last_swap_us.map(|u| u as f64));
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // Deploy call → serving (the admin API's work, without HTTP), cached.
    let mut deployed = Vec::new();
    for i in 0..swaps.min(10) {
        let bytes = if i % 2 == 0 { v2.clone() } else { v1.clone() };
        let digest = switchyard::plugin::digest_of(&bytes);
        let started = Instant::now();
        control.deploy("tally", bytes).await.unwrap();
        until_serving(&control, &digest).await;
        deployed.push(ms(started.elapsed()));
        swap_at_us.push(now_us());
        swap_us.extend(control.list().await[0].last_swap_us.map(|u| u as f64));
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    running.store(false, Ordering::Relaxed);
    let sent = producer.await.unwrap();
    let log = dir.path().join("out").join("tally.log");
    let started = Instant::now();
    let handled = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let handled: Vec<(String, u64)> = text
            .lines()
            .filter_map(|l| {
                let id = l.split(' ').next()?;
                let t = l.split(' ').find_map(|w| w.strip_prefix("t="))?;
                Some((id.to_owned(), t.parse().ok()?))
            })
            .collect();
        if handled.len() >= sent.len() || started.elapsed() > Duration::from_secs(60) {
            break handled;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(());
    host.await.unwrap().unwrap();

    // Around a swap: within 100 ms of the moment the route took the new
    // version.
    let near = |t: u64| {
        swap_at_us
            .iter()
            .any(|&s| t + 100_000 >= s && t <= s + 100_000)
    };
    let (mut lat_near, mut lat_far) = (Vec::new(), Vec::new());
    let mut windows: HashMap<u64, (usize, bool)> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (id, t) in &handled {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(&at) = sent.get(id) else { continue };
        let latency = t.saturating_sub(at) as f64 / 1e3;
        if near(*t) {
            lat_near.push(latency);
        } else {
            lat_far.push(latency);
        }
        let w = windows.entry(t / 50_000).or_insert((0, false));
        w.0 += 1;
        w.1 |= near(*t);
    }
    let first = handled.first().map_or(0, |(_, t)| t / 50_000);
    let last = handled.last().map_or(0, |(_, t)| t / 50_000);
    let (mut tp_near, mut tp_far) = (Vec::new(), Vec::new());
    for w in (first + 1)..last {
        let (n, is_near) = windows.get(&w).copied().unwrap_or((0, false));
        let per_s = n as f64 * 20.0;
        if is_near {
            tp_near.push(per_s)
        } else {
            tp_far.push(per_s)
        }
    }

    println!(
        "hot_swap: tally on the embedded transport, load {rate} msg/s, watch interval {interval:?}"
    );
    println!(
        "  messages: {} sent, {} handled ({} unique)",
        sent.len(),
        handled.len(),
        seen.len()
    );
    let line = |what: &str, v: &[f64], unit: &str| {
        println!(
            "  {what:<44} n={:<3} p50 {:>8.2} {unit}  p99 {:>8.2} {unit}  max {:>8.2} {unit}",
            v.len(),
            percentile(v.to_vec(), 0.5),
            percentile(v.to_vec(), 0.99),
            percentile(v.to_vec(), 1.0)
        );
    };
    line("file change → serving, precompiled", &cached, "ms");
    line(
        "file change → serving, compiled from .wasm",
        &compiled,
        "ms",
    );
    line("deploy call → serving, precompiled", &deployed, "ms");
    let swap_ms: Vec<f64> = swap_us.iter().map(|u| u / 1e3).collect();
    line("swap on the route", &swap_ms, "ms");
    line("handling latency, near a swap", &lat_near, "ms");
    line("handling latency, elsewhere", &lat_far, "ms");
    println!(
        "  throughput per 50 ms window (msg/s): near a swap min {:.0} median {:.0}; elsewhere min {:.0} median {:.0}",
        percentile(tp_near.clone(), 0.0),
        percentile(tp_near, 0.5),
        percentile(tp_far.clone(), 0.0),
        percentile(tp_far, 0.5)
    );
    println!(
        "  lost: {}",
        sent.keys().filter(|id| !seen.contains(*id)).count()
    );
}
