//! Retries and the dead-letter store, driven through real plugins and a
//! running host. Every scenario runs twice: with the embedded store and with
//! PostgreSQL (see `postgres_url`).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::config::{self, Pipeline};
use switchyard::dispatch::{Verdict, Worker};
use switchyard::dlq::replay::{self, ReplayOptions, Skip};
use switchyard::dlq::{self, DeadLetterStore, Filter, Status};
use switchyard::envelope::{Envelope, Kind};
use switchyard::recover::RetryPolicy;
use switchyard::runtime::{self, RunMode};
use switchyard::transport::{Delivery, Transport};

use crate::common::{bin, dead_letters, load, message, misbehave, write_pipeline};

/// The PostgreSQL the tests use: `SWITCHYARD_TEST_POSTGRES_URL`, or the
/// local server every development and CI machine runs.
pub fn postgres_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Where a scenario keeps its dead letters.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    Embedded,
    Postgres,
}

/// A schema of its own for each PostgreSQL test, dropped when done.
pub struct Scratch {
    pub schema: String,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            schema: format!("t_{}", uuid_suffix()),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let url = postgres_url();
        // A fresh thread: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

fn uuid_suffix() -> String {
    switchyard::envelope::new_id().replace('-', "")[20..].to_owned()
}

/// The `[dead_letters]` lines for a store (with a loop guard of 2), and the
/// scratch schema to drop.
fn dlq_section(store: Store) -> (String, Option<Scratch>) {
    match store {
        Store::Embedded => ("[dead_letters]\nmax_replays = 2\n".into(), None),
        Store::Postgres => {
            let scratch = Scratch::new();
            (
                format!(
                    "[dead_letters]\nurl = \"{}\"\nschema = \"{}\"\nmax_replays = 2\n",
                    postgres_url(),
                    scratch.schema
                ),
                Some(scratch),
            )
        }
    }
}

/// Writes a pipeline with the store's `[dead_letters]` section prepended.
fn pipeline(dir: &Path, name: &str, store: Store, body: &str) -> (Pipeline, Option<Scratch>) {
    let (section, scratch) = dlq_section(store);
    let text = format!("[host]\ncache_dir = \"{{cache}}\"\n{section}\n{body}");
    let path = write_pipeline(dir, name, &text);
    (
        config::load(&path)
            .unwrap_or_else(|e| panic!("{e}"))
            .pipeline,
        scratch,
    )
}

async fn enqueue(p: &Pipeline, messages: Vec<Envelope>) {
    runtime::open_transport(p)
        .unwrap()
        .enqueue(messages)
        .await
        .unwrap();
}

async fn drain(p: &Pipeline) {
    let plugins = runtime::load_plugins(p).await.unwrap();
    runtime::run(p, plugins, RunMode::Drain, std::future::pending())
        .await
        .unwrap();
}

async fn store_of(p: &Pipeline) -> Arc<dyn DeadLetterStore> {
    dlq::open(&p.dead_letters, &p.name).await.unwrap()
}

pub fn order(order_id: &str, unit_price_cents: u64) -> Envelope {
    message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": order_id, "customer": "ada",
               "items": [{"sku": "lamp", "quantity": 1, "unit_price_cents": unit_price_cents}]}),
    )
}

/// The example's orders, payments, inventory and notifications, the
/// payment retried once at once and twice later.
pub const ORDERS: &str = r#"
[plugins.orders]
wasm = "{dist}/orders.wasm"
commands = ["PlaceOrder"]
[plugins.payments]
wasm = "{dist}/payments.wasm"
commands = ["ChargePayment"]
retry = { immediate = 1, delayed = 2, backoff = "50ms", max_backoff = "100ms" }
[plugins.inventory]
wasm = "{dist}/inventory.wasm"
events = ["OrderPlaced"]
[plugins.notifications]
wasm = "{dist}/notifications.wasm"
events = ["OrderPlaced", "PaymentCaptured"]
"#;

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Store::Embedded).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Store::Postgres).await;
                }
            )*
        }
    };
}

on_both_stores!(
    poison_is_dead_lettered_after_exactly_one_attempt_with_its_context,
    transient_failures_succeed_after_retries,
    traps_timeouts_and_memory_bombs_land_with_their_kind,
    replaying_a_group_after_a_fix_handles_every_record,
    the_loop_guard_stops_a_message_that_keeps_failing,
    sigkill_during_a_replay_of_1000_records_loses_none,
    an_interrupted_replay_is_resumed_and_its_double_deliveries_reported,
    an_edited_dead_letter_is_sent_as_a_new_message_in_its_place,
);

