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

/// A `Misbehave` command with more fields.
fn misbehave_with(fields: serde_json::Value) -> switchyard::envelope::Envelope {
    crate::common::message(switchyard::envelope::Kind::Command, "Misbehave", fields)
}

#[test]
fn a_peer_that_never_answers_ends_at_the_deadline_not_never() {
    // Accepts, then says nothing and reads nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let keep = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(2).flatten().collect();
        std::thread::sleep(Duration::from_secs(8));
        drop(conns);
    });
    let rogue = load_with(
        "rogue",
        limits(64, Duration::from_millis(300)),
        Grants {
            network: vec![addr],
            ..Grants::default()
        },
    );
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let started = Instant::now();
    let failure = worker
        .handle(&mut misbehave_with(
            serde_json::json!({ "action": "connect-and-read", "to": addr.to_string() }),
        ))
        .unwrap()
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(failure.kind, FailureKind::Timeout, "{failure}");
    assert!(took < Duration::from_secs(3), "the read waited {took:?}");
    let outputs = worker
        .handle(&mut misbehave("ok"))
        .unwrap()
        .expect("served after the wait was cut");
    assert_eq!(reply_json(&outputs), "ok");
    drop(keep);
}

#[test]
fn a_fifo_in_a_granted_directory_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(dir.path().join("plain.txt"), b"hello").unwrap();
    let rogue = load_with(
        "rogue",
        limits(64, Duration::from_secs(2)),
        Grants {
            dirs: vec![DirGrant {
                host: dir.path().to_owned(),
                guest: "/data".into(),
                writable: true,
            }],
            ..Grants::default()
        },
    );
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let started = Instant::now();
    let failure = worker
        .handle(&mut misbehave_with(
            serde_json::json!({ "action": "read-file", "path": "/data/pipe" }),
        ))
        .unwrap()
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the open waited {:?}",
        started.elapsed()
    );
    assert_eq!(failure.kind, FailureKind::Transient, "{failure}");
    assert!(failure.message.contains("/data/pipe"), "{failure}");
    // Ordinary files still open and read.
    let outputs = worker
        .handle(&mut misbehave_with(
            serde_json::json!({ "action": "read-file", "path": "/data/plain.txt" }),
        ))
        .unwrap()
        .expect("a regular file is read");
    assert_eq!(reply_json(&outputs), serde_json::json!({ "read": 5 }));
}

#[test]
fn a_flood_of_empty_headers_is_refused() {
    let rogue = load_with("rogue", Limits::default(), Grants::default());
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    // Nothing to measure by length, everything to allocate: refused.
    let failure = worker
        .handle(&mut misbehave_with(
            serde_json::json!({ "action": "headers", "count": 100_000 }),
        ))
        .unwrap()
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::ContractViolation, "{failure}");
    assert!(failure.message.contains("headers"), "{failure}");
    // A handful of headers is fine... as long as their names are not empty.
    let failure = worker
        .handle(&mut misbehave_with(
            serde_json::json!({ "action": "headers", "count": 3 }),
        ))
        .unwrap()
        .unwrap_err();
    assert!(
        failure.message.contains("header name is empty"),
        "{failure}"
    );
    // Many outputs of empty payloads still count against the per-call budget.
    let failure = worker
        .handle(&mut misbehave_with(
            serde_json::json!({ "action": "publish-many", "count": 5_000 }),
        ))
        .unwrap()
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::ContractViolation, "{failure}");
}

#[test]
fn an_output_larger_than_a_message_may_be_fails_its_call() {
    use switchyard::dispatch::Verdict;
    use switchyard::transport::Delivery;
    let rogue = load_with(
        "rogue",
        limits(128, Duration::from_secs(10)),
        Grants::default(),
    );
    let policy = RetryPolicy {
        immediate: 0,
        delayed: 0,
        ..RetryPolicy::default()
    };
    let mut worker = Worker::new(rogue, policy).with_max_message_size(1 << 20);
    let mut process = |count: usize| {
        let mut delivery = Delivery {
            envelope: misbehave_with(
                serde_json::json!({ "action": "publish-bytes", "count": count }),
            ),
            receipt: 1,
            malformed: None,
            origin: None,
        };
        worker.process(&mut delivery).unwrap()
    };
    match process((1 << 20) + 1) {
        Verdict::DeadLetter(f) => {
            assert_eq!(f.kind, FailureKind::ContractViolation, "{f}");
            assert!(f.message.contains("max_message_size"), "{f}");
        }
        Verdict::Handled(_) => panic!("an output over the limit was accepted"),
        Verdict::RetryLater(..) => panic!("a contract violation is never retried"),
        Verdict::Done(_) => panic!("the worker never decides a message was done"),
        Verdict::NotFound => panic!("echo is no saga"),
    }
    assert!(
        matches!(process(1 << 20), Verdict::Handled(_)),
        "at the limit is fine"
    );
}

#[test]
fn a_stack_overflow_is_a_trap_and_the_next_message_is_served() {
    let rogue = load_with("rogue", Limits::default(), Grants::default());
    let mut worker = Worker::new(rogue, RetryPolicy::default());
    let failure = worker
        .handle(&mut misbehave("overflow"))
        .unwrap()
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::Trap, "{failure}");
    let outputs = worker.handle(&mut misbehave("ok")).unwrap().unwrap();
    assert_eq!(reply_json(&outputs), "ok");
}
