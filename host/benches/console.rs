//! How long the web console's pages take to serve, on a host whose
//! embedded store holds 100,000 journal records (10,000 flows of ten
//! messages) and 10,000 dead letters (ten causes of 1,000 records, 1 KiB
//! payloads).
//!
//! A running host (the example's four plugins, admin listener and console
//! on), one signed-in client over loopback HTTP, each page requested 50
//! times in turn after 3 warm-up requests, each request asking for another
//! record, message or group where the page takes one. Reported: p50, p95
//! and the slowest, in milliseconds, of the whole request (the body read).
//!
//! Run: `cargo bench -p switchyard --bench console` (plugins built first
//! with `cargo xtask build-plugins`). `CONSOLE_BENCH_REQUESTS` (default 50)
//! sets the requests per page.

// A benchmark fails loudly on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use switchyard::envelope::{Envelope, Kind};
use switchyard::journal::{self, Record};
use switchyard::plugin::{Failure, FailureKind};
use switchyard::runtime::{self, RunMode, RunOptions};

const FLOWS: usize = 10_000;
const CAUSES: [&str; 10] = [
    "the card was declined",
    "the warehouse is closed",
    "the address cannot be found",
    "the customer is blocked",
    "the tax service did not answer",
    "the price list is out of date",
    "the currency is not supported",
    "the coupon has expired",
    "the parcel is too heavy",
    "the invoice could not be rendered",
];
const LETTERS_PER_CAUSE: usize = 1_000;
const TOKEN: &str = "console-bench-token";

fn pipeline(dir: &std::path::Path) -> switchyard::config::Pipeline {
    let path = dir.join("console.toml");
    let dist = common::dist();
    std::fs::write(
        &path,
        format!(
            r#"[transport]
path = "console.db"
[plugins.orders]
wasm = "{dist}/orders.wasm"
commands = ["PlaceOrder"]
[plugins.payments]
wasm = "{dist}/payments.wasm"
commands = ["ChargePayment"]
[plugins.inventory]
wasm = "{dist}/inventory.wasm"
events = ["OrderPlaced"]
[plugins.notifications]
wasm = "{dist}/notifications.wasm"
events = ["OrderPlaced", "PaymentCaptured"]
"#
        ),
    )
    .unwrap();
    switchyard::config::load(&path).unwrap().pipeline
}

