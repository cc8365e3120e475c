//! Switchyard on RabbitMQ against a native lapin consumer doing the same
//! work, on the same broker, in one run.
//!
//! Each consumes the same queue of MESSAGES persistent events with the same
//! client settings: one connection, prefetch PREFETCH, manual
//! acknowledgement after handling. Two native lapin consumers do nothing
//! with a delivery but acknowledge it: the reference acknowledges every
//! BATCHED_ACKS-th delivery with `multiple = true` (what a competent user
//! of the library writes), the other each delivery on its own. Switchyard's
//! handling is a call into the trivial `echo` plugin, which does nothing
//! with the event. Switchyard runs in drain mode and its time includes
//! noticing that the queues are empty (at most about 125 ms per round).
//!
//! FastStream (Python) is quoted beside them: `peers/faststream_consumer.py`
//! consumes the same queue with FastStream's defaults (each message
//! acknowledged after its handler) and the same prefetch. The bench
//! installs FastStream into the project's Python environment
//! (`SWITCHYARD_PYTHON`, or `~/.cache/switchyard-venv` that `cargo xtask
//! setup` makes) when it is missing, and says so when it cannot.
//!
//! Prints messages per second and CPU time per message (the consumer's
//! process: user plus system; the broker's CPU is not counted) for each
//! round, with how busy the whole machine was, then the medians and the
//! ratios. Beside the whole round, it prints the rate from the first
//! message handled to the last (the native consumer's own clock;
//! Switchyard's journal, to the millisecond): the round without what a run
//! costs once, which a host that keeps running pays once. Needs RabbitMQ at
//! 127.0.0.1:5672 and `dist/plugins/echo.wasm`.
//!
//! Run: `cargo bench -p switchyard --bench amqp_vs_native`
//! (`AMQP_BENCH_MESSAGES`, `AMQP_BENCH_ROUNDS` and `AMQP_BENCH_PREFETCH`
//! override the defaults; the prefetch applies to every consumer).

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
/// The prefetch every consumer uses, unless `AMQP_BENCH_PREFETCH` says.
const PREFETCH: u16 = 200;

/// `AMQP_BENCH_PREFETCH`, kept within 1..=65535: a prefetch of 0 would
/// leave the native consumer unlimited while the host refuses it.
fn prefetch() -> u16 {
    let asked = env_or("AMQP_BENCH_PREFETCH", usize::from(PREFETCH));
    u16::try_from(asked.max(1)).unwrap_or(u16::MAX)
}
/// The reference consumer acknowledges every this many deliveries at once.
const BATCHED_ACKS: usize = 20;

fn short(s: &str) -> ShortString {
    ShortString::try_new(s.to_owned()).unwrap()
}

/// A native consumer of `n` deliveries acknowledging every `ack_every`
/// with `multiple = true` (1: each on its own), and the last.
async fn native(queue: &str, n: usize, ack_every: usize) -> Round {
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(prefetch(), BasicQosOptions::default())
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
    let mut first = None;
    let burn = std::time::Duration::from_micros(env_or("AMQP_BENCH_NATIVE_BURN_US", 0) as u64);
    while handled < n {
        let delivery = consumer.next().await.unwrap().unwrap();
        first.get_or_insert_with(std::time::Instant::now);
        std::hint::black_box(&delivery.data);
        if !burn.is_zero() {
            let started = std::time::Instant::now();
            while started.elapsed() < burn {
                std::hint::spin_loop();
            }
        }
        handled += 1;
        if handled % ack_every == 0 || handled == n {
            delivery
                .ack(BasicAckOptions {
                    multiple: ack_every > 1,
                })
                .await
                .unwrap();
        }
    }
    let mut round = timer.stop();
    round.steady = first.map(|f| f.elapsed());
    let _ = connection.close(200, "done".into()).await;
    round
}

