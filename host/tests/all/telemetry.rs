//! Traces across every hop, retry, dead letter and replay; OTLP export to a
//! real receiver; Prometheus metrics from a running host.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::SpanKind;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use switchyard::config::{self, Pipeline, TraceExport};
use switchyard::dlq::{self, Filter};
use switchyard::envelope::{Envelope, Kind};
use switchyard::runtime::{self, RunMode, RunOptions};
use switchyard::telemetry::{Resolved, Telemetry};
use switchyard::transport::Transport;

use crate::common::{message, write_pipeline};

const ORDERS: &str = r#"
[host]
cache_dir = "{cache}"
[plugins.orders]
wasm = "{dist}/orders.wasm"
commands = ["PlaceOrder"]
[plugins.payments]
wasm = "{dist}/payments.wasm"
commands = ["ChargePayment"]
retry = { immediate = 1, delayed = 1, backoff = "20ms", max_backoff = "20ms" }
[plugins.inventory]
wasm = "{dist}/inventory.wasm"
events = ["OrderPlaced"]
[plugins.notifications]
wasm = "{dist}/notifications.wasm"
events = ["OrderPlaced", "PaymentCaptured"]
"#;

fn order(id: &str, cents: u64) -> Envelope {
    message(
        Kind::Command,
        "PlaceOrder",
        json!({"order_id": id, "customer": "ada", "items": [{"sku": "lamp", "quantity": 1, "unit_price_cents": cents}]}),
    )
}

/// A `send PlaceOrder` span started outside the host, as a client would,
/// with its context in the message's headers.
fn sent_by_client(telemetry: &Telemetry, mut m: Envelope) -> (Envelope, Context) {
    let cx = telemetry
        .start_span(
            "send PlaceOrder",
            SpanKind::Producer,
            &Context::new(),
            vec![KeyValue::new("messaging.system", "switchyard")],
            Vec::new(),
        )
        .unwrap();
    telemetry.inject(&cx, &mut m.headers);
    (m, cx)
}

async fn drain(p: &Pipeline, telemetry: &Telemetry) {
    let plugins = runtime::load_plugins(p).await.unwrap();
    let options = RunOptions {
        telemetry: telemetry.clone(),
        ..RunOptions::quiet(RunMode::Drain)
    };
    runtime::run_with(p, plugins, options, std::future::pending())
        .await
        .unwrap();
}

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn find<'a>(spans: &'a [SpanData], name: &str, plugin: Option<&str>) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| {
            s.name == name
                && plugin.is_none_or(|p| attr(s, "switchyard.plugin.name").as_deref() == Some(p))
        })
        .collect()
}