async fn poison_is_dead_lettered_after_exactly_one_attempt_with_its_context(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (p, _scratch) = pipeline(dir.path(), "orders", store, ORDERS);
    let mut poison = message(Kind::Command, "PlaceOrder", json!({"order_id": 42}));
    poison.headers.push(("x-tenant".into(), "acme".into()));
    poison.correlation_id = Some("flow-1".into());
    enqueue(&p, vec![poison.clone()]).await;
    drain(&p).await;

    let letters = dead_letters(&p).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let d = &letters[0];
    assert_eq!(
        d.attempts.len(),
        1,
        "poison is not retried: {:?}",
        d.attempts
    );
    assert_eq!(d.attempts[0].then, "dead-letter");
    assert_eq!(d.error.kind, "permanent");
    assert_eq!(d.error.code.as_deref(), Some("malformed-payload"));
    assert!(d.error.message.contains(&poison.id), "{}", d.error.message);
    // The message as it arrived.
    assert_eq!(d.message.id, poison.id);
    assert_eq!(d.message.payload, poison.payload);
    assert_eq!(d.message.headers, poison.headers);
    assert_eq!(d.message.correlation_id.as_deref(), Some("flow-1"));
    assert_eq!(
        (d.message.kind, d.message.message_type.as_str()),
        (Kind::Command, "PlaceOrder")
    );
    // Who failed it, where it came from, and its cause.
    assert_eq!(
        (d.pipeline.as_str(), d.route.as_str()),
        ("orders", "orders")
    );
    assert_eq!(d.plugin_version, "1.0.0");
    assert!(d.plugin_digest.starts_with("sha256:"));
    assert_eq!(d.source.transport, "embedded");
    assert_eq!(d.source.queue, "orders");
    assert!(
        d.source.location.ends_with("orders.db"),
        "{}",
        d.source.location
    );
    assert!(!d.host.is_empty());
    assert_eq!(d.fingerprint.len(), 12);
    assert!(
        d.cause.contains("<id>"),
        "ids are normalized out of the cause: {}",
        d.cause
    );
    assert_eq!(d.status, Status::Dead);
    assert!(d.first_failed_at_ms <= d.last_failed_at_ms);
}

async fn transient_failures_succeed_after_retries(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (p, _scratch) = pipeline(dir.path(), "orders", store, ORDERS);
    // 4513 cents: the payment gateway times out on attempts 1 and 2: one
    // immediate retry, one delayed retry, then success on attempt 3.
    enqueue(&p, vec![order("R-1", 4513)]).await;
    let started = Instant::now();
    drain(&p).await;
    assert!(
        started.elapsed() >= Duration::from_millis(25),
        "the delayed retry waited"
    );
    assert!(
        dead_letters(&p).await.is_empty(),
        "handled after retries, not dead-lettered"
    );
    assert!(
        runtime::open_transport(&p)
            .unwrap()
            .is_idle()
            .await
            .unwrap()
    );
}

async fn traps_timeouts_and_memory_bombs_land_with_their_kind(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (p, _scratch) = pipeline(
        dir.path(),
        "rogue",
        store,
        r#"
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        memory = "16 MiB"
        timeout = "300ms"
        retry = { immediate = 1, delayed = 0, retry_on = ["transient", "timeout"] }
        "#,
    );
    let (panic, looping, bomb) = (misbehave("panic"), misbehave("loop"), misbehave("oom"));
    enqueue(&p, vec![panic.clone(), looping.clone(), bomb.clone()]).await;
    drain(&p).await;
    let letters: HashMap<String, _> = dead_letters(&p)
        .await
        .into_iter()
        .map(|d| (d.message.id.clone(), d))
        .collect();
    assert_eq!(letters.len(), 3);

    let trap = &letters[&panic.id];
    assert_eq!(trap.error.kind, "trap");
    assert_eq!(trap.attempts.len(), 1, "traps are not retried by default");
    let bt = trap
        .error
        .backtrace
        .as_deref()
        .expect("a trap has a backtrace");
    assert!(bt.contains("rogue"), "{bt}");
    let output = trap
        .error
        .output
        .as_deref()
        .expect("the panic message is kept");
    assert!(
        output.contains("rogue plugin panicked on purpose"),
        "{output}"
    );
    assert!(
        trap.cause.contains('@'),
        "a trap's cause names where it happened: {}",
        trap.cause
    );

    let timeout = &letters[&looping.id];
    assert_eq!(timeout.error.kind, "timeout");
    assert_eq!(
        timeout.attempts.len(),
        2,
        "one immediate retry: {:?}",
        timeout.attempts
    );
    assert_eq!(timeout.attempts[0].then, "retry-now");

    let oom = &letters[&bomb.id];
    assert_eq!(oom.error.kind, "out-of-memory");
    assert!(
        oom.error.message.contains("16 MiB"),
        "{}",
        oom.error.message
    );
    assert_eq!(oom.attempts.len(), 1);
}

