//! Services that go away in the middle of a run: RabbitMQ restarted, the
//! PostgreSQL dead-letter store stopped and started. Nothing may be lost,
//! and the host must carry on by itself once they are back.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::envelope::Kind;
use switchyard::runtime;
use switchyard::transport::Transport as _;

use crate::brokers::{RABBITMQ, clean_up_amqp, embedded_pipeline};
use crate::common::message;
use crate::reliability::{
    check_all_handled, distinct, enqueue_ticks, host, lines, tally, tally_pipeline, wait_until,
};

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!("{program} runs (the chaos suite stops and starts services): {e}")
        });
    assert!(status.success(), "{program} {args:?}: {status}");
}

fn postgres_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("PostgreSQL is installed from Debian's packages")
        .flatten()
        .next()
        .expect("a PostgreSQL cluster")
        .file_name()
        .to_string_lossy()
        .into_owned()
}

/// Starts PostgreSQL again however the scenario ends.
struct PostgresBack(String);

impl Drop for PostgresBack {
    fn drop(&mut self) {
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.0, "main", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts RabbitMQ's application again however the scenario ends.
struct RabbitBack;

impl Drop for RabbitBack {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .arg("start_app")
            .stdout(Stdio::null())
            .status();
        let _ = Command::new("rabbitmqctl")
            .arg("await_startup")
            .stdout(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn rabbitmq_restarted_mid_run() {
    let _one = crate::one_at_a_time().await;
    // At least 20,000: a host drains 2,000 in less time than `rabbitmqctl
    // stop_app` takes to stop the broker, and the outage would miss the run.
    let (runs, messages) = (crate::runs().min(3), crate::messages().max(20_000));
    let mut duplicates = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let (path, p) = tally_pipeline(&RABBITMQ, dir.path());
        let ids = enqueue_ticks(&p, messages).await;
        let log = tally(dir.path());
        let mut h = host(&path, &[]);
        wait_until("progress", &mut [&mut h], Duration::from_secs(120), || {
            lines(&log).len() >= messages / 10
        });
        let back = RabbitBack;
        run("rabbitmqctl", &["stop_app"]);
        let at_stop = lines(&log).len();
        std::thread::sleep(Duration::from_secs(2));
        drop(back);
        wait_until(
            "the host to reconnect and finish",
            &mut [&mut h],
            Duration::from_secs(300),
            || distinct(&[&log]) >= ids.len(),
        );
        h.kill().unwrap();
        h.wait().unwrap();
        assert!(at_stop < ids.len(), "the run ended before the restart");
        duplicates.push(check_all_handled(&ids, &lines(&log)));
        clean_up_amqp(&p).await;
    }
    crate::report(
        "RabbitMQ stopped 2 s mid-run",
        "amqp",
        &format!("{runs} runs x {messages} messages: 0 lost; duplicates per run {duplicates:?}"),
    );
}

/// Ticks, every tenth with an id no message may have: the good ones are
/// handled, the others dead-lettered in PostgreSQL.
async fn enqueue_mixed(p: &switchyard::config::Pipeline, n: usize) -> (Vec<String>, usize) {
    let transport = runtime::open_transport(p).unwrap();
    let mut good = Vec::new();
    let mut bad = 0;
    let mut batch = Vec::new();
    for i in 0..n {
        let mut m = message(Kind::Event, "Tick", json!({ "n": i }));
        if i % 10 == 9 {
            m.id = format!("bad\nid-{i}");
            bad += 1;
        } else {
            good.push(m.id.clone());
        }
        batch.push(m);
        if batch.len() == 1000 {
            transport.enqueue(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    transport.enqueue(batch).await.unwrap();
    (good, bad)
}

async fn dead_letter_count(url: String, schema: String) -> i64 {
    let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        return -1;
    };
    tokio::spawn(conn);
    client
        .query_one(&format!("SELECT COUNT(*) FROM {schema}.dead_letters"), &[])
        .await
        .map_or(-1, |r| r.get(0))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn the_postgres_dead_letter_store_stopped_mid_run() {
    let _one = crate::one_at_a_time().await;
    let (runs, messages) = (crate::runs().min(3), crate::messages());
    let url = "postgres://postgres@127.0.0.1:5432/test";
    let version = postgres_version();
    let mut figures = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        let schema = format!("chaos_{}", switchyard::envelope::new_id().replace('-', "_"));
        let (path, p) = embedded_pipeline(
            dir.path(),
            &format!(
                "batch_size = 64\n[dead_letters]\nurl = \"{url}\"\nschema = \"{schema}\"\n[plugins.tally]\nwasm = \"{{dist}}/tally.wasm\"\nevents = [\"Tick\"]\ngrants = {{ dirs = [{{ host = \"out\", guest = \"/out\", writable = true }}] }}\n"
            ),
        );
        // Creates the schema before the host and the outage.
        drop(
            switchyard::dlq::open(&p.dead_letters, &p.name)
                .await
                .unwrap(),
        );
        let (good, bad) = enqueue_mixed(&p, messages).await;
        let log = tally(dir.path());
        let mut h = host(&path, &[]);
        wait_until("progress", &mut [&mut h], Duration::from_secs(120), || {
            lines(&log).len() >= messages / 10
        });
        let back = PostgresBack(version.clone());
        run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &version,
                "main",
                "stop",
                "-m",
                "fast",
            ],
        );
        let at_stop = lines(&log).len();
        std::thread::sleep(Duration::from_secs(3));
        drop(back);
        let started = Instant::now();
        let dead = std::cell::Cell::new(0i64);
        wait_until(
            "every message handled or dead-lettered",
            &mut [&mut h],
            Duration::from_secs(300),
            || {
                if distinct(&[&log]) < good.len() {
                    return false;
                }
                dead.set(futures_block(dead_letter_count(
                    url.to_owned(),
                    schema.clone(),
                )));
                dead.get() >= bad as i64
            },
        );
        h.kill().unwrap();
        h.wait().unwrap();
        let duplicates = check_all_handled(&good, &lines(&log));
        let dead = dead.get();
        assert_eq!(dead, bad as i64, "one dead letter per refused message");
        assert!(at_stop < good.len(), "the run ended before the outage");
        figures.push(format!(
            "{duplicates} duplicates, {dead} dead letters, caught up {} s after the restart",
            started.elapsed().as_secs()
        ));
        cleanup_schema(url, &schema).await;
    }
    crate::report(
        "PostgreSQL (dead letters) stopped 3 s mid-run",
        "embedded",
        &format!(
            "{runs} runs x {messages} messages (1 in 10 dead-lettered): 0 lost; {}",
            figures.join("; ")
        ),
    );
}

/// Runs a future to completion from inside a synchronous check.
fn futures_block<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

async fn cleanup_schema(url: &str, schema: &str) {
    if let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await;
    }
}
