//! The HTTP ingress beside the paths it stands next to, on the embedded
//! transport (fsync on) and on RabbitMQ, with the trivial `echo` test
//! plugin and a host running as its own process (`switchyard run`):
//!
//! - request/reply: `POST /commands/Echo` answered with the reply, one
//!   request at a time over one keep-alive connection, against the same
//!   request made in process ([`TestPipeline::request`]), which has no HTTP
//!   in it: the difference is what the ingress adds;
//! - events: `POST /events/Tick` from 32 concurrent clients, each request
//!   answered once the event is durable, against `switchyard publish
//!   --lines` of as many events (the command line's bulk path: 1,000 a
//!   transaction).
//!
//! Run: `cargo bench -p switchyard --bench ingress` (plugins built first
//! with `cargo xtask build-plugins`; RabbitMQ on 127.0.0.1:5672, left out
//! with a note when it is not there). `INGRESS_REQUESTS` (default 2,000)
//! sets the requests of each request/reply run, `INGRESS_EVENTS` (10,000)
//! the events of each event run.

// A benchmark fails loudly on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::testing::TestPipeline;

const BROKER: &str = "amqp://127.0.0.1:5672/%2f";
const CLIENTS: usize = 32;

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A pipeline of the echo plugin on `transport` (a `[transport]` table),
/// with an ingress on `listen` if given.
fn pipeline(dir: &Path, name: &str, transport: &str, listen: Option<SocketAddr>) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let ingress = listen.map_or(String::new(), |l| format!("[ingress]\nlisten = \"{l}\"\n"));
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nname = \"{name}\"\n{transport}\n{ingress}[admin]\nlisten = \"off\"\n[plugins.echo]\nwasm = \"{}/echo.wasm\"\ncommands = [\"Echo\"]\nevents = [\"Tick\"]\n",
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50 and p99 of `took`, printed.
fn report(what: &str, mut took: Vec<Duration>) -> (Duration, Duration) {
    took.sort();
    let (p50, p99) = (percentile(&took, 0.5), percentile(&took, 0.99));
    println!(
        "{what:<48} p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms   ({} requests)",
        ms(p50),
        ms(p99),
        ms(took[took.len() - 1]),
        took.len()
    );
    (p50, p99)
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
        p.request("Echo", json!({ "n": i })).await.unwrap();
        took.push(started.elapsed());
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

fn start(path: &Path, listen: SocketAddr) -> Host {
    let host = Host(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "the ingress never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    host
}

async fn over_http(listen: SocketAddr, n: usize) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let url = format!("http://{listen}/commands/Echo");
    let post = |i: usize| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .header("prefer", "wait=10")
            .body(format!("{{\"n\":{i}}}"))
            .send()
    };
    for i in 0..100 {
        let r = post(i).await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let r = post(i).await.unwrap();
        let status = r.status();
        let body = r.bytes().await.unwrap();
        took.push(started.elapsed());
        assert_eq!(status, 200);
        assert_eq!(&body[..], format!("{{\"n\":{i}}}").as_bytes());
    }
    took
}

/// `n` events from [`CLIENTS`] concurrent clients; events per second.
async fn events_over_http(listen: SocketAddr, n: usize) -> f64 {
    let client = reqwest::Client::new();
    let url = format!("http://{listen}/events/Tick");
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                for i in (c..n).step_by(CLIENTS) {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(format!("{{\"n\":{i}}}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// `switchyard publish Tick --lines` of `n` events; events per second.
fn publish_lines(path: &Path, dir: &Path, n: usize) -> f64 {
    let lines = dir.join("ticks.jsonl");
    let text: String = (0..n).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    std::fs::write(&lines, text).unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["publish", "Tick", "-p"])
        .arg(path)
        .arg("--lines")
        .arg(&lines)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "switchyard publish failed: {out:?}");
    n as f64 / started.elapsed().as_secs_f64()
}

fn compare(runtime: &tokio::runtime::Runtime, dir: &Path, what: &str, transport: &str, name: &str) {
    let n = common::env_or("INGRESS_REQUESTS", 2_000);
    let events = common::env_or("INGRESS_EVENTS", 10_000);
    let reference = pipeline(dir, &format!("{name}-in-process"), transport, None);
    let (in_p50, in_p99) = report(
        &format!("{what}, in process (TestPipeline::request)"),
        runtime.block_on(in_process(&reference, n)),
    );
    let listen = free_addr();
    let path = pipeline(dir, name, transport, Some(listen));
    let host = start(&path, listen);
    let (http_p50, http_p99) = report(
        &format!("{what}, POST /commands/Echo"),
        runtime.block_on(over_http(listen, n)),
    );
    // Signed: a tail that is worse in process shows as a negative p99.
    println!(
        "{what}: over HTTP minus in process: p50 {:+.3} ms, p99 {:+.3} ms",
        ms(http_p50) - ms(in_p50),
        ms(http_p99) - ms(in_p99)
    );
    let rate = runtime.block_on(events_over_http(listen, events));
    println!(
        "{what}, POST /events/Tick ({CLIENTS} clients): {rate:>9.0} events/s ({events} events)"
    );
    // The same host consumes meanwhile, as it did the events over HTTP.
    let rate = publish_lines(&path, dir, events);
    println!("{what}, switchyard publish --lines:          {rate:>9.0} events/s ({events} events)");
    drop(host);
}

fn main() {
    if common::filtered_out("ingress") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stamp = std::process::id();
    println!("ingress: echo replies to Echo and consumes Tick");
    compare(&runtime, dir.path(), "embedded", "", "ingress-embedded");
    if std::net::TcpStream::connect("127.0.0.1:5672").is_ok() {
        let name = format!("ingress-amqp-{stamp}");
        compare(
            &runtime,
            dir.path(),
            "RabbitMQ",
            &amqp_transport(&name),
            &name,
        );
    } else {
        println!("RabbitMQ left out: nothing listens on 127.0.0.1:5672");
    }
}
