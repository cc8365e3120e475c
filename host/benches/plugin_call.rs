//! Cost of calling a plugin: a warm component call with a 1 KiB payload
//! against a native Rust call of the same handler, and a warm instance
//! against a fresh store + instance per message.
//!
//! Needs `dist/plugins/echo.wasm` (`cargo xtask build-plugins`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::config::{Grants, Limits, PluginName};
use switchyard::envelope::{Envelope, Kind};
use switchyard::plugin::{LoadedPlugin, PluginEngine, Sandbox};
use switchyard_sdk::testing::TestHost;

fn echo(engine: &PluginEngine) -> LoadedPlugin {
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/plugins/echo.wasm");
    assert!(wasm.exists(), "run `cargo xtask build-plugins` first");
    let sandbox = Sandbox {
        name: PluginName::try_from("echo").unwrap(),
        limits: Limits::default(),
        grants: Grants::default(),
    };
    engine.load(&wasm, sandbox).unwrap()
}

fn payload() -> Vec<u8> {
    vec![b'x'; 1024]
}

fn calls(c: &mut Criterion) {
    let engine = PluginEngine::new(None).unwrap();
    let plugin = echo(&engine);
    let mut message = Envelope::new("Echo", Kind::Command, payload(), "application/octet-stream");

    let mut group = c.benchmark_group("call_1kib");
    let mut instance = plugin.instantiate().unwrap();
    group.bench_function("component_warm", |b| {
        b.iter(|| black_box(instance.handle(black_box(&mut message)).unwrap()))
    });

    let native = TestHost::<echo::Echo>::new();
    let native_message = switchyard_sdk::Message::command("Echo")
        .with_payload(payload(), "application/octet-stream");
    group.bench_function("native_rust", |b| {
        b.iter(|| black_box(native.handle(black_box(native_message.clone()))))
    });
    group.finish();

    let mut group = c.benchmark_group("per_message_instance");
    let mut warm = plugin.instantiate().unwrap();
    group.bench_function("reused_instance", |b| {
        b.iter(|| black_box(warm.handle(black_box(&mut message)).unwrap()))
    });
    group.bench_function("fresh_store_and_instance", |b| {
        b.iter(|| {
            let mut fresh = plugin.instantiate().unwrap();
            black_box(fresh.handle(black_box(&mut message)).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, calls);
criterion_main!(benches);