pub fn reserve(quantity: u32) -> Envelope {
    message(
        Kind::Command,
        "Reserve",
        json!({"sku": "lamp", "quantity": quantity}),
    )
}

pub fn stock(wasm: &str) -> String {
    format!(
        "[plugins.stock]\nwasm = \"{{dist}}/{wasm}.wasm\"\ncommands = [\"Reserve\"]\nretry = {{ immediate = 0, delayed = 0 }}\n"
    )
}

fn replay_options(p: &Pipeline) -> ReplayOptions {
    ReplayOptions {
        dry_run: false,
        force: false,
        max_replays: p.dead_letters.max_replays,
        batch_size: 100,
        rate: None,
        routes: p.plugins.iter().map(|s| s.name.to_string()).collect(),
        claim_lease: replay::CLAIM_LEASE,
    }
}

async fn replay_all(p: &Pipeline, filter: &Filter) -> replay::ReplayReport {
    replay_with(p, filter, replay_options(p)).await
}

async fn replay_with(
    p: &Pipeline,
    filter: &Filter,
    options: ReplayOptions,
) -> replay::ReplayReport {
    let store = store_of(p).await;
    let transport = runtime::open_transport(p).unwrap();
    let records = replay::candidates(store.as_ref(), filter).await.unwrap();
    replay::replay(store.as_ref(), &transport, records, &options, |_, _| {})
        .await
        .unwrap()
}

async fn replaying_a_group_after_a_fix_handles_every_record(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (buggy, _scratch) = pipeline(dir.path(), "stock", store, &stock("stock"));
    let big: Vec<Envelope> = (0..5).map(|i| reserve(11 + i)).collect();
    let mut all = big.clone();
    all.push(reserve(3));
    enqueue(&buggy, all).await;
    drain(&buggy).await;

    let s = store_of(&buggy).await;
    let groups = s.groups(&Filter::default()).await.unwrap();
    assert_eq!(groups.len(), 1, "one bug, one group: {groups:?}");
    assert_eq!(groups[0].count, 5);
    assert_eq!(groups[0].error_kind, "trap");
    let letters = dead_letters(&buggy).await;
    assert!(letters.iter().all(|d| d.plugin_version == "1.0.0"));

    // The fixed version is deployed under the same plugin name; the group
    // is replayed through the same route.
    let (fixed, _) = {
        let text = std::fs::read_to_string(&buggy.source)
            .unwrap()
            .replace("/stock.wasm", "/stock_fixed.wasm");
        std::fs::write(&buggy.source, text).unwrap();
        (config::load(&buggy.source).unwrap().pipeline, ())
    };
    let report = replay_all(
        &fixed,
        &Filter {
            fingerprint: Some(groups[0].fingerprint.clone()),
            ..Filter::default()
        },
    )
    .await;
    assert_eq!(report.replayed.len(), 5);
    assert!(report.replayed.iter().all(|d| d.replay_count == 1));
    let replayed = dead_letters(&fixed).await;
    assert!(
        replayed.iter().all(|d| d.status == Status::Replayed),
        "{replayed:?}"
    );
    drain(&fixed).await;

    let after = dead_letters(&fixed).await;
    assert_eq!(after.len(), 5);
    assert!(
        after.iter().all(|d| d.status == Status::Handled),
        "{after:?}"
    );
    let ids: Vec<&str> = after.iter().map(|d| d.message.id.as_str()).collect();
    for m in &big {
        assert!(ids.contains(&m.id.as_str()), "replays keep the message id");
    }
}

