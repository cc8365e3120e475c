//! The example plugins side by side, one per language: component size,
//! instantiation (a fresh store and instance), with and without its first
//! message, the cost of one message on a warm instance (replaced every
//! 10,000 messages, as the host's default `recycle_after` does), and the
//! linear memory an instance holds when it starts and after 10,000
//! messages. Each plugin handles its own kind of message from the polyglot
//! pipeline.
//!
//! Needs `dist/plugins/` (`cargo xtask build-plugins`). Sizes and memory
//! are printed before criterion's timings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::config::{Grants, Limits, PluginName};
use switchyard::envelope::{Envelope, Kind};
use switchyard::plugin::{LoadedPlugin, PluginEngine, Sandbox};

/// (language, plugin, message type, kind, JSON payload)
const PLUGINS: [(&str, &str, &str, Kind, &str); 4] = [
    (
        "rust",
        "orders",
        "PlaceOrder",
        Kind::Command,
        r#"{"order_id":"A-1","customer":"ada","items":[{"sku":"book","quantity":2,"unit_price_cents":1400}]}"#,
    ),
    (
        "javascript",
        "fraud",
        "OrderPlaced",
        Kind::Event,
        r#"{"order_id":"A-1","customer":"ada","items":[],"total_cents":2800}"#,
    ),
    (
        "c",
        "receipts",
        "SignReceipt",
        Kind::Command,
        r#"{"order_id":"A-1","customer":"ada","total_cents":2800}"#,
    ),
    (
        "python",
        "notices",
        "ReceiptSigned",
        Kind::Event,
        r#"{"order_id":"A-1","customer":"ada","total_cents":2800,"checksum":"crc32:194abd58"}"#,
    ),
];

const RECYCLE_AFTER: u64 = switchyard::config::DEFAULT_RECYCLE_AFTER;

/// An instance whose state reads come from an empty store held in memory
/// (the JavaScript and Python examples count in their state), as the host
/// gives every instance a store.
fn instance_of(plugin: &LoadedPlugin) -> switchyard::plugin::Instance {
    let mut instance = plugin.instantiate().unwrap();
    let store = std::sync::Arc::new(switchyard::state::Memory::default());
    instance.set_state(switchyard::state::Scope::new(plugin.name().as_str(), store));
    instance
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn load(engine: &PluginEngine, name: &str) -> LoadedPlugin {
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        wasm.exists(),
        "{} is missing: run `cargo xtask build-plugins` first",
        wasm.display()
    );
    let sandbox = Sandbox {
        name: PluginName::try_from(name).unwrap(),
        limits: Limits {
            memory: 64 << 20,
            ..Limits::default()
        },
        grants: Grants::default(),
    };
    engine.load(&wasm, sandbox).unwrap()
}

fn languages(c: &mut Criterion) {
    let engine =
        PluginEngine::new(Some(std::env::temp_dir().join("switchyard-bench-cache"))).unwrap();
    let plugins: Vec<_> = PLUGINS
        .iter()
        .map(|(language, name, message_type, kind, payload)| {
            let plugin = load(&engine, name);
            let message = Envelope::new(
                *message_type,
                *kind,
                payload.as_bytes().to_vec(),
                "application/json",
            );
            (*language, plugin, message)
        })
        .collect();

    println!("component sizes:");
    for (language, plugin, _) in &plugins {
        println!(
            "  {language:<11} {:>12} bytes  ({:.1} MiB)  {}",
            plugin.size(),
            mib(plugin.size() as u64),
            plugin.name()
        );
    }

    println!("linear memory of one instance (at start, after {RECYCLE_AFTER} messages):");
    for (language, plugin, message) in &plugins {
        let mut instance = instance_of(plugin);
        let at_start = instance.memory_used();
        let mut message = message.clone();
        for _ in 0..RECYCLE_AFTER {
            instance.handle(&mut message).unwrap();
        }
        println!(
            "  {language:<11} {:>6.1} MiB  {:>6.1} MiB",
            mib(at_start),
            mib(instance.memory_used())
        );
    }

    let mut group = c.benchmark_group("instantiate");
    for (language, plugin, _) in &plugins {
        group.bench_function(*language, |b| {
            b.iter(|| black_box(plugin.instantiate().unwrap()))
        });
    }
    group.finish();

    // What a route pays when it starts an instance: the instance and its
    // first message (interpreters warm up on it).
    let mut group = c.benchmark_group("instantiate_and_first_message");
    for (language, plugin, message) in &plugins {
        let mut message = message.clone();
        group.bench_function(*language, |b| {
            b.iter(|| {
                let mut fresh = instance_of(plugin);
                black_box(fresh.handle(black_box(&mut message)).unwrap())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("message_warm");
    for (language, plugin, message) in &plugins {
        let mut instance = instance_of(plugin);
        let mut message = message.clone();
        // The handler must succeed, or the figure measures a failure path.
        assert!(instance.handle(&mut message).is_ok(), "{language} failed");
        group.bench_function(*language, |b| {
            b.iter(|| {
                // As the host does: a fresh instance every RECYCLE_AFTER
                // messages, so what a plugin keeps between messages cannot
                // grow without bound.
                if instance.handled() >= RECYCLE_AFTER {
                    instance = instance_of(plugin);
                }
                black_box(instance.handle(black_box(&mut message)).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, languages);
criterion_main!(benches);