/// The project's Python, with FastStream installed into it if it was not;
/// `Err` says why there is none.
fn python_with_faststream() -> Result<PathBuf, String> {
    let python = std::env::var_os("SWITCHYARD_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/switchyard-venv/bin/python"))
        })
        .filter(|p| p.exists())
        .ok_or("no project Python environment (run `cargo xtask setup`)")?;
    let has = |python: &PathBuf| {
        std::process::Command::new(python)
            .args(["-c", "import faststream.rabbit"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&python) {
        println!(
            "amqp_vs_native: installing FastStream into {}",
            python.display()
        );
        let installed = std::process::Command::new(&python)
            .args(["-m", "pip", "install", "-q", "faststream[rabbit]>=0.6,<0.7"])
            .status()
            .map_err(|e| format!("cannot run pip: {e}"))?;
        if !installed.success() || !has(&python) {
            return Err("pip could not install faststream[rabbit]".into());
        }
    }
    Ok(python)
}

/// FastStream consuming `n` messages of `queue`: its own time and CPU.
fn faststream(python: &PathBuf, queue: &str, n: usize) -> Result<Round, String> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peers/faststream_consumer.py");
    // The machine's share only: the script times itself and its CPU.
    let timer = Timer::start();
    let out = std::process::Command::new(python)
        .arg(&script)
        .args([BROKER, queue, &n.to_string(), &prefetch().to_string()])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let machine_busy = timer.stop().machine_busy;
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<f64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match (out.status.success(), figures.as_slice()) {
        (true, [elapsed, cpu]) => Ok(Round {
            elapsed: std::time::Duration::from_secs_f64(*elapsed),
            cpu: std::time::Duration::from_secs_f64(*cpu),
            machine_busy,
            steady: None,
        }),
        _ => Err(format!(
            "FastStream failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

async fn switchyard(pipeline: &config::Pipeline) -> Round {
    let plugins = runtime::load_plugins(pipeline).await.unwrap();
    let since = switchyard::envelope::now_ms();
    let timer = Timer::start();
    runtime::run(pipeline, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
    let mut round = timer.stop();
    round.steady = handled_span(pipeline, since);
    round
}

/// From the first handling to the last of this round, read from the
/// host's journal (on by default; its records carry the time each outcome
/// was decided, to the millisecond).
fn handled_span(pipeline: &config::Pipeline, since_ms: u64) -> Option<std::time::Duration> {
    let config::StoreConfig::Embedded { path } = &pipeline.journal.store else {
        return None;
    };
    let conn = rusqlite::Connection::open(path).ok()?;
    let (first, last): (Option<i64>, Option<i64>) = conn
        .query_row(
            "SELECT min(first_at_ms), max(last_at_ms) FROM journal_batches WHERE last_at_ms >= ?1",
            [i64::try_from(since_ms).ok()?],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()?;
    let ms = last?.checked_sub(first?)?;
    Some(std::time::Duration::from_millis(u64::try_from(ms).ok()?))
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
            "[transport]\nkind = \"amqp\"\nurl = \"{BROKER}\"\nexchange = \"{exchange}\"\nprefetch = {}\n\
             [admin]\nlisten = \"off\"\n\
             [plugins.echo]\nwasm = \"{}\"\nevents = [\"Tick\"]\nretry = {{ delayed = 0 }}\n",
            prefetch(),
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

        let python = python_with_faststream();
        if let Err(why) = &python {
            println!("amqp_vs_native: FastStream left out: {why}");
        }
        let mut batched = Comparison::default();
        let mut each = Comparison::default();
        let mut fast_stream = Comparison::default();
        println!(
            "amqp_vs_native: {messages} messages per round, prefetch {}; native acknowledges every {BATCHED_ACKS}th with multiple (reference), then each on its own",
            prefetch()
        );
        for round in 1..=rounds {
            fill(transport.as_ref(), messages).await;
            let reference = native(&queue, messages, BATCHED_ACKS).await;
            fill(transport.as_ref(), messages).await;
            let naive = native(&queue, messages, 1).await;
            fill(transport.as_ref(), messages).await;
            let s = switchyard(&pipeline).await;
            print!("batched acks: ");
            batched.round(round, messages, &reference, &s);
            print!("ack each:     ");
            each.round(round, messages, &naive, &s);
            if let Ok(python) = &python {
                fill(transport.as_ref(), messages).await;
                match faststream(python, &queue, messages) {
                    Ok(f) => {
                        print!("FastStream:   ");
                        fast_stream.round(round, messages, &f, &s);
                    }
                    Err(why) => println!("{why}"),
                }
            }
        }
        print!("batched acks (the reference): ");
        batched.summary();
        print!("ack each: ");
        each.summary();
        if !fast_stream.is_empty() {
            print!("FastStream in the place of native: ");
            fast_stream.summary();
        }

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
