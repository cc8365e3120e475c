//! The memory of a running host (`switchyard run`, release build, its own
//! process), read from `/proc/PID/status` (VmRSS, and VmHWM for peaks):
//!
//! - idle, with one Rust plugin (the `echo` test plugin), before and after
//!   its first message;
//! - what each extra warm instance costs: the same plugin with
//!   `concurrency = 1` and `= 8`, each lane having handled messages, the
//!   difference over 7; for the Rust `echo`, the Python `notices` and the
//!   JavaScript `fraud` examples;
//! - a backlog of 10,000 and of 100,000 messages of 1 KiB drained (the
//!   peak over the run), on the embedded transport and on RabbitMQ: what
//!   the host holds is bounded by what it takes in at once (see
//!   docs/benchmarks.md), not by the backlog.
//!
//! Run: `cargo bench -p switchyard --bench memory` (plugins built first
//! with `cargo xtask build-plugins`; RabbitMQ on 127.0.0.1:5672, left out
//! with a note when it is not there). Linux only (it reads `/proc`).

// A benchmark fails loudly on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::envelope::{Envelope, Kind};

const BROKER: &str = "amqp://127.0.0.1:5672/%2f";
const MIB: f64 = 1024.0 * 1024.0;

/// A plugin of the bench: its name, the keys of its table, and the
/// message it handles.
struct Plugin {
    language: &'static str,
    name: &'static str,
    keys: &'static str,
    message: fn(usize) -> Envelope,
}

fn event(t: &str, payload: serde_json::Value) -> Envelope {
    Envelope::new(
        t,
        Kind::Event,
        serde_json::to_vec(&payload).unwrap(),
        "application/json",
    )
}

/// A `Tick` of 1 KiB, which `echo` handles by doing nothing.
fn tick(i: usize) -> Envelope {
    let pad = "x".repeat(1000);
    event("Tick", json!({ "n": i, "pad": pad }))
}

fn receipt(i: usize) -> Envelope {
    event(
        "ReceiptSigned",
        json!({ "order_id": format!("A-{i}"), "customer": format!("c-{i}"), "total_cents": 2800, "checksum": "crc32:194abd58" }),
    )
}

fn order(i: usize) -> Envelope {
    event(
        "OrderPlaced",
        json!({ "order_id": format!("A-{i}"), "customer": format!("c-{i}"), "items": [], "total_cents": 2800 }),
    )
}

const ECHO: Plugin = Plugin {
    language: "Rust (echo)",
    name: "echo",
    keys: "events = [\"Tick\"]\ncommands = [\"Echo\"]",
    message: tick,
};

const PLUGINS: [Plugin; 3] = [
    ECHO,
    Plugin {
        language: "Python (notices)",
        name: "notices",
        keys: "events = [\"ReceiptSigned\"]\nmemory = \"64 MiB\"\n[plugins.notices.grants]\nclock = true",
        message: receipt,
    },
    Plugin {
        language: "JavaScript (fraud)",
        name: "fraud",
        // Its `SignReceipt` and `NotifyCustomer` commands need handlers:
        // the C `receipts` and the Python `notices` examples, one instance
        // each whatever the concurrency of `fraud`.
        keys: "events = [\"OrderPlaced\"]\nmemory = \"64 MiB\"\n\
               [plugins.receipts]\nwasm = \"{dist}/receipts.wasm\"\ncommands = [\"SignReceipt\"]\n\
               [plugins.notices]\nwasm = \"{dist}/notices.wasm\"\ncommands = [\"NotifyCustomer\"]\nmemory = \"64 MiB\"\n\
               [plugins.notices.grants]\nclock = true",
        message: order,
    },
];

fn pipeline(dir: &Path, name: &str, transport: &str, plugin: &Plugin, lanes: usize) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nname = \"{name}\"\n{transport}\n[plugins.{p}]\nwasm = \"{d}/{p}.wasm\"\nconcurrency = {lanes}\n{k}\n",
            p = plugin.name,
            d = common::dist(),
            k = plugin.keys.replace("{dist}", &common::dist()),
        ),
    )
    .unwrap();
    path
}

/// A `switchyard run` that is killed when dropped.
struct Host {
    child: std::process::Child,
    log: PathBuf,
}

impl Host {
    fn start(path: &Path) -> Host {
        let log = path.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("run")
            .arg(path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Host { child, log }
    }

    /// Fails the bench with the host's log if the host has exited.
    fn check(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("the host exited ({status}):\n{log}");
        }
    }

