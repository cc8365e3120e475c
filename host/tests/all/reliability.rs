//! At-least-once on a broker, whichever it is: hosts killed with SIGKILL at
//! random points, and a second host taking over the work of a killed one.
//! Every run counts what was handled from the tally plugin's log and
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

use crate::common::{bin, message};

pub const MESSAGES: usize = 20_000;
/// The most messages a route has in hand at once (prefetch, batch size).
pub const BATCH: usize = 64;

/// How a broker's tests make pipelines, and what it can duplicate.
pub struct Broker {
    pub name: &'static str,
    /// Writes and loads a pipeline on this broker; the `&str` is its
    /// `[plugins]` part.
    pub pipeline: fn(&Path, &str) -> (PathBuf, Pipeline),
    /// The `[transport]` key that bounds a route's messages in hand.
    pub batch_key: &'static str,
    /// Messages one killed host can leave handled but not acknowledged.
    pub duplicates_per_kill: usize,
    /// What a host logs once it takes part in sharing the work, where
    /// joining takes a while (a Kafka group's rebalance).
    pub joined: Option<&'static str>,
}

/// The tally pipeline on a broker, with its batch bound set to [`BATCH`].
pub fn tally_pipeline(broker: &Broker, dir: &Path) -> (PathBuf, Pipeline) {
    tally_pipeline_with(broker, dir, "")
}

/// [`tally_pipeline`] with more of the pipeline (`extra`, more plugins).
pub fn tally_pipeline_with(broker: &Broker, dir: &Path, extra: &str) -> (PathBuf, Pipeline) {
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let (path, p) = (broker.pipeline)(
        dir,
        &format!(
            r#"
        [plugins.tally]
        wasm = "{{dist}}/tally.wasm"
        events = ["Tick"]
        grants = {{ dirs = [{{ host = "out", guest = "/out", writable = true }}] }}
        retry = {{ delayed = 0 }}
        {extra}
        "#
        ),
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[transport]\n",
        &format!("[transport]\n        {} = {BATCH}\n", broker.batch_key),
    );
    std::fs::write(&path, text).unwrap();
    (path, p)
}

/// The same pipeline (same exchange and queues) in another directory, so
/// a second host writes its own tally.
pub fn twin(dir: &Path, original: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let path = dir.join(original.file_name().unwrap());
    std::fs::copy(original, &path).unwrap();
    path
}

