//! End-to-end throughput of the embedded transport: messages per second
//! through a running host with a trivial plugin, every batch committed with
//! `synchronous=FULL` (fsync'd: durable against power loss) unless noted.
//!
//! Each iteration enqueues MESSAGES events, then runs the host in drain mode
//! and times until every queue is empty. The failure-path case makes 10% of
//! the messages fail once (transiently) and succeed on their retry: an
//! immediate retry, or a delayed one (scheduled durably, then moved back to
//! the queue when due, 1 ms later). The state case runs the `counter` test
//! plugin instead, whose `Bump` reads one key of its state and writes it
//! back plus one (100 keys in turn), committed with each batch. Needs
//! `dist/plugins/echo.wasm` and `dist/plugins/counter.wasm`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchyard::config;
use switchyard::envelope::{Envelope, Kind};
use switchyard::runtime::{self, RunMode};
use switchyard::transport::Transport;

const MESSAGES: u64 = 20_000;

/// A pipeline of one plugin (`echo` taking `Flaky`, or `counter` taking
/// `Bump`) on an embedded store of its own.
fn pipeline(
    dir: &std::path::Path,
    name: &str,
    sync: &str,
    retry: &str,
    (plugin, event): (&str, &str),
) -> config::Pipeline {
    let wasm =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../dist/plugins/{plugin}.wasm"));
    assert!(wasm.exists(), "run `cargo xtask build-plugins` first");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[transport]\npath = \"{name}.db\"\nsync = \"{sync}\"\n\
             [plugins.{plugin}]\nwasm = \"{}\"\nevents = [\"{event}\"]\nretry = {retry}\n",
            wasm.display()
        ),
    )
    .unwrap();
    config::load(&path).unwrap().pipeline
}

fn embedded(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("embedded_end_to_end");
    group.throughput(Throughput::Elements(MESSAGES));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let immediate = "{ immediate = 1, delayed = 0 }";
    let delayed = "{ immediate = 0, delayed = 1, backoff = \"1ms\", max_backoff = \"1ms\" }";
    let echo = ("echo", "Flaky");
    for (name, sync, failing_every, retry, plugin) in [
        ("all_succeed_sync_full", "full", None, immediate, echo),
        (
            "10pct_fail_once_retry_now_sync_full",
            "full",
            Some(10),
            immediate,
            echo,
        ),
        (
            "10pct_fail_once_retry_later_sync_full",
            "full",
            Some(10),
            delayed,
            echo,
        ),
        ("all_succeed_sync_normal", "normal", None, immediate, echo),
        (
            "state_get_set_sync_full",
            "full",
            None,
            immediate,
            ("counter", "Bump"),
        ),
    ] {
        let pipeline = pipeline(dir.path(), name, sync, retry, plugin);
        let message_type = plugin.1;
        let transport = runtime::open_transport(&pipeline).unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    rt.block_on(async {
                        let batch: Vec<Envelope> = (0..MESSAGES)
                            .map(|i| {
                                let fail = failing_every.is_some_and(|n| i % n == 0);
                                let body = if fail {
                                    format!("fail {i}")
                                } else if message_type == "Bump" {
                                    format!("key-{}", i % 100)
                                } else {
                                    format!("ok {i}")
                                };
                                Envelope::new(
                                    message_type,
                                    Kind::Event,
                                    body.into_bytes(),
                                    "text/plain",
                                )
                            })
                            .collect();
                        for chunk in batch.chunks(5_000) {
                            transport.enqueue(chunk.to_vec()).await.unwrap();
                        }
                        let plugins = runtime::load_plugins(&pipeline).await.unwrap();
                        let started = Instant::now();
                        runtime::run(&pipeline, plugins, RunMode::Drain, std::future::pending())
                            .await
                            .unwrap();
                        total += started.elapsed();
                    });
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, embedded);
criterion_main!(benches);
