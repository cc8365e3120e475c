//! At-least-once on RabbitMQ: hosts killed with SIGKILL at random points, a
//! second host taking over a shared queue, and a broker restart mid-run.
//! Every test counts what was handled from the tally plugin's log and
//! reports the duplicates.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::config::Pipeline;
use switchyard::envelope::Kind;
use switchyard::runtime;

use crate::amqp::{BROKER_IN_USE, clean_up, depth, exchange, pipeline};
use crate::common::{bin, message};

const MESSAGES: usize = 20_000;
const PREFETCH: usize = 64;

fn tally_pipeline(dir: &Path) -> (PathBuf, Pipeline) {
    std::fs::create_dir_all(dir.join("out")).unwrap();
    pipeline(
        dir,
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        retry = { delayed = 0 }
        "#,
    )
}

/// The same pipeline (same exchange and queues) in another directory, so
/// a second host writes its own tally.
fn twin(dir: &Path, original: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let path = dir.join("rabbit.toml");
    std::fs::copy(original, &path).unwrap();
    path
}

fn prefetch(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.replace(
        "[transport]\n",
        &format!("[transport]\n        prefetch = {PREFETCH}\n"),
    );
    std::fs::write(path, text).unwrap();
}

async fn enqueue_ticks(p: &Pipeline, n: usize) -> Vec<String> {
    let transport = runtime::open(p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1000);
        let batch: Vec<_> = (0..chunk)
            .map(|i| message(Kind::Event, "Tick", json!({ "n": n - left + i })))
            .collect();
        ids.extend(batch.iter().map(|m| m.id.clone()));
        transport.enqueue(batch).await.unwrap();
        left -= chunk;
    }
    ids
}

fn host(path: &Path, args: &[&str]) -> Child {
    Command::new(bin())
        .arg("run")
        .args(args)
        .arg(path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn tally(dir: &Path) -> PathBuf {
    dir.join("out").join("tally.log")
}

/// Waits until `done()` holds, failing if a host exits or time runs out.
fn wait_until(what: &str, hosts: &mut [&mut Child], limit: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        for h in hosts.iter_mut() {
            assert!(h.try_wait().unwrap().is_none(), "a host exited early");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every id handled at least once and nothing else; returns the duplicates.
fn check_all_handled(ids: &[String], handled: &[String]) -> usize {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for l in handled {
        *counts.entry(l.as_str()).or_default() += 1;
    }
    let missing = ids
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    assert_eq!(missing, 0, "{missing} of {} messages lost", ids.len());
    assert_eq!(counts.len(), ids.len(), "the tally holds unknown ids");
    handled.len() - ids.len()
}

fn random_below(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) % n.max(1)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_nothing() {
    let _broker = BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = tally_pipeline(dir.path());
    prefetch(&path);
    let ids = enqueue_ticks(&p, MESSAGES).await;
    let log = tally(dir.path());

    // Three kills, each after a random share of what is left.
    let mut kills = Vec::new();
    for _ in 0..3 {
        let handled = lines(&log).len();
        let target = handled + 500 + random_below(((MESSAGES - handled) / 4) as u64) as usize;
        let mut h = host(&path, &[]);
        wait_until("progress", &mut [&mut h], Duration::from_secs(120), || {
            lines(&log).len() >= target
        });
        std::thread::sleep(Duration::from_millis(random_below(20)));
        h.kill().unwrap(); // SIGKILL: nothing is finished or acked.
        h.wait().unwrap();
        kills.push(lines(&log).len());
    }
    assert!(
        depth(&format!("{}.tally", exchange(&p))).await > 0,
        "everything was handled before the last kill; the test proves nothing"
    );
    let status = host(&path, &["--drain"]).wait().unwrap();
    assert!(status.success(), "the last host failed: {status}");

    let duplicates = check_all_handled(&ids, &lines(&log));
    eprintln!(
        "amqp sigkill: killed after {kills:?} lines; all {MESSAGES} handled at least once, {duplicates} twice"
    );
    // At most the unacknowledged deliveries of each killed host.
    assert!(
        duplicates <= kills.len() * PREFETCH,
        "{duplicates} duplicates"
    );
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_host_finishes_the_work_of_a_killed_one() {
    let _broker = BROKER_IN_USE.read().await;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let (path_a, p) = tally_pipeline(dir_a.path());
    prefetch(&path_a);
    let path_b = twin(dir_b.path(), &path_a);
    let ids = enqueue_ticks(&p, MESSAGES).await;
    let (log_a, log_b) = (tally(dir_a.path()), tally(dir_b.path()));

    let mut a = host(&path_a, &[]);
    let mut b = host(&path_b, &[]);
    wait_until(
        "both hosts to share the queue",
        &mut [&mut a, &mut b],
        Duration::from_secs(120),
        || lines(&log_a).len() >= 1000 && !lines(&log_b).is_empty(),
    );
    a.kill().unwrap();
    a.wait().unwrap();
    let by_a = lines(&log_a).len();
    wait_until(
        "the survivor to finish",
        &mut [&mut b],
        Duration::from_secs(180),
        || {
            let mut all = lines(&log_a);
            all.extend(lines(&log_b));
            all.sort_unstable();
            all.dedup();
            all.len() >= MESSAGES
        },
    );
    b.kill().unwrap();
    b.wait().unwrap();

    let mut all = lines(&log_a);
    all.extend(lines(&log_b));
    let duplicates = check_all_handled(&ids, &all);
    eprintln!(
        "amqp shared queue: host A handled {by_a} before SIGKILL, host B {}; {duplicates} handled twice",
        lines(&log_b).len()
    );
    assert!(duplicates <= PREFETCH, "{duplicates} duplicates");
    clean_up(&p).await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("rabbitmqctl runs (the test restarts the local RabbitMQ)");
    assert!(status.success(), "rabbitmqctl {args:?}: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_mid_run_loses_nothing() {
    // Every other broker test waits while RabbitMQ is down.
    let _broker = BROKER_IN_USE.write().await;
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = tally_pipeline(dir.path());
    prefetch(&path);
    let ids = enqueue_ticks(&p, MESSAGES / 2).await;
    let log = tally(dir.path());

    let mut h = host(&path, &[]);
    wait_until("progress", &mut [&mut h], Duration::from_secs(120), || {
        lines(&log).len() >= 1000
    });
    rabbitmqctl(&["stop_app"]);
    let at_stop = lines(&log).len();
    std::thread::sleep(Duration::from_secs(1));
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    wait_until(
        "the host to reconnect and finish",
        &mut [&mut h],
        Duration::from_secs(180),
        || {
            let mut all = lines(&log);
            all.sort_unstable();
            all.dedup();
            all.len() >= ids.len()
        },
    );
    h.kill().unwrap();
    h.wait().unwrap();
    let duplicates = check_all_handled(&ids, &lines(&log));
    eprintln!(
        "amqp broker restart: stopped after {at_stop} of {} handled; all handled after reconnecting, {duplicates} twice",
        ids.len()
    );
    assert!(at_stop < ids.len(), "the run ended before the restart");
    assert!(duplicates <= PREFETCH, "{duplicates} duplicates");
    clean_up(&p).await;
}