pub async fn enqueue_ticks(p: &Pipeline, n: usize) -> Vec<String> {
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

pub fn host(path: &Path, args: &[&str]) -> Child {
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

/// [`host`] with its log (warnings, and the transport's news of joining)
/// written to `log`.
fn logging_host(path: &Path, log: &Path) -> Child {
    Command::new(bin())
        .arg("run")
        .arg(path)
        .env("RUST_LOG", "warn,switchyard::transport=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

pub fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// How many different ids the logs hold together: messages handled at
/// least once.
pub fn distinct(logs: &[&Path]) -> usize {
    let mut all: Vec<String> = logs.iter().flat_map(|l| lines(l)).collect();
    all.sort_unstable();
    all.dedup();
    all.len()
}

pub fn tally(dir: &Path) -> PathBuf {
    dir.join("out").join("tally.log")
}

/// Waits until `done()` holds, failing if a host exits or time runs out.
pub fn wait_until(what: &str, hosts: &mut [&mut Child], limit: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        if started.elapsed() >= limit {
            // No host outlives the test.
            for h in hosts.iter_mut() {
                let _ = h.kill();
                let _ = h.wait();
            }
            panic!("timed out waiting for {what}");
        }
        for h in hosts.iter_mut() {
            assert!(h.try_wait().unwrap().is_none(), "a host exited early");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every id handled at least once and nothing else; returns the duplicates.
pub fn check_all_handled(ids: &[String], handled: &[String]) -> usize {
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

pub fn random_below(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) % n.max(1)
}

/// What a run with kills saw (the chaos suite reports it).
#[derive(Debug)]
#[allow(dead_code)]
pub struct KillRun {
    /// Lines in the tally when each host was killed.
    pub kills: Vec<usize>,
    /// Messages handled more than once.
    pub duplicates: usize,
    pub took: Duration,
}

/// Kills hosts at three random points of a 20,000-message run, then drains
/// with a last one. Returns the pipeline, for the caller to clean up.
pub async fn sigkill_at_random_points(broker: &Broker) -> Pipeline {
    sigkill_run(broker, MESSAGES).await.0
}

/// [`sigkill_at_random_points`] with `messages` messages; every one must be
/// handled at least once (the run fails otherwise), and the duplicates are
/// reported.
pub async fn sigkill_run(broker: &Broker, messages: usize) -> (Pipeline, KillRun) {
    sigkill_run_with(broker, messages, "", |_| {}).await
}

/// [`sigkill_run`] with more plugins in the pipeline (`extra`), and a
/// last look at what the pipeline left (`check`) before its directory goes.
pub async fn sigkill_run_with(
    broker: &Broker,
    messages: usize,
    extra: &str,
    check: impl FnOnce(&Pipeline),
) -> (Pipeline, KillRun) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = tally_pipeline_with(broker, dir.path(), extra);
    let ids = enqueue_ticks(&p, messages).await;
    let log = tally(dir.path());

    // Three kills, each after a random share of what is left.
    let mut kills = Vec::new();
    for _ in 0..3 {
        let handled = lines(&log).len();
        let step = (messages / 40).max(1);
        let target = handled + step + random_below(((messages - handled) / 4) as u64) as usize;
        let mut h = host(&path, &[]);
        wait_until("progress", &mut [&mut h], Duration::from_secs(120), || {
            lines(&log).len() >= target
        });
        std::thread::sleep(Duration::from_millis(random_below(20)));
        h.kill().unwrap(); // SIGKILL: nothing is finished or acked.
        h.wait().unwrap();
        kills.push(lines(&log).len());
    }
    let transport = runtime::open(&p).await.unwrap();
    assert!(
        !transport.is_idle().await.unwrap(),
        "everything was handled before the last kill; the test proves nothing"
    );
    let status = host(&path, &["--drain"]).wait().unwrap();
    assert!(status.success(), "the last host failed: {status}");

    let duplicates = check_all_handled(&ids, &lines(&log));
    eprintln!(
        "{} sigkill: killed after {kills:?} lines; all {messages} handled at least once, {duplicates} twice",
        broker.name
    );
    // At most what each killed host had handled and not acknowledged.
    assert!(
        duplicates <= kills.len() * broker.duplicates_per_kill,
        "{duplicates} duplicates"
    );
    check(&p);
    (
        p,
        KillRun {
            kills,
            duplicates,
            took: started.elapsed(),
        },
    )
}

/// Two hosts share the work; one is killed and the other finishes it.
/// Returns the pipeline, for the caller to clean up.
pub async fn second_host_takes_over(broker: &Broker) -> Pipeline {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let (path_a, p) = tally_pipeline(broker, dir_a.path());
    let path_b = twin(dir_b.path(), &path_a);
    let (log_a, log_b) = (tally(dir_a.path()), tally(dir_b.path()));

    // Both hosts join before the work arrives: a host that joins a Kafka
    // group late makes it rebalance, and librdkafka's mock cluster refuses
    // every commit while the group rebalances (a Kafka broker accepts those
    // of the current generation), so what the first host handled meanwhile
    // would be handled again. This test is about a killed host.
    let (err_a, err_b) = (dir_a.path().join("host.log"), dir_b.path().join("host.log"));
    let mut a = logging_host(&path_a, &err_a);
    let mut b = logging_host(&path_b, &err_b);
    if let Some(joined) = broker.joined {
        wait_until(
            "both hosts to join",
            &mut [&mut a, &mut b],
            Duration::from_secs(120),
            || {
                [&err_a, &err_b]
                    .iter()
                    .all(|f| std::fs::read_to_string(f).is_ok_and(|log| log.contains(joined)))
            },
        );
    }
    let ids = enqueue_ticks(&p, MESSAGES).await;
    wait_until(
        "both hosts to share the work",
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
        || distinct(&[&log_a, &log_b]) >= MESSAGES,
    );
    b.kill().unwrap();
    b.wait().unwrap();

    let mut all = lines(&log_a);
    all.extend(lines(&log_b));
    let duplicates = check_all_handled(&ids, &all);
    eprintln!(
        "{} shared work: host A handled {by_a} before SIGKILL, host B {}; {duplicates} handled twice",
        broker.name,
        lines(&log_b).len()
    );
    assert!(
        duplicates <= broker.duplicates_per_kill,
        "{duplicates} duplicates"
    );
    p
}