/// 100,000 journal records and 10,000 dead letters in the pipeline's file.
async fn fill(p: &switchyard::config::Pipeline) -> (Vec<String>, Vec<String>) {
    let switchyard::config::TransportConfig::Embedded(e) = &p.transport else {
        unreachable!("the bench's pipeline is embedded")
    };
    let journal: Arc<dyn journal::Store> =
        Arc::new(journal::sqlite::SqliteJournal::open(&e.path).unwrap());
    let now = switchyard::envelope::now_ms();
    for chunk in 0..FLOWS / 100 {
        let records: Vec<Record> = (chunk * 100..(chunk + 1) * 100)
            .flat_map(|flow| (0..10).map(move |hop| common::journal_record(flow, hop)))
            // Recent, so that the host's pruning keeps them.
            .map(|mut r| {
                r.at_ms = now - FLOWS as u64 * 10 + (r.at_ms - 1_760_000_000_000);
                r
            })
            .collect();
        journal.write(records).await.unwrap();
    }
    let store = switchyard::dlq::open(&p.dead_letters, &p.name)
        .await
        .unwrap();
    let plugins = runtime::load_plugins(p).await.unwrap();
    let orders = plugins
        .loaded
        .iter()
        .find(|l| l.name().as_str() == "orders")
        .unwrap();
    let ctx = switchyard::dispatch::RouteContext {
        pipeline: p.name.clone(),
        policy: Default::default(),
        dead_letters: store.clone(),
        topology: Arc::new(switchyard::transport::Topology::of(p)),
        source: Default::default(),
        host: "bench".into(),
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
    let mut letters = Vec::new();
    for cause in CAUSES {
        for chunk in 0..LETTERS_PER_CAUSE / 100 {
            let batch: Vec<_> = (0..100)
                .map(|i| {
                    let payload = format!(
                        "{{\"order_id\":\"A-{chunk}-{i}\",\"customer\":\"ada\",\"note\":\"{}\"}}",
                        "x".repeat(960)
                    );
                    let m = Envelope::new(
                        "PlaceOrder",
                        Kind::Command,
                        payload.into_bytes(),
                        "application/json",
                    );
                    let failure = Failure {
                        kind: FailureKind::Permanent,
                        message: cause.to_owned(),
                        code: Some("refused".into()),
                        details: Vec::new(),
                        backtrace: None,
                        output: None,
                    };
                    switchyard::dispatch::dead_letter(&ctx, orders, &m, None, &failure, None)
                })
                .collect();
            letters.extend(batch.iter().map(|d| d.id.clone()));
            store.record(batch).await.unwrap();
        }
    }
    let groups = store
        .groups(&switchyard::dlq::Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.fingerprint)
        .collect();
    (letters, groups)
}

/// The path of a page's `i`th request.
type PathOf<'a> = Box<dyn Fn(usize) -> String + 'a>;

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Signs in; the session cookie.
async fn sign_in(client: &reqwest::Client, base: &str) -> String {
    let r = client
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}&next=%2Fui"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

fn main() {
    if common::filtered_out("console") {
        return;
    }
    let requests = common::env_or("CONSOLE_BENCH_REQUESTS", 50);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path());
        let filling = Instant::now();
        let (letters, groups) = fill(&p).await;
        println!(
            "console: {} journal records, {} dead letters in {} groups (filled in {:.1} s); {requests} requests per page",
            FLOWS * 10,
            letters.len(),
            groups.len(),
            filling.elapsed().as_secs_f64()
        );
        let plugins = runtime::load_plugins(&p).await.unwrap();
        let addr = free_addr();
        let (started, control) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let host_pipeline = p.clone();
        let host = tokio::spawn(async move {
            runtime::run_with(
                &host_pipeline,
                plugins,
                RunOptions {
                    admin: Some(addr),
                    admin_token: Some(TOKEN.into()),
                    on_started: Some(started),
                    ..RunOptions::quiet(RunMode::Serve)
                },
                async move {
                    let _ = stopped.await;
                },
            )
            .await
        });
        let _control = control.await.unwrap();
        let base = format!("http://{addr}");
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let cookie = sign_in(&client, &base).await;

        let message = |i: usize| common::journal_record((i * 197) % FLOWS, 5).message_id;
        let flow = |i: usize| common::journal_record((i * 193) % FLOWS, 0).message_id;
        let pages: Vec<(&str, &str, PathOf<'_>)> = vec![
            ("overview", "data-route=\"orders\"", Box::new(|_| "/ui".into())),
            ("overview, live part", "data-route=\"orders\"", Box::new(|_| "/ui/live/overview".into())),
            ("dead letters: groups", "data-fingerprint", Box::new(|_| "/ui/dead-letters".into())),
            (
                "dead letters: a group's newest 200",
                "data-record",
                Box::new(|i| format!("/ui/dead-letters?fingerprint={}", groups[i % groups.len()])),
            ),
            (
                "dead letter",
                "refused",
                Box::new(|i| format!("/ui/dead-letters/{}", letters[(i * 331) % letters.len()])),
            ),
            (
                "message journey (10 messages)",
                "handled by plugin9@",
                Box::new(move |i| format!("/ui/messages?q={}", message(i))),
            ),
            (
                "flow by correlation id",
                "Step9",
                Box::new(move |i| format!("/ui/messages?q={}&by=correlation", flow(i))),
            ),
            ("sagas", "<h1>Sagas", Box::new(|_| "/ui/sagas".into())),
            ("topology", "data-node=\"orders\"", Box::new(|_| "/ui/topology".into())),
            ("plugins", "data-plugin=\"payments\"", Box::new(|_| "/ui/plugins".into())),
        ];
        println!("{:<36} {:>9} {:>9} {:>9} {:>10}", "page", "p50 ms", "p95 ms", "max ms", "bytes");
        for (name, expect, path) in &pages {
            let mut times = Vec::new();
            let mut bytes = 0;
            for i in 0..requests + 3 {
                let started = Instant::now();
                let r = client
                    .get(format!("{base}{}", path(i)))
                    .header("cookie", &cookie)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body = r.bytes().await.unwrap();
                let took = started.elapsed().as_secs_f64() * 1e3;
                assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
                bytes = body.len();
                let text = String::from_utf8_lossy(&body);
                assert!(text.contains(*expect), "{name} does not show `{expect}`: {text}");
                if i >= 3 {
                    times.push(took);
                }
            }
            times.sort_by(f64::total_cmp);
            let n = times.len();
            println!(
                "{name:<36} {:>9.2} {:>9.2} {:>9.2} {bytes:>10}",
                times[n / 2],
                times[(n * 95 / 100).min(n - 1)],
                times[n - 1]
            );
        }
        let _ = stop.send(());
        host.await.unwrap().unwrap();
    });
}
