//! At-least-once across a SIGKILL: kill the host mid-stream of 10,000
//! messages, restart it, and count what was handled.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::config;
use switchyard::envelope::Kind;
use switchyard::runtime;
use switchyard::transport::Transport;

use crate::common::{bin, message, write_pipeline};

const MESSAGES: usize = 10_000;

fn handled_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let path = write_pipeline(
        dir.path(),
        "durable",
        r#"
        [host]
        cache_dir = "{cache}"
        [transport]
        path = "store/durable.db"
        batch_size = 64
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    let mut ids = Vec::with_capacity(MESSAGES);
    for chunk in 0..MESSAGES / 1000 {
        let batch: Vec<_> = (0..1000)
            .map(|i| message(Kind::Event, "Tick", json!({ "n": chunk * 1000 + i })))
            .collect();
        ids.extend(batch.iter().map(|m| m.id.clone()));
        transport.enqueue(batch).await.unwrap();
    }
    let log = dir.path().join("out").join("tally.log");

    let mut host = Command::new(bin())
        .args(["run"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while handled_lines(&log).len() < MESSAGES / 5 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "host made no progress"
        );
        assert!(host.try_wait().unwrap().is_none(), "host exited early");
        std::thread::sleep(Duration::from_millis(5));
    }
    host.kill().unwrap(); // SIGKILL: no chance to finish anything.
    host.wait().unwrap();
    let before_restart = handled_lines(&log).len();
    assert!(
        !transport.is_idle().await.unwrap(),
        "the host finished before it was killed; the test proves nothing"
    );

    let status = Command::new(bin())
        .args(["run", "--drain"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "restart failed: {status}");

    let lines = handled_lines(&log);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for l in &lines {
        *counts.entry(l.as_str()).or_default() += 1;
    }
    let missing: Vec<_> = ids
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert_eq!(
        counts.len(),
        MESSAGES,
        "unexpected lines in the tally: {:?}",
        counts.keys().find(|k| !ids.iter().any(|i| i == *k))
    );
    let duplicates = lines.len() - MESSAGES;
    eprintln!(
        "durability: killed after {before_restart} handled; after restart every one of {MESSAGES} messages handled at least once, {duplicates} handled twice"
    );
    // Only the batch in flight at the kill can be handled twice.
    assert!(
        duplicates <= 64,
        "{duplicates} duplicates is more than one batch"
    );
    assert!(transport.is_idle().await.unwrap());
    assert!(crate::common::dead_letters(&pipeline).await.is_empty());
}

/// Whether a running host of the pipeline in `dir` records `id` as in
/// hand (a dead host's record, whose lock is free, does not count).
fn in_hand(dir: &Path, id: &str) -> bool {
    let base = dir.join(".switchyard").join("in-flight");
    let Ok(pipelines) = std::fs::read_dir(&base) else {
        return false;
    };
    pipelines.flatten().any(|p| {
        std::fs::read_dir(p.path())
            .into_iter()
            .flatten()
            .flatten()
            .any(|host| {
                let lock = std::fs::OpenOptions::new()
                    .write(true)
                    .open(host.path().join("lock"));
                let alive = lock.is_ok_and(|l| l.try_lock().is_err());
                alive
                    && std::fs::read_dir(host.path().join("routes"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|f| std::fs::read_to_string(f.path()).is_ok_and(|t| t.contains(id)))
            })
    })
}

/// A message whose handling takes the host down (here: a host killed while
/// the plugin spins on it, as the kernel's OOM killer would) comes back
/// after every restart. After `crash_loop_limit` crashes in a row it is
/// dead-lettered as `crash-loop` and no plugin sees it again; the messages
/// that shared its first batch are handled, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_keeps_killing_the_host_is_dead_lettered_as_a_crash_loop() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let path = write_pipeline(
        dir.path(),
        "crashy",
        r#"
        [host]
        cache_dir = "{cache}"
        crash_loop_limit = 3
        [admin]
        listen = "off"
        [transport]
        poll_interval = "10ms"
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        timeout = "60s"
        retry = { immediate = 0, delayed = 0 }
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Published"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let pipeline = config::load(&path).unwrap().pipeline;
    let transport = runtime::open_transport(&pipeline).unwrap();
    let killer = crate::common::misbehave("loop");
    let innocent = [
        crate::common::misbehave("publish"),
        crate::common::misbehave("publish"),
    ];
    let mut all = vec![killer.clone()];
    all.extend(innocent.iter().cloned());
    transport.enqueue(all).await.unwrap();

    let run = |args: &[&str]| {
        Command::new(bin())
            .arg("run")
            .args(args)
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    for crash in 1..=3 {
        let mut host = run(&[]);
        let started = Instant::now();
        while !in_hand(dir.path(), &killer.id) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "crash {crash}: the message never came into hand"
            );
            assert!(host.try_wait().unwrap().is_none(), "host exited early");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        host.kill().unwrap(); // What the OOM killer does.
        host.wait().unwrap();
    }
    // The fourth host dead-letters it and finishes everything else.
    let mut host = run(&["--drain"]);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = host.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(60) {
            host.kill().unwrap();
            panic!("the host after the crashes did not drain: the message was handled again");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let dead = crate::common::dead_letters(&pipeline).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].message.id, killer.id);
    assert_eq!(dead[0].error.kind, "crash-loop");
    assert!(
        dead[0].error.message.contains("3 times"),
        "{}",
        dead[0].error.message
    );
    let published = handled_lines(&dir.path().join("out").join("tally.log"));
    assert_eq!(
        published.len(),
        2,
        "the two messages that shared the first batch were handled once each"
    );
}
