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
