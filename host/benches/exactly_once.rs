//! What `exactly_once` costs on RabbitMQ: the same plugin, the same broker,
//! the same PostgreSQL state store, with and without it, in one run.
//!
//! Each round fills a queue with MESSAGES persistent `Tick` events for the
//! `counter` test plugin (one state increment per message, committed to
//! PostgreSQL with each batch) and drains it, first on a pipeline without
//! `exactly_once`, then on one with it (each message also recorded as done
//! with its outputs, and each batch's ids looked up before it is handled).
//! Prints messages per second for each round, then the medians and the
//! ratio. Needs RabbitMQ at 127.0.0.1:5672, PostgreSQL at 127.0.0.1:5432
//! (database `test`) and `dist/plugins/counter.wasm`.
//!
//! Run: `cargo bench -p switchyard --bench exactly_once`
//! (`EXACTLY_ONCE_BENCH_MESSAGES` and `EXACTLY_ONCE_BENCH_ROUNDS` override
//! the defaults).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::ShortString;
use lapin::{Connection, ConnectionProperties};
use switchyard::config;
use switchyard::runtime::{self, RunMode};

use crate::common::{Round, Timer, env_or, fill, median};

const BROKER: &str = "amqp://127.0.0.1:5672/%2f";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

fn short(s: &str) -> ShortString {
    ShortString::try_new(s.to_owned()).unwrap()
}

/// A pipeline of the counter on an exchange and PostgreSQL schema of its
/// own.
fn pipeline(dir: &Path, name: &str, exactly_once: bool, schema: &str) -> config::Pipeline {
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/plugins/counter.wasm");
    assert!(wasm.exists(), "run `cargo xtask build-plugins` first");
    let exchange = format!("switchyard-bench.{}", switchyard::envelope::new_id());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[transport]\nkind = \"amqp\"\nurl = \"{BROKER}\"\nexchange = \"{exchange}\"\nprefetch = 64\n\
             [admin]\nlisten = \"off\"\n\
             [state]\nurl = \"{POSTGRES}\"\nschema = \"{schema}\"\n\
             [plugins.counter]\nwasm = \"{}\"\nevents = [\"Tick\"]\nexactly_once = {exactly_once}\nretry = {{ delayed = 0 }}\n",
            wasm.display()
        ),
    )
    .unwrap();
    config::load(&path).unwrap().pipeline
}

async fn drain(pipeline: &config::Pipeline, messages: usize) -> Round {
    let transport = runtime::open(pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    fill(transport.as_ref(), messages).await;
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    let timer = Timer::start();
    runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    timer.stop()
}

async fn clean_up(pipelines: &[&config::Pipeline], schema: &str) {
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for p in pipelines {
        let config::TransportConfig::Amqp(amqp) = &p.transport else {
            continue;
        };
        channel
            .queue_delete(
                short(&format!("{}.counter", amqp.exchange)),
                QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
        channel
            .exchange_delete(short(&amqp.exchange), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
    let (client, conn) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
}

fn main() {
    if common::filtered_out("exactly_once") {
        return;
    }
    let messages = env_or("EXACTLY_ONCE_BENCH_MESSAGES", 20_000);
    let rounds = env_or("EXACTLY_ONCE_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let schema = format!(
        "bench_{}",
        &switchyard::envelope::new_id().replace('-', "")[..12]
    );
    let plain = pipeline(dir.path(), "plain", false, &schema);
    let once = pipeline(dir.path(), "once", true, &schema);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Warm up: the compile cache, the connections, the tables.
        drain(&plain, 2_000).await;
        drain(&once, 2_000).await;
        println!("exactly_once: {messages} messages per round, RabbitMQ prefetch 64, state in PostgreSQL");
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let a = drain(&plain, messages).await.rate(messages);
            let b = drain(&once, messages).await.rate(messages);
            println!("round {round}: without {a:.0} msg/s, with {b:.0} msg/s");
            without.push(a);
            with.push(b);
        }
        let (a, b) = (median(without), median(with));
        println!(
            "median: without {a:.0} msg/s, with {b:.0} msg/s: exactly_once runs at {:.0} % of the rate without",
            100.0 * b / a
        );
        clean_up(&[&plain, &once], &schema).await;
    });
}
