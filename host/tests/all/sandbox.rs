//! The sandbox: deadlines, memory caps, traps, and no ambient authority.

use std::time::{Duration, Instant};

use switchyard::config::{DirGrant, Grants, Limits};
use switchyard::dispatch::Worker;
use switchyard::plugin::{FailureKind, Output};
use switchyard::recover::RetryPolicy;

use crate::common::{load_with, misbehave};

fn limits(memory_mib: u64, timeout: Duration) -> Limits {
    Limits {
        memory: memory_mib << 20,
        timeout,
        ..Limits::default()
    }
}

fn reply_json(outputs: &[Output]) -> serde_json::Value {
    match outputs {
        [Output::Reply(r)] => serde_json::from_slice(&r.payload).unwrap(),
        other => panic!("expected one reply, got {other:?}"),
    }
}

#[test]
fn an_infinite_loop_is_stopped_at_the_deadline_and_the_next_message_is_served() {
    let rogue = load_with(
        "rogue",
        limits(64, Duration::from_millis(200)),
        Grants::default(),
    );
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let started = Instant::now();
    let failure = worker.handle(&mut misbehave("loop")).unwrap().unwrap_err();
    let took = started.elapsed();
    assert_eq!(failure.kind, FailureKind::Timeout, "{failure}");
    assert!(failure.message.contains("200ms"), "{failure}");
    assert!(
        took < Duration::from_secs(5),
        "deadline enforced late: {took:?}"
    );
    // The trapped instance was discarded; a fresh one serves the next message.
    let outputs = worker
        .handle(&mut misbehave("ok"))
        .unwrap()
        .expect("served after a timeout");
    assert_eq!(reply_json(&outputs), "ok");
}

#[test]
fn a_memory_bomb_is_stopped_by_the_cap_and_the_next_message_is_served() {
    let rogue = load_with(
        "rogue",
        limits(16, Duration::from_secs(10)),
        Grants::default(),
    );
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let failure = worker.handle(&mut misbehave("oom")).unwrap().unwrap_err();
    assert_eq!(failure.kind, FailureKind::OutOfMemory, "{failure}");
    assert!(failure.message.contains("16 MiB"), "{failure}");
    let outputs = worker
        .handle(&mut misbehave("ok"))
        .unwrap()
        .expect("served after running out of memory");
    assert_eq!(reply_json(&outputs), "ok");
}

#[test]
fn a_panic_is_a_trap_with_a_named_wasm_backtrace() {
    let rogue = load_with("rogue", Limits::default(), Grants::default());
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let failure = worker.handle(&mut misbehave("panic")).unwrap().unwrap_err();
    assert_eq!(failure.kind, FailureKind::Trap, "{failure}");
    assert!(failure.message.contains("wasm trap"), "{failure}");
    let backtrace = failure.backtrace.expect("a trap has a backtrace");
    assert!(
        backtrace.contains("rogue"),
        "frames should be named:\n{backtrace}"
    );
    assert!(worker.handle(&mut misbehave("ok")).unwrap().is_ok());
}

#[test]
fn without_grants_there_is_no_file_env_or_clock() {
    // The test process has an environment (PATH at least); none of it leaks.
    let rogue = load_with("rogue", Limits::default(), Grants::default());
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let seen = reply_json(&worker.handle(&mut misbehave("sandbox")).unwrap().unwrap());
    assert!(seen["file"].as_str().unwrap().starts_with("Err("), "{seen}");
    assert!(seen["dir"].as_str().unwrap().starts_with("Err("), "{seen}");
    assert_eq!(seen["env"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["wall_clock_secs"], 0, "{seen}");
    assert!(
        std::env::var("PATH").is_ok(),
        "the host itself has an environment"
    );
}

#[test]
fn grants_open_exactly_what_they_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(dir.path().join("etc").join("hostname"), "sandboxed\n").unwrap();
    let grants = Grants {
        env: vec![("GREETING".into(), "hello".into())],
        inherit_env: vec!["PATH".into(), "SWITCHYARD_SURELY_UNSET".into()],
        dirs: vec![DirGrant {
            host: dir.path().join("etc"),
            guest: "/etc".into(),
            writable: false,
        }],
        clock: true,
        ..Grants::default()
    };
    let rogue = load_with("rogue", Limits::default(), grants);
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let seen = reply_json(&worker.handle(&mut misbehave("sandbox")).unwrap().unwrap());
    assert_eq!(seen["file"], "Ok(\"sandboxed\\n\")", "{seen}");
    // `/` itself is not granted, only `/etc`.
    assert!(seen["dir"].as_str().unwrap().starts_with("Err("), "{seen}");
    let mut env: Vec<String> = serde_json::from_value(seen["env"].clone()).unwrap();
    env.sort();
    assert_eq!(env, vec!["GREETING", "PATH"]);
    assert!(
        seen["wall_clock_secs"].as_u64().unwrap() > 1_700_000_000,
        "{seen}"
    );
}

#[test]
fn a_sleep_in_the_host_is_cut_at_the_deadline() {
    let rogue = load_with(
        "rogue",
        limits(64, Duration::from_millis(300)),
        Grants::default(),
    );
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let started = Instant::now();
    let failure = worker.handle(&mut misbehave("sleep")).unwrap().unwrap_err();
    let took = started.elapsed();
    assert_eq!(failure.kind, FailureKind::Timeout, "{failure}");
    assert!(
        took < Duration::from_secs(5),
        "the sleep outlived the deadline: {took:?}"
    );
    let outputs = worker
        .handle(&mut misbehave("ok"))
        .unwrap()
        .expect("served after a timeout");
    assert_eq!(reply_json(&outputs), "ok");
}

#[test]
fn the_memory_cap_covers_all_memories_of_a_store_together() {
    use switchyard::plugin::MemoryLimiter;
    use wasmtime::ResourceLimiter;
    let mut limiter = MemoryLimiter::new(10 << 20);
    // Two memories of 4 MiB fit; growing either past the shared 10 MiB does not.
    assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
    assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
    assert!(limiter.memory_growing(4 << 20, 7 << 20, None).is_err());
    assert_eq!(limiter.exceeded, Some(11 << 20));
    assert!(limiter.memory_growing(4 << 20, 6 << 20, None).unwrap());
}