async fn the_loop_guard_stops_a_message_that_keeps_failing(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (p, _scratch) = pipeline(dir.path(), "stock", store, &stock("stock"));
    enqueue(&p, vec![reserve(50)]).await;
    drain(&p).await;
    for round in 1..=2u32 {
        let report = replay_all(&p, &Filter::default()).await;
        assert_eq!(report.replayed.len(), 1, "round {round}");
        drain(&p).await;
        let d = &dead_letters(&p).await[0];
        assert_eq!(d.status, Status::Dead, "it failed again");
        assert_eq!(d.replay_count, round);
        // The failed replay added its attempt to the same record.
        assert_eq!(d.attempts.len() as u32, round + 1, "{:?}", d.attempts);
    }
    let report = replay_all(&p, &Filter::default()).await;
    assert!(
        report.replayed.is_empty(),
        "the loop guard trips after max_replays = 2"
    );
    assert!(matches!(
        report.skipped.as_slice(),
        [(_, Skip::LoopGuard { replays: 2 })]
    ));
    assert_eq!(
        dead_letters(&p).await.len(),
        1,
        "still one record, not a duplicate"
    );
}

async fn sigkill_during_a_replay_of_1000_records_loses_none(store: Store) {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let (p, _scratch) = pipeline(
        dir.path(),
        "replay",
        store,
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    // 1,000 dead letters of a route whose plugin now works.
    let s = store_of(&p).await;
    let tally = load("tally");
    let ctx = switchyard::dispatch::RouteContext {
        pipeline: p.name.clone(),
        policy: RetryPolicy::default(),
        dead_letters: s.clone(),
        topology: Arc::new(switchyard::transport::Topology::of(&p)),
        source: Default::default(),
        host: "test".into(),
        fail_when_plugin_cannot_start: false,
        telemetry: switchyard::telemetry::Telemetry::off(),
        broker_dead_letters: false,
        schemas: Default::default(),
        max_message_size: switchyard::limits::DEFAULT_MAX_MESSAGE_SIZE,
        crash_guard: None,
        state: None,
        exactly_once: false,
        saga: None,
        journal: None,
    };
    let mut ids = Vec::new();
    for chunk in 0..N / 100 {
        let letters: Vec<_> = (0..100)
            .map(|i| {
                let m = message(Kind::Event, "Tick", json!(chunk * 100 + i));
                ids.push(m.id.clone());
                let failure = switchyard::plugin::Failure {
                    kind: switchyard::plugin::FailureKind::Transient,
                    message: "the disk was full".into(),
                    code: None,
                    details: Vec::new(),
                    backtrace: None,
                    output: None,
                };
                switchyard::dispatch::dead_letter(&ctx, &tally, &m, None, &failure, None)
            })
            .collect();
        s.record(letters).await.unwrap();
    }
    let pipeline_file = p.source.display().to_string();

    // Replay at 2,000 records/s in batches of 10, and kill it part way.
    let mut child = Command::new(bin())
        .args([
            "dlq",
            "replay",
            "--all",
            "-p",
            &pipeline_file,
            "--batch-size",
            "10",
            "--rate",
            "2000",
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    loop {
        let line = lines
            .next()
            .expect("replay ended before it was killed")
            .unwrap();
        let done = line
            .strip_prefix("replay: ")
            .and_then(|l| l.split('/').next())
            .and_then(|n| n.parse::<usize>().ok());
        if done.is_some_and(|n| n >= 200) {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let counts: HashMap<Status, u64> = s.counts().await.unwrap().into_iter().collect();
    let total: u64 = counts.values().sum();
    assert_eq!(total, N as u64, "no record lost: {counts:?}");
    assert!(
        counts.get(&Status::Dead).copied().unwrap_or(0) > 0,
        "killed before the end: {counts:?}"
    );

    // The second replay finishes, reporting records it found mid-replay.
    let out = Command::new(bin())
        .args(["dlq", "replay", "--all", "-p", &pipeline_file])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let resumed: usize = err
        .lines()
        .find_map(|l| {
            l.trim()
                .split(" of them were left mid-replay")
                .next()
                .filter(|_| l.contains("mid-replay"))
        })
        .map_or(0, |n| n.trim().parse().unwrap());

    drain(&p).await;
    let log = std::fs::read_to_string(dir.path().join("out").join("tally.log")).unwrap();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for l in log.lines() {
        *seen.entry(l).or_default() += 1;
    }
    assert!(
        ids.iter().all(|id| seen.contains_key(id.as_str())),
        "every replayed message was handled"
    );
    let doubles = log.lines().count() - N;
    eprintln!(
        "replay killed mid-way: {resumed} records reported as possibly replayed twice, {doubles} handled twice"
    );
    assert!(
        doubles <= resumed,
        "every double replay was reported ({doubles} > {resumed})"
    );
    assert!(resumed <= 10, "at most one batch is in doubt");
    let counts: HashMap<Status, u64> = s.counts().await.unwrap().into_iter().collect();
    assert_eq!(
        counts.get(&Status::Handled).copied(),
        Some(N as u64),
        "{counts:?}"
    );
}

async fn an_interrupted_replay_is_resumed_and_its_double_deliveries_reported(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let (p, _scratch) = pipeline(
        dir.path(),
        "resume",
        store,
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let s = store_of(&p).await;
    let tally = load("tally");
    let ctx = switchyard::dispatch::RouteContext {
        pipeline: p.name.clone(),
        policy: RetryPolicy::default(),
        dead_letters: s.clone(),
        topology: Arc::new(switchyard::transport::Topology::of(&p)),
        source: Default::default(),
        host: "test".into(),
        fail_when_plugin_cannot_start: false,
        telemetry: switchyard::telemetry::Telemetry::off(),
        broker_dead_letters: false,
        schemas: Default::default(),
        max_message_size: switchyard::limits::DEFAULT_MAX_MESSAGE_SIZE,
        crash_guard: None,
        state: None,
        exactly_once: false,
        saga: None,
        journal: None,
    };
    let failure = switchyard::plugin::Failure {
        kind: switchyard::plugin::FailureKind::Transient,
        message: "the disk was full".into(),
        code: None,
        details: Vec::new(),
        backtrace: None,
        output: None,
    };
    let letters: Vec<_> = (0..4)
        .map(|i| {
            switchyard::dispatch::dead_letter(
                &ctx,
                &tally,
                &message(Kind::Event, "Tick", json!(i)),
                None,
                &failure,
                None,
            )
        })
        .collect();
    let ids = s.record(letters).await.unwrap();

    // A replay that dies after enqueueing two records, before marking them.
    let transport = runtime::open_transport(&p).unwrap();
    let started = s
        .begin_replay(&ids[..2], "the replay that died", 0)
        .await
        .unwrap();
    transport
        .enqueue_to(
            "tally",
            started.iter().map(|d| d.replay_message()).collect(),
        )
        .await
        .unwrap();

    // While its claim is fresh, another replay leaves those two alone: the
    // replay holding them may still be running.
    let report = replay_all(&p, &Filter::default()).await;
    assert_eq!(report.replayed.len(), 2);
    assert_eq!((report.resumed, report.claimed_elsewhere), (0, 2));
    // Once the claim is older than the lease, they are taken over.
    let took_over = ReplayOptions {
        claim_lease: Duration::ZERO,
        ..replay_options(&p)
    };
    std::thread::sleep(Duration::from_millis(5));
    let report = replay_with(&p, &Filter::default(), took_over).await;
    assert_eq!(report.replayed.len(), 2);
    assert_eq!(
        report.resumed, 2,
        "the two records left mid-replay are reported"
    );
    drain(&p).await;
    let log = std::fs::read_to_string(dir.path().join("out").join("tally.log")).unwrap();
    assert_eq!(
        log.lines().count(),
        6,
        "the two in doubt were delivered twice: {log}"
    );
    assert!(
        dead_letters(&p)
            .await
            .iter()
            .all(|d| d.status == Status::Handled)
    );
}

/// `switchyard dlq edit`: a wrong payload is refused and changes nothing;
/// a corrected one goes out as a new message, linked to the old one, and
/// the record is resolved.
async fn an_edited_dead_letter_is_sent_as_a_new_message_in_its_place(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (p, _scratch) = pipeline(dir.path(), "orders", store, ORDERS);
    let mut poison = message(Kind::Command, "PlaceOrder", json!({"order_id": 42}));
    poison.correlation_id = Some("flow-edit".into());
    poison.headers.push(("x-tenant".into(), "acme".into()));
    enqueue(&p, vec![poison.clone()]).await;
    drain(&p).await;
    let record = dead_letters(&p).await.remove(0);
    let file = p.source.display().to_string();
    let edit = |extra: &[&str]| {
        let mut args = vec!["dlq", "edit", "-p", &file, &record.id[..13]];
        args.extend_from_slice(extra);
        Command::new(bin())
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // Not JSON, and no payload at all (no terminal for an editor): refused.
    let o = edit(&["--data", "{\"order_id\": "]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("not JSON"), "{err}");
    let o = edit(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--data or --file"), "{err}");
    assert_eq!(dead_letters(&p).await[0].status, Status::Dead);

    // A corrected order from a file.
    let fixed = dir.path().join("fixed.json");
    std::fs::write(&fixed, order("A-77", 1200).payload).unwrap();
    let o = edit(&["--file", &fixed.display().to_string()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let new_id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_ne!(new_id, poison.id);
    assert!(err.contains(&record.id), "{err}");
    let after = dead_letters(&p).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].status, Status::Resolved);
    assert_eq!(
        after[0].note.as_deref(),
        Some(replay::edited_note(&new_id).as_str())
    );
    // A second edit of the same record is refused.
    let o = edit(&["--file", &fixed.display().to_string()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("only a `dead` record"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The new message is handled, and its story names the old one.
    drain(&p).await;
    assert_eq!(dead_letters(&p).await.len(), 1, "no new dead letter");
    let o = Command::new(bin())
        .args(["why", "-p", &file, &new_id, "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let story: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = story.to_string();
    assert!(text.contains("\"handled\""), "{text}");
    assert!(
        text.contains(&poison.id),
        "caused by the old message: {text}"
    );
    assert!(text.contains("flow-edit"), "same correlation: {text}");

    // The same flow, found by the span attribute the orders plugin set.
    let o = Command::new(bin())
        .args(["why", "-p", &file, "--attribute", "order.id=A-77"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let told = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        told.contains(&new_id) && told.contains("handled by orders"),
        "{told}"
    );
    let o = Command::new(bin())
        .args(["why", "-p", &file, "--attribute", "order.id=A-78"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No plugin set order.id = A-78"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn attempt_history_travels_with_the_message() {
    let payments = load("payments");
    let policy = RetryPolicy {
        immediate: 1,
        delayed: 1,
        backoff: Duration::from_millis(10),
        ..RetryPolicy::default()
    };
    let mut worker = Worker::new(payments, policy);
    let mut delivery = Delivery {
        envelope: message(
            Kind::Command,
            "ChargePayment",
            json!({"order_id": "H-1", "customer": "ada", "amount_cents": 913}),
        ),
        receipt: 1,
        malformed: None,
        origin: None,
    };
    // Attempts 1 and 2 fail (one immediate retry); a delayed retry follows.
    let verdict = worker.process(&mut delivery).unwrap();
    assert!(matches!(verdict, Verdict::RetryLater(..)), "{verdict:?}");
    let h = &delivery.envelope.history;
    assert_eq!(h.len(), 2);
    assert_eq!((h[0].number, h[0].then.as_str()), (1, "retry-now"));
    assert_eq!((h[1].number, h[1].then.as_str()), (2, "retry-later"));
    assert!(
        h.iter()
            .all(|a| a.error_kind == "transient" && a.error.contains("timed out"))
    );
    assert_eq!(h[0].plugin, "payments@1.0.0");
    assert_eq!(
        delivery.envelope.attempt, 3,
        "the next attempt is the third"
    );

    // The scheduled retry comes back with its history: attempt 3 succeeds.
    let verdict = worker.process(&mut delivery).unwrap();
    assert!(matches!(verdict, Verdict::Handled(_)), "{verdict:?}");
    assert_eq!(delivery.envelope.history.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_retries_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = pipeline(
        dir.path(),
        "flaky",
        Store::Embedded,
        r#"
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        events = ["Flaky"]
        retry = { immediate = 0, delayed = 1, backoff = "1500ms" }
        "#,
    );
    let transport = runtime::open_transport(&p).unwrap();
    let m = Envelope::new("Flaky", Kind::Event, b"fail once".to_vec(), "text/plain");
    transport.enqueue(vec![m]).await.unwrap();

    // The first attempt fails and schedules a retry; the host stops before
    // it is due.
    let plugins = runtime::load_plugins(&p).await.unwrap();
    let stopped = {
        let transport = transport.clone();
        async move {
            while transport.scheduled().await.unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    runtime::run(&p, plugins, RunMode::Serve, stopped)
        .await
        .unwrap();
    let scheduled = transport.scheduled().await.unwrap();
    assert_eq!(scheduled.len(), 1, "{scheduled:?}");
    assert!(
        scheduled[0].2 > switchyard::envelope::now_ms(),
        "not due yet"
    );
    assert!(!transport.is_idle().await.unwrap());

    // A new host picks the schedule up and handles the retry when it is due.
    drain(&p).await;
    assert!(transport.scheduled().await.unwrap().is_empty());
    assert!(
        dead_letters(&p).await.is_empty(),
        "the second attempt succeeded"
    );
}
