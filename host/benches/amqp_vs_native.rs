//! Switchyard on RabbitMQ against a native lapin consumer doing the same
//! work, on the same broker, in one run.
//!
//! Both consume the same queue of MESSAGES persistent events with the same
//! client settings: one connection, prefetch PREFETCH, manual
//! acknowledgement of every message after it is handled. The native
//! consumer's handling is nothing (it acks); Switchyard's is a call into the
//! trivial `echo` plugin, which does nothing with the event. Switchyard runs
//! in drain mode and its time includes noticing that the queues are empty
//! (at most about 125 ms per round).
//!
//! Prints messages per second and CPU time per message (this process: user
//! plus system; the broker's CPU is not counted) for each round, then the
//! medians and the ratio. Needs RabbitMQ at 127.0.0.1:5672 and
//! `dist/plugins/echo.wasm`.
//!
//! Run: `cargo bench -p switchyard --bench amqp_vs_native`
//! (`AMQP_BENCH_MESSAGES` and `AMQP_BENCH_ROUNDS` override the defaults).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use switchyard::config;
use switchyard::runtime::{self, RunMode};

use crate::common::{Comparison, Round, Timer, env_or, fill};

const BROKER: &str = "amqp://127.0.0.1:5672/%2f";
const PREFETCH: u16 = 64;

fn short(s: &str) -> ShortString {
    ShortString::try_new(s.to_owned()).unwrap()
}

async fn native(queue: &str, n: usize) -> Round {
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let timer = Timer::start();
    let mut consumer = channel
        .basic_consume(
            short(queue),
            short("native-bench"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut handled = 0;
    while handled < n {
        let delivery = consumer.next().await.unwrap().unwrap();
        std::hint::black_box(&delivery.data);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        handled += 1;
    }
    let round = timer.stop();
    let _ = connection.close(200, "done".into()).await;
    round
}

async fn switchyard(pipeline: &config::Pipeline) -> Round {
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    let timer = Timer::start();
    runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    timer.stop()
}

fn main() {
    if common::filtered_out("amqp_vs_native") {
        return;
    }
    let messages = env_or("AMQP_BENCH_MESSAGES", 50_000);
    let rounds = env_or("AMQP_BENCH_ROUNDS", 3);
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/plugins/echo.wasm");
    assert!(wasm.exists(), "run `cargo xtask build-plugins` first");
    let dir = tempfile::tempdir().unwrap();
    let exchange = format!("switchyard-bench.{}", switchyard::envelope::new_id());
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            "[transport]\nkind = \"amqp\"\nurl = \"{BROKER}\"\nexchange = \"{exchange}\"\nprefetch = {PREFETCH}\n\
             [admin]\nlisten = \"off\"\n\
             [plugins.echo]\nwasm = \"{}\"\nevents = [\"Tick\"]\nretry = {{ delayed = 0 }}\n",
            wasm.display()
        ),
    )
    .unwrap();
    let pipeline = config::load(&path).unwrap().pipeline;
    let queue = format!("{exchange}.echo");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let transport = runtime::open(&pipeline).await.unwrap();
        transport.start_consuming().await.unwrap();
        // Warm up: the compile cache, the connection paths.
        fill(transport.as_ref(), 2_000).await;
        switchyard(&pipeline).await;

        let mut comparison = Comparison::default();
        println!("amqp_vs_native: {messages} messages per round, prefetch {PREFETCH}, ack each");
        for round in 1..=rounds {
            fill(transport.as_ref(), messages).await;
            let n = native(&queue, messages).await;
            fill(transport.as_ref(), messages).await;
            let s = switchyard(&pipeline).await;
            comparison.round(round, messages, &n, &s);
        }
        comparison.summary();

        let connection = Connection::connect(BROKER, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_delete(short(&queue), QueueDeleteOptions::default())
            .await
            .unwrap();
        channel
            .exchange_delete(short(&exchange), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    });
}