    /// VmRSS and VmHWM, in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap()
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enqueues `n` messages of `plugin` and waits until the host drained
/// them.
async fn drain(host: &mut Host, path: &Path, plugin: &Plugin, n: usize) {
    let pipeline = switchyard::config::load(path).unwrap().pipeline;
    let transport = switchyard::runtime::open(&pipeline).await.unwrap();
    let mut i = 0;
    while i < n {
        let chunk: Vec<Envelope> = (i..(i + 5_000).min(n)).map(plugin.message).collect();
        i += chunk.len();
        transport.enqueue(chunk).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while !transport.is_idle().await.unwrap() {
        host.check();
        assert!(Instant::now() < deadline, "the host did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the host answers an `Echo` (it is up).
fn wait_up(path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["send", "Echo", "-p"])
        .arg(path)
        .args(["--data", "{}", "--wait-reply", "60s"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "the host did not answer: {out:?}");
}

/// Starts a host and waits until it has created its store and routes.
async fn up(path: &Path, plugin: &Plugin) -> Host {
    let mut host = Host::start(path);
    if plugin.name == "echo" {
        wait_up(path);
    } else {
        // One message through the route says it runs.
        drain(&mut host, path, plugin, 1).await;
    }
    host
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

fn amqp(name: &str) -> String {
    format!(
        "[transport]\nkind = \"amqp\"\nurl = \"{BROKER}\"\nexchange = \"{name}\"\nprefetch = 200\n"
    )
}

fn main() {
    if common::filtered_out("memory") {
        return;
    }
    assert!(
        Path::new("/proc/self/status").exists(),
        "the memory bench reads /proc (Linux)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let settle = || std::thread::sleep(Duration::from_millis(500));
    runtime.block_on(async {
        println!("memory: switchyard run, release build; VmRSS (VmHWM for peaks)");

        // Idle, one Rust plugin.
        let path = pipeline(dir.path(), "idle", "", &ECHO, 1);
        let host = Host::start(&path);
        std::thread::sleep(Duration::from_secs(2));
        let (before, _) = host.memory();
        wait_up(&path);
        std::thread::sleep(Duration::from_secs(1));
        let (after, _) = host.memory();
        drop(host);
        println!(
            "idle host, one Rust plugin: {:.1} MiB before its first message, {:.1} MiB after",
            mib(before),
            mib(after)
        );

        // Each extra warm instance.
        for plugin in &PLUGINS {
            let mut rss = Vec::new();
            for lanes in [1, 8] {
                let path = pipeline(
                    dir.path(),
                    &format!("{}-{lanes}", plugin.name),
                    "",
                    plugin,
                    lanes,
                );
                let mut host = up(&path, plugin).await;
                // Several batches of messages without keys: every lane
                // gets some, so every lane has made its instance.
                drain(&mut host, &path, plugin, 2_000).await;
                settle();
                rss.push(host.memory().0);
            }
            println!(
                "{:<20} concurrency 1: {:.1} MiB, 8: {:.1} MiB; each extra warm instance {:.2} MiB",
                plugin.language,
                mib(rss[0]),
                mib(rss[1]),
                (mib(rss[1]) - mib(rss[0])) / 7.0
            );
        }

        // Backlogs.
        let rabbit = std::net::TcpStream::connect("127.0.0.1:5672").is_ok();
        let stamp = std::process::id();
        for (transport, name) in [("", "embedded"), ("amqp", "RabbitMQ (prefetch 200)")] {
            if transport == "amqp" && !rabbit {
                println!("RabbitMQ left out: nothing listens on 127.0.0.1:5672");
                continue;
            }
            for n in [10_000, 100_000] {
                let pname = format!("backlog-{stamp}-{transport}{n}");
                let table = if transport.is_empty() {
                    String::new()
                } else {
                    amqp(&pname)
                };
                let path = pipeline(dir.path(), &pname, &table, &ECHO, 1);
                let mut host = up(&path, &ECHO).await;
                let (idle, _) = host.memory();
                let started = Instant::now();
                drain(&mut host, &path, &ECHO, n).await;
                let took = started.elapsed();
                let (rss, peak) = host.memory();
                println!(
                    "{name:<24} backlog {n:>7} of 1 KiB: idle {:.1} MiB, peak {:.1} MiB, after {:.1} MiB ({:.1} s)",
                    mib(idle),
                    mib(peak),
                    mib(rss),
                    took.as_secs_f64()
                );
            }
        }
    });
}
