//! Request/reply latency through a trivial handler (the `echo` test
//! plugin's `Echo` command, which replies with its payload), one request
//! at a time, on the embedded transport (fsync on) and on RabbitMQ:
//!
//! - in process: [`TestPipeline::request`], from sending the command to
//!   holding the reply;
//! - from the command line: `switchyard send Echo --wait-reply` against a
//!   host running as its own process (`switchyard run`), timed from
//!   spawning the command to its exit, so process start-up and reading the
//!   pipeline are in it.
//!
//! Run: `cargo bench -p switchyard --bench latency` (plugins built first
//! with `cargo xtask build-plugins`; RabbitMQ on 127.0.0.1:5672, left out
//! with a note when it is not there). `LATENCY_REQUESTS` (default 2,000)
//! sets the in-process requests, `LATENCY_CLI_REQUESTS` (200) the
//! command-line ones.

// A benchmark fails loudly on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::testing::TestPipeline;

const BROKER: &str = "amqp://127.0.0.1:5672/%2f";

/// A pipeline of the echo plugin on `transport` (a `[transport]` table,
/// or nothing for the embedded one).
fn pipeline(dir: &Path, name: &str, transport: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nname = \"{name}\"\n{transport}\n[plugins.echo]\nwasm = \"{}/echo.wasm\"\ncommands = [\"Echo\"]\n",
            common::dist()
        ),
    )
    .unwrap();
    path
}

fn amqp_transport(name: &str) -> String {
    format!("[transport]\nkind = \"amqp\"\nurl = \"{BROKER}\"\nexchange = \"{name}\"\n")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut took: Vec<Duration>) {
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<44} p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms   ({} requests)",
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        ms(took[took.len() - 1]),
        took.len()
    );
}

async fn in_process(path: &Path, n: usize) -> Vec<Duration> {
    let p = TestPipeline::start(path)
        .await
        .unwrap()
        .with_deadline(Duration::from_secs(30));
    for i in 0..100 {
        p.request("Echo", json!({ "warm": i })).await.unwrap();
    }
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let reply = p.request("Echo", json!({ "n": i })).await.unwrap();
        took.push(started.elapsed());
        assert_eq!(
            reply.payload,
            serde_json::to_vec(&json!({ "n": i })).unwrap()
        );
    }
    p.stop().await.unwrap();
    took
}

/// A `switchyard run` of `path` that is killed when dropped.
struct Host(std::process::Child);

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn send(path: &Path, i: usize) -> Duration {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["send", "Echo", "-p"])
        .arg(path)
        .args(["--data", &format!("{{\"n\":{i}}}"), "--wait-reply", "10s"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "switchyard send failed: {out:?}");
    took
}

fn from_the_command_line(path: &Path, n: usize) -> Vec<Duration> {
    let _host = Host(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The first reply says the host is up.
    send(path, 0);
    for i in 0..10 {
        send(path, i);
    }
    (0..n).map(|i| send(path, i)).collect()
}

fn main() {
    if common::filtered_out("latency") {
        return;
    }
    let n = common::env_or("LATENCY_REQUESTS", 2_000);
    let cli = common::env_or("LATENCY_CLI_REQUESTS", 200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stamp = std::process::id();
    let embedded = pipeline(dir.path(), "latency-embedded", "");
    println!("latency: echo replies to Echo, one request at a time");
    report(
        "embedded, in process (TestPipeline::request)",
        runtime.block_on(in_process(&embedded, n)),
    );
    let rabbit = std::net::TcpStream::connect("127.0.0.1:5672").is_ok();
    let amqp = pipeline(
        dir.path(),
        &format!("latency-amqp-{stamp}"),
        &amqp_transport(&format!("latency-{stamp}")),
    );
    if rabbit {
        report(
            "RabbitMQ, in process (TestPipeline::request)",
            runtime.block_on(in_process(&amqp, n)),
        );
    } else {
        println!("RabbitMQ left out: nothing listens on 127.0.0.1:5672");
    }
    report(
        "embedded, switchyard send --wait-reply",
        from_the_command_line(&embedded, cli),
    );
    if rabbit {
        report(
            "RabbitMQ, switchyard send --wait-reply",
            from_the_command_line(&amqp, cli),
        );
    }
}
