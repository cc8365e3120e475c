//! Plugins that misbehave in every way they can, beside a healthy route
//! whose throughput is measured: each misbehaving message fails alone,
//! classified, and the healthy route keeps moving.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::envelope::Kind;
use switchyard::runtime;
use switchyard::transport::Transport as _;

use crate::brokers::embedded_pipeline;
use crate::common::message;
use crate::reliability::{host, lines, tally, wait_until};

const PIPELINE: &str = r#"
batch_size = 64
[plugins.tally]
wasm = "{dist}/tally.wasm"
events = ["Tick"]
grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
[plugins.rogue]
wasm = "{dist}/rogue.wasm"
commands = ["Misbehave", "Sent"]
memory = "32 MiB"
timeout = "200ms"
retry = { immediate = 0, delayed = 0 }
"#;

/// Ticks per second the tally route handled with `rogue` messages of
/// `action` (and `count`) queued first, and the dead letters' kinds.
async fn tally_rate(
    action: Option<(&str, usize)>,
    ticks: usize,
    rogues: usize,
) -> (f64, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let (path, p) = embedded_pipeline(dir.path(), PIPELINE);
    let transport = runtime::open_transport(&p).unwrap();
    if let Some((action, count)) = action {
        let bad: Vec<_> = (0..rogues)
            .map(|_| {
                message(
                    Kind::Command,
                    "Misbehave",
                    json!({ "action": action, "count": count }),
                )
            })
            .collect();
        transport.enqueue(bad).await.unwrap();
    }
    let mut left = ticks;
    while left > 0 {
        let n = left.min(1000);
        let batch: Vec<_> = (0..n)
            .map(|i| message(Kind::Event, "Tick", json!({ "n": i })))
            .collect();
        transport.enqueue(batch).await.unwrap();
        left -= n;
    }
    let log = tally(dir.path());
    let mut h = host(&path, &[]);
    wait_until(
        "the first tick",
        &mut [&mut h],
        Duration::from_secs(60),
        || !lines(&log).is_empty(),
    );
    let started = Instant::now();
    wait_until(
        "every tick",
        &mut [&mut h],
        Duration::from_secs(300),
        || lines(&log).len() >= ticks,
    );
    let rate = (ticks - 1) as f64 / started.elapsed().as_secs_f64();
    let mut kinds = Vec::new();
    if action.is_some() {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let dead = crate::common::dead_letters(&p).await;
            if dead.len() >= rogues || Instant::now() > deadline {
                kinds = dead.iter().map(|d| d.error.kind.clone()).collect();
                break;
            }
            assert!(h.try_wait().unwrap().is_none(), "the host died");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(h.try_wait().unwrap().is_none(), "the host died");
    h.kill().unwrap();
    h.wait().unwrap();
    (rate, kinds)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn a_misbehaving_plugin_fails_alone_and_the_other_route_keeps_moving() {
    let _one = crate::one_at_a_time().await;
    let ticks = crate::messages();
    let rogues = 20;
    let (baseline, _) = tally_rate(None, ticks, 0).await;
    crate::report(
        "baseline: the tally route alone",
        "embedded",
        &format!("{ticks} ticks at {baseline:.0} msg/s"),
    );
    let cases: [(&str, usize, &str); 7] = [
        ("loop", 0, "timeout"),
        ("oom", 0, "out-of-memory"),
        ("panic", 0, "trap"),
        ("overflow", 0, "trap"),
        ("flood-logs", 0, "timeout"),
        ("publish-many", 5_000, "contract-violation"),
        ("headers", 100_000, "contract-violation"),
    ];
    for (action, count, kind) in cases {
        let (rate, kinds) = tally_rate(Some((action, count)), ticks, rogues).await;
        assert_eq!(
            kinds.len(),
            rogues,
            "{action}: every misbehaving message dead-lettered"
        );
        assert!(
            kinds.iter().all(|k| k == kind),
            "{action}: expected {kind}, got {kinds:?}"
        );
        // Sharing two cores with a plugin that burns one, the route slows
        // down; it must not stall.
        assert!(
            rate >= baseline / 10.0,
            "{action}: the tally route nearly stopped ({rate:.0} msg/s against {baseline:.0})"
        );
        crate::report(
            &format!("rogue `{action}` x{rogues} beside the tally route"),
            "embedded",
            &format!(
                "all {rogues} dead-lettered as {kind}; tally {rate:.0} msg/s ({:.0} % of alone)",
                100.0 * rate / baseline
            ),
        );
    }
}
