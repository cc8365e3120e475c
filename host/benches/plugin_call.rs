//! Cost of calling a plugin: a warm component call with a 1 KiB payload
//! against a native Rust call of the same handler, and a warm instance
//! against a fresh store + instance per message.
//!
//! For scale, `wasmtime_floor` calls the smallest component that takes a
//! 1 KiB list and returns it (hand-written, no language runtime, no host
//! calls) on the host's own engine: what wasmtime itself costs per call on
//! this machine, below which no plugin contract can go.
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

/// `echo: func(data: list<u8>) -> list<u8>` in the component model's text
/// format: a bump allocator reset after each call, and a function that
/// returns the list it was given where the host lowered it.
const FLOOR: &str = r#"
(component
  (core module $m
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 16))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $at i32)
      (local.set $at (global.get $next))
      (global.set $next (i32.add (global.get $next) (local.get 3)))
      (local.get $at))
    (func (export "echo") (param $ptr i32) (param $len i32) (result i32)
      (i32.store (i32.const 0) (local.get $ptr))
      (i32.store (i32.const 4) (local.get $len))
      (i32.const 0))
    (func (export "reset") (param i32)
      (global.set $next (i32.const 16))))
  (core instance $i (instantiate $m))
  (alias core export $i "memory" (core memory $memory))
  (alias core export $i "realloc" (core func $realloc))
  (alias core export $i "echo" (core func $echo))
  (alias core export $i "reset" (core func $reset))
  (func (export "echo") (param "data" (list u8)) (result (list u8))
    (canon lift (core func $echo) (memory $memory) (realloc $realloc)
      (post-return $reset))))
"#;

/// The floor component's `echo`.
type FloorEcho = wasmtime::component::TypedFunc<(&'static [u8],), (Vec<u8>,)>;

/// The floor component, instantiated on `engine` with no imports.
fn floor(engine: &wasmtime::Engine) -> (wasmtime::Store<()>, FloorEcho) {
    let bytes = wat::parse_str(FLOOR).unwrap();
    let component = wasmtime::component::Component::new(engine, bytes).unwrap();
    let mut store = wasmtime::Store::new(engine, ());
    // The engine interrupts by epoch; this store never runs long.
    store.set_epoch_deadline(u64::MAX / 2);
    let linker = wasmtime::component::Linker::new(engine);
    let instance = linker.instantiate(&mut store, &component).unwrap();
    let echo = instance
        .get_typed_func::<(&[u8],), (Vec<u8>,)>(&mut store, "echo")
        .unwrap();
    (store, echo)
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

    let (mut store, floor_echo) = floor(engine.engine());
    let data: &'static [u8] = Box::leak(payload().into_boxed_slice());
    group.bench_function("wasmtime_floor", |b| {
        b.iter(|| black_box(floor_echo.call(&mut store, (black_box(data),)).unwrap()))
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
