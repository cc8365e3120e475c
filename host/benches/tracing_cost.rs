//! What tracing adds per message: a warm `Tick` through the echo plugin with
//! a `traceparent` header, handled by a worker with tracing off, and with
//! every message sampled (a `process` span, the header extracted, ended and
//! handed to the batch processor, whose exporter drops it).
//!
//! Needs `dist/plugins/echo.wasm` (`cargo xtask build-plugins`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use switchyard::config::{Grants, Limits, PluginName};
use switchyard::dispatch::Worker;
use switchyard::envelope::{Envelope, Kind};
use switchyard::plugin::{PluginEngine, Sandbox};
use switchyard::recover::RetryPolicy;
use switchyard::telemetry::Telemetry;
use switchyard::transport::Delivery;

/// Accepts spans and drops them: measures the SDK, not a network.
#[derive(Debug)]
struct Drop;

impl SpanExporter for Drop {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

fn tracing_cost(c: &mut Criterion) {
    let engine = PluginEngine::new(None).unwrap();
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/plugins/echo.wasm");
    assert!(wasm.exists(), "run `cargo xtask build-plugins` first");
    let sandbox = Sandbox {
        name: PluginName::try_from("echo").unwrap(),
        limits: Limits::default(),
        grants: Grants::default(),
    };
    let plugin = engine.load(&wasm, sandbox).unwrap();
    let mut envelope = Envelope::new("Tick", Kind::Event, vec![b'x'; 64], "text/plain");
    envelope.headers.push((
        "traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    ));
    let delivery = Delivery {
        envelope,
        receipt: 1,
        malformed: None,
        origin: None,
    };

    let mut group = c.benchmark_group("per_message_tracing");
    let mut off = Worker::new(plugin.clone(), RetryPolicy::default());
    group.bench_function("off", |b| {
        b.iter(|| {
            let mut d = delivery.clone();
            black_box(off.process_traced(&mut d).unwrap())
        })
    });
    // The runtime the batch processor's thread is started from.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let telemetry = rt.block_on(async { Telemetry::with_batched_span_exporter(Drop) });
    let mut on = Worker::new(plugin, RetryPolicy::default()).with_telemetry(telemetry.clone());
    group.bench_function("sampled_100pct", |b| {
        b.iter(|| {
            let mut d = delivery.clone();
            black_box(on.process_traced(&mut d).unwrap())
        })
    });
    group.finish();
    telemetry.shutdown();
}

criterion_group!(benches, tracing_cost);
criterion_main!(benches);