fn one<'a>(spans: &'a [SpanData], name: &str, plugin: Option<&str>) -> &'a SpanData {
    let found = find(spans, name, plugin);
    assert_eq!(
        found.len(),
        1,
        "{name} {plugin:?}: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

fn child_of(child: &SpanData, parent: &SpanData) -> bool {
    child.parent_span_id == parent.span_context.span_id()
        && child.span_context.trace_id() == parent.span_context.trace_id()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_follows_a_command_through_every_hop_retry_and_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let p = config::load(&write_pipeline(dir.path(), "orders", ORDERS))
        .unwrap()
        .pipeline;
    let exporter = InMemorySpanExporter::default();
    let telemetry = Telemetry::with_span_exporter(exporter.clone());
    let transport = runtime::open_transport(&p).unwrap();

    // A good order whose payment fails twice (one immediate retry, one
    // delayed retry, then success), and a poison order.
    let (flaky, client_span) = sent_by_client(&telemetry, order("T-1", 4513));
    drop(client_span);
    let (poison, _) = sent_by_client(
        &telemetry,
        message(Kind::Command, "PlaceOrder", json!({"order_id": 7})),
    );
    transport
        .enqueue(vec![flaky.clone(), poison.clone()])
        .await
        .unwrap();
    drain(&p, &telemetry).await;
    let spans = exporter.get_finished_spans().unwrap();

    // The flaky order's flow is one trace, from the client's send down.
    let client = spans
        .iter()
        .find(|s| {
            s.name == "send PlaceOrder"
                && s.span_context.trace_id().to_string() == header(&flaky, "traceparent")[3..35]
        })
        .expect("the client span");
    let trace = client.span_context.trace_id();
    let flow: Vec<SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .cloned()
        .collect();
    let names: Vec<&str> = flow.iter().map(|s| s.name.as_ref()).collect();
    for expected in [
        "process PlaceOrder",
        "send OrderPlaced",
        "send ChargePayment",
        "process OrderPlaced",
        "process ChargePayment",
        "send PaymentCaptured",
        "process PaymentCaptured",
        "send StockReserved",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    let place = one(&flow, "process PlaceOrder", Some("orders"));
    assert!(child_of(place, client));
    assert_eq!(place.span_kind, SpanKind::Consumer);
    assert_eq!(
        attr(place, "messaging.system").as_deref(),
        Some("switchyard")
    );
    assert_eq!(
        attr(place, "messaging.destination.name").as_deref(),
        Some("PlaceOrder")
    );
    assert_eq!(
        attr(place, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_eq!(
        attr(place, "messaging.message.id").as_deref(),
        Some(flaky.id.as_str())
    );
    assert_eq!(
        attr(place, "switchyard.plugin.version").as_deref(),
        Some("1.0.0")
    );
    assert_eq!(attr(place, "switchyard.attempt").as_deref(), Some("1"));
    // Added by the plugin through the contract.
    assert_eq!(attr(place, "order.id").as_deref(), Some("T-1"));
    // The plugin's log line is an event of its span.
    assert!(
        place.events.iter().any(|e| e.name == "log"),
        "{:?}",
        place.events
    );

    let placed = one(&flow, "send OrderPlaced", None);
    assert!(child_of(placed, place));
    assert_eq!(placed.span_kind, SpanKind::Producer);
    assert_eq!(
        attr(placed, "messaging.destination.name").as_deref(),
        Some("OrderPlaced")
    );
    let consumers = find(&flow, "process OrderPlaced", None);
    assert_eq!(consumers.len(), 2);
    assert!(consumers.iter().all(|c| child_of(c, placed)));

    // The payment: a first delivery with two failed attempts, then a delayed
    // retry whose span links to it.
    let charge = one(&flow, "send ChargePayment", None);
    assert!(child_of(charge, place));
    let payments = find(&flow, "process ChargePayment", Some("payments"));
    assert_eq!(payments.len(), 2, "one span per delivery");
    let (first, retry) = if attr(payments[0], "switchyard.attempt").as_deref() == Some("1") {
        (payments[0], payments[1])
    } else {
        (payments[1], payments[0])
    };
    assert!(child_of(first, charge) && child_of(retry, charge));
    let failed: Vec<_> = first
        .events
        .iter()
        .filter(|e| e.name == "attempt failed")
        .collect();
    assert_eq!(failed.len(), 2, "{:?}", first.events);
    assert!(first.events.iter().any(|e| e.name == "retry scheduled"));
    assert!(matches!(
        first.status,
        opentelemetry::trace::Status::Error { .. }
    ));
    assert_eq!(attr(retry, "switchyard.attempt").as_deref(), Some("3"));
    assert_eq!(retry.links.len(), 1);
    assert_eq!(
        retry.links[0].span_context.span_id(),
        first.span_context.span_id()
    );
    let captured = one(&flow, "process PaymentCaptured", None);
    assert!(child_of(one(&flow, "send PaymentCaptured", None), retry));
    assert!(
        captured.parent_span_id
            == one(&flow, "send PaymentCaptured", None)
                .span_context
                .span_id()
    );

    // The poison order: its span marks the dead letter, and the record keeps
    // the span's ids.
    let poison_span = spans
        .iter()
        .find(|s| {
            s.name == "process PlaceOrder"
                && attr(s, "messaging.message.id").as_deref() == Some(poison.id.as_str())
        })
        .unwrap();
    assert!(poison_span.events.iter().any(|e| e.name == "dead-lettered"));
    let store = dlq::open(&p.dead_letters, &p.name).await.unwrap();
    let records = store.list(&Filter::default()).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].trace_id.as_deref(),
        Some(poison_span.span_context.trace_id().to_string().as_str())
    );
    assert_eq!(
        records[0].span_id.as_deref(),
        Some(poison_span.span_context.span_id().to_string().as_str())
    );

    // A replay starts a new trace, linked to the dead letter's span.
    let transport2 = runtime::open_transport(&p).unwrap();
    let started = store
        .begin_replay(&[records[0].id.clone()], "test", 0)
        .await
        .unwrap();
    transport2
        .enqueue_to(
            "orders",
            started.iter().map(|d| d.replay_message()).collect(),
        )
        .await
        .unwrap();
    exporter.reset();
    drain(&p, &telemetry).await;
    let spans = exporter.get_finished_spans().unwrap();
    let replayed = one(&spans, "process PlaceOrder", Some("orders"));
    assert_ne!(
        replayed.span_context.trace_id(),
        poison_span.span_context.trace_id(),
        "a new trace"
    );
    assert_eq!(replayed.links.len(), 1);
    assert_eq!(
        replayed.links[0].span_context.span_id(),
        poison_span.span_context.span_id()
    );
    assert_eq!(
        attr(replayed, "switchyard.replay_of").as_deref(),
        Some(records[0].id.as_str())
    );
}

fn header<'a>(m: &'a Envelope, name: &str) -> &'a str {
    m.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_carry_exactly_one_traceparent_and_baggage_travels() {
    let dir = tempfile::tempdir().unwrap();
    let p = config::load(&write_pipeline(dir.path(), "orders", ORDERS))
        .unwrap()
        .pipeline;
    let exporter = InMemorySpanExporter::default();
    let telemetry = Telemetry::with_span_exporter(exporter.clone());
    // A message that already carries a (stale) traceparent twice and baggage.
    let mut m = order("B-1", 100);
    m.headers.push((
        "traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    ));
    m.headers.push(("baggage".into(), "tenant=acme".into()));
    runtime::open_transport(&p)
        .unwrap()
        .enqueue(vec![m])
        .await
        .unwrap();
    drain(&p, &telemetry).await;
    let spans = exporter.get_finished_spans().unwrap();
    let place = one(&spans, "process PlaceOrder", Some("orders"));
    assert_eq!(
        place.span_context.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(place.parent_span_id.to_string(), "00f067aa0ba902b7");
    // Every hop of the flow stays in that trace.
    assert!(
        spans
            .iter()
            .all(|s| s.span_context.trace_id() == place.span_context.trace_id())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_traceparent_starts_a_new_trace_and_the_message_is_handled() {
    let dir = tempfile::tempdir().unwrap();
    let p = config::load(&write_pipeline(dir.path(), "orders", ORDERS))
        .unwrap()
        .pipeline;
    let exporter = InMemorySpanExporter::default();
    let telemetry = Telemetry::with_span_exporter(exporter.clone());
    let mut m = order("M-1", 100);
    m.headers
        .push(("traceparent".into(), "00-not-a-trace-01".into()));
    runtime::open_transport(&p)
        .unwrap()
        .enqueue(vec![m])
        .await
        .unwrap();
    drain(&p, &telemetry).await;
    let spans = exporter.get_finished_spans().unwrap();
    let place = one(&spans, "process PlaceOrder", Some("orders"));
    assert!(place.span_context.is_valid());
    assert_eq!(
        place.parent_span_id,
        opentelemetry::trace::SpanId::INVALID,
        "a root span"
    );
    assert!(
        dlq::open(&p.dead_letters, &p.name)
            .await
            .unwrap()
            .list(&Filter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

type Names = Arc<Mutex<Vec<String>>>;

/// A minimal OTLP/HTTP receiver: decodes trace and metric export requests
/// and keeps the span names and metric names.
async fn otlp_receiver() -> (SocketAddr, Names, Names) {
    use axum::body::Bytes;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let spans: Names = Arc::default();
    let metrics: Names = Arc::default();
    let (span_sink, metric_sink) = (spans.clone(), metrics.clone());
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let sink = span_sink.clone();
                async move {
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                    let mut names = sink.lock().unwrap();
                    for rs in request.resource_spans {
                        for ss in rs.scope_spans {
                            names.extend(ss.spans.into_iter().map(|s| s.name));
                        }
                    }
                    ""
                }
            }),
        )
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: Bytes| {
                let sink = metric_sink.clone();
                async move {
                    let request =
                        ExportMetricsServiceRequest::decode(body).expect("an OTLP metric export");
                    let mut names = sink.lock().unwrap();
                    for rm in request.resource_metrics {
                        for sm in rm.scope_metrics {
                            names.extend(sm.metrics.into_iter().map(|m| m.name));
                        }
                    }
                    ""
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, spans, metrics)
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_and_metrics_are_exported_over_otlp_to_a_real_receiver() {
    let (addr, received, metrics) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let p = config::load(&write_pipeline(dir.path(), "orders", ORDERS))
        .unwrap()
        .pipeline;
    let settings = Resolved {
        traces: TraceExport::Otlp,
        metrics_otlp: true,
        endpoint: Some(format!("http://{addr}")),
        service_name: "switchyard-test".into(),
        sampling: switchyard::telemetry::Sampling {
            parent_based: true,
            ratio: 1.0,
        },
        metrics_interval: Duration::from_secs(10),
    };
    let telemetry = tokio::task::spawn_blocking(move || Telemetry::start(&settings))
        .await
        .unwrap()
        .unwrap();
    runtime::open_transport(&p)
        .unwrap()
        .enqueue(vec![order("O-1", 100)])
        .await
        .unwrap();
    drain(&p, &telemetry).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    let names = received.lock().unwrap().clone();
    for expected in [
        "process PlaceOrder",
        "send OrderPlaced",
        "process PaymentCaptured",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not received: {names:?}"
        );
    }
    // The metric reader flushes on shutdown.
    let metric_names = metrics.lock().unwrap().clone();
    for expected in ["switchyard.messages.handled", "switchyard.handler.duration"] {
        assert!(
            metric_names.iter().any(|n| n == expected),
            "{expected} not received: {metric_names:?}"
        );
    }
}

/// An admin listener on a free port serving `telemetry`'s metrics.
async fn serve_metrics(telemetry: &Telemetry) -> SocketAddr {
    let admin = switchyard::admin::Admin::bind("127.0.0.1:0".parse().unwrap(), telemetry.clone())
        .await
        .unwrap();
    let addr = admin.local_addr().unwrap();
    tokio::spawn(admin.serve(std::future::pending()));
    addr
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_as_messages_succeed_retry_and_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let p = config::load(&write_pipeline(dir.path(), "orders", ORDERS))
        .unwrap()
        .pipeline;
    let telemetry = Telemetry::off();
    let addr = serve_metrics(&telemetry).await;

    let before = scrape(addr);
    assert_eq!(
        value(
            &before,
            r#"switchyard_messages_handled_total{message_type="PlaceOrder",plugin="orders",plugin_version="1.0.0"}"#
        ),
        0.0
    );

    let transport = runtime::open_transport(&p).unwrap();
    transport
        .enqueue(vec![
            order("G-1", 100),
            order("F-1", 4513),
            message(Kind::Command, "PlaceOrder", json!({"order_id": 1})),
        ])
        .await
        .unwrap();
    drain(&p, &telemetry).await;

    let m = scrape(addr);
    let series: HashMap<&str, f64> = [
        r#"switchyard_messages_handled_total{message_type="PlaceOrder",plugin="orders",plugin_version="1.0.0"}"#,
        r#"switchyard_messages_handled_total{message_type="ChargePayment",plugin="payments",plugin_version="1.0.0"}"#,
        r#"switchyard_messages_handled_total{message_type="OrderPlaced",plugin="inventory",plugin_version="1.0.0"}"#,
        r#"switchyard_messages_failed_total{error_type="transient",message_type="ChargePayment",plugin="payments",plugin_version="1.0.0"}"#,
        r#"switchyard_messages_retried_total{message_type="ChargePayment",plugin="payments",plugin_version="1.0.0",retry="now"}"#,
        r#"switchyard_messages_retried_total{message_type="ChargePayment",plugin="payments",plugin_version="1.0.0",retry="later"}"#,
        r#"switchyard_messages_dead_lettered_total{error_type="permanent",message_type="PlaceOrder",plugin="orders",plugin_version="1.0.0"}"#,
        r#"switchyard_dead_letters{status="dead"}"#,
        r#"switchyard_handler_duration_seconds_count{message_type="PlaceOrder",plugin="orders",plugin_version="1.0.0"}"#,
        r#"switchyard_message_latency_seconds_count{message_type="PaymentCaptured",plugin="notifications",plugin_version="1.0.0"}"#,
        r#"switchyard_messages_in_flight{plugin="orders"}"#,
    ]
    .into_iter()
    .map(|s| (s, value(&m, s)))
    .collect();
    let v = |s: &str| series[s];
    assert_eq!(
        v(
            r#"switchyard_messages_handled_total{message_type="PlaceOrder",plugin="orders",plugin_version="1.0.0"}"#
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        v(
            r#"switchyard_messages_handled_total{message_type="ChargePayment",plugin="payments",plugin_version="1.0.0"}"#
        ),
        2.0
    );
    assert_eq!(
        v(
            r#"switchyard_messages_handled_total{message_type="OrderPlaced",plugin="inventory",plugin_version="1.0.0"}"#
        ),
        2.0
    );
    assert_eq!(
        v(
            r#"switchyard_messages_failed_total{error_type="transient",message_type="ChargePayment",plugin="payments",plugin_version="1.0.0"}"#
        ),
        2.0
    );
    assert_eq!(
        v(
            r#"switchyard_messages_retried_total{message_type="ChargePayment",plugin="payments",plugin_version="1.0.0",retry="now"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"switchyard_messages_retried_total{message_type="ChargePayment",plugin="payments",plugin_version="1.0.0",retry="later"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"switchyard_messages_dead_lettered_total{error_type="permanent",message_type="PlaceOrder",plugin="orders",plugin_version="1.0.0"}"#
        ),
        1.0
    );
    assert_eq!(v(r#"switchyard_dead_letters{status="dead"}"#), 1.0, "{m}");
    assert_eq!(
        v(
            r#"switchyard_handler_duration_seconds_count{message_type="PlaceOrder",plugin="orders",plugin_version="1.0.0"}"#
        ),
        3.0
    );
    assert_eq!(
        v(
            r#"switchyard_message_latency_seconds_count{message_type="PaymentCaptured",plugin="notifications",plugin_version="1.0.0"}"#
        ),
        2.0
    );
    assert_eq!(
        v(r#"switchyard_messages_in_flight{plugin="orders"}"#),
        0.0,
        "all settled"
    );
    assert!(m.contains("# TYPE switchyard_handler_duration_seconds histogram"));
}

/// The saga metrics of a running host: instances started, completed, the
/// timeouts that fired, messages without an instance, and the active
/// instances the store counts.
#[tokio::test(flavor = "multi_thread")]
async fn saga_metrics_count_instances_and_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"
[host]
cache_dir = "{cache}"
[plugins.ledger]
wasm = "{dist}/ledger.wasm"
events = ["Open", "Add", "Close", "Remind", "Expire"]
[plugins.ledger.saga]
starts = ["Open"]
instance_key = "$.id"
[plugins.bank]
wasm = "{dist}/bank.wasm"
commands = ["Debit"]
"#;
    let p = config::load(&write_pipeline(dir.path(), "sagas", body))
        .unwrap()
        .pipeline;
    let telemetry = Telemetry::off();
    let addr = serve_metrics(&telemetry).await;

    let transport = runtime::open_transport(&p).unwrap();
    transport
        .enqueue(vec![
            message(Kind::Event, "Open", json!({"id": "L-1"})),
            message(Kind::Event, "Open", json!({"id": "L-2"})),
            message(Kind::Event, "Open", json!({"id": "L-3"})),
            message(Kind::Event, "Close", json!({"id": "L-3"})),
            // Due at once: fires while the host drains.
            message(Kind::Event, "Remind", json!({"id": "L-1", "after_ms": 0})),
            // No such instance: ignored, and counted.
            message(Kind::Event, "Add", json!({"id": "L-9", "n": 1})),
        ])
        .await
        .unwrap();
    drain(&p, &telemetry).await;

    let m = scrape(addr);
    let v = |s: &str| value(&m, s);
    assert_eq!(
        v(r#"switchyard_saga_started_total{plugin="ledger"}"#),
        3.0,
        "{m}"
    );
    assert_eq!(
        v(r#"switchyard_saga_completed_total{plugin="ledger"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        v(r#"switchyard_saga_timed_out_total{plugin="ledger"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(v(r#"switchyard_saga_active{plugin="ledger"}"#), 2.0, "{m}");
    assert_eq!(
        v(r#"switchyard_saga_not_found_total{plugin="ledger"}"#),
        1.0,
        "{m}"
    );
}
