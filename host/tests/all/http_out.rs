//! Outbound HTTP from plugins (`wasi:http`), against real local HTTP
//! servers: what the grant allows is sent, anything else refused before a
//! connection; a silent server is cut at the message's deadline and the
//! route goes on; an oversized body is refused; TLS is checked against the
//! roots the grant trusts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::config::{Grants, Limits, Origin};
use switchyard::dispatch::Worker;
use switchyard::envelope::Kind;
use switchyard::plugin::{FailureKind, Output};
use switchyard::recover::RetryPolicy;

use crate::common::{load_with, message};

/// What the server does with one request (its head and body).
enum Answer {
    /// Writes these bytes, then closes.
    Bytes(Vec<u8>),
    /// Never answers (keeps the connection open).
    Silence,
}

/// The requests a server received: each one's head and body.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A local HTTP/1.1 server, plain or TLS, answering every request with
/// `answer`; it remembers each request's head and body.
struct Server {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Received,
}

fn read_request(stream: &mut impl Read) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some((head, read_chunked(stream)?));
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// A chunked body: hex size lines, each chunk, up to the empty one.
fn read_chunked(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            line.push(byte[0]);
        }
        let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).ok()?;
        let mut chunk = vec![0; size + 2];
        stream.read_exact(&mut chunk).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

impl Server {
    fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        answer: impl Fn(&str, &[u8]) -> Answer + Send + Sync + 'static,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        {
            let (connections, requests) = (connections.clone(), requests.clone());
            std::thread::spawn(move || {
                for tcp in listener.incoming() {
                    let Ok(tcp) = tcp else { return };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (tls, requests, answer) = (tls.clone(), requests.clone(), answer.clone());
                    std::thread::spawn(move || match tls {
                        Some(config) => {
                            let conn = rustls::ServerConnection::new(config).unwrap();
                            let mut stream = rustls::StreamOwned::new(conn, tcp);
                            serve(&mut stream, &requests, &*answer);
                        }
                        None => {
                            let mut tcp = tcp;
                            serve(&mut tcp, &requests, &*answer);
                        }
                    });
                }
            });
        }
        Server {
            addr,
            connections,
            requests,
        }
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }
}

fn serve(
    stream: &mut (impl Read + Write),
    requests: &Mutex<Vec<(String, Vec<u8>)>>,
    answer: &(dyn Fn(&str, &[u8]) -> Answer + Send + Sync),
) {
    let Some((head, body)) = read_request(stream) else {
        return;
    };
    let said = answer(&head, &body);
    requests.lock().unwrap().push((head, body));
    match said {
        Answer::Bytes(bytes) => {
            let _ = stream.write_all(&bytes);
            let _ = stream.flush();
        }
        Answer::Silence => std::thread::sleep(Duration::from_secs(30)),
    }
}

fn ok(body: &str) -> Answer {
    Answer::Bytes(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn grant(origins: &[String]) -> Grants {
    Grants {
        http: origins.iter().map(|o| Origin::parse(o).unwrap()).collect(),
        ..Grants::default()
    }
}

fn limits(timeout: Duration) -> Limits {
    Limits {
        timeout,
        ..Limits::default()
    }
}

fn call(url: &str) -> switchyard::envelope::Envelope {
    message(Kind::Command, "Call", serde_json::json!({ "url": url }))
}

fn reply(outputs: &[Output]) -> serde_json::Value {
    match outputs {
        [Output::Reply(r)] => serde_json::from_slice(&r.payload).unwrap(),
        other => panic!("expected one reply, got {other:?}"),
    }
}

#[test]
fn a_granted_origin_is_called_and_its_answer_replied() {
    let server = Server::start(None, |_, body| ok(&format!("got {}", body.len())));
    let caller = load_with(
        "caller",
        limits(Duration::from_secs(5)),
        grant(&[server.url("http", "")]),
    );
    let mut worker = Worker::new(caller, RetryPolicy::default());
    let mut post = message(
        Kind::Command,
        "Call",
        serde_json::json!({ "method": "POST", "url": server.url("http", "/charges?x=1"), "body": "x".repeat(10_000) }),
    );
    let answer = reply(&worker.handle(&mut post).unwrap().unwrap());
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["body"], "got 10000");
    // A URL with a query and no path is sent as `/?query`.
    let bare = reply(
        &worker
            .handle(&mut call(&format!("http://{}?q=1", server.addr)))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(bare["status"], 200);
    let requests = server.requests.lock().unwrap();
    let (head, body) = &requests[0];
    assert!(head.starts_with("POST /charges?x=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: {}", server.addr)),
        "{head}"
    );
    assert_eq!(body.len(), 10_000);
    assert!(
        requests[1].0.starts_with("GET /?q=1 HTTP/1.1\r\n"),
        "{}",
        requests[1].0
    );
}

#[test]
fn an_origin_outside_the_grant_is_refused_before_any_connection() {
    let server = Server::start(None, |_, _| ok("should not be reached"));
    let other = Server::start(None, |_, _| ok("granted"));
    // Granted: the other server's port only, and https on this one's.
    let caller = load_with(
        "caller",
        limits(Duration::from_secs(5)),
        grant(&[other.url("http", ""), server.url("https", "")]),
    );
    let mut worker = Worker::new(caller, RetryPolicy::default());
    for url in [
        server.url("http", "/"),
        format!("http://localhost:{}/", server.addr.port()),
        format!("http://127.0.0.1.nip.io:{}/", server.addr.port()),
    ] {
        let failure = worker.handle(&mut call(&url)).unwrap().unwrap_err();
        assert_eq!(failure.kind, FailureKind::Permanent, "{url}: {failure}");
        assert_eq!(failure.code.as_deref(), Some("http-denied"), "{failure}");
        assert!(failure.message.contains("refused by the host"), "{failure}");
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);
    // The granted one still works on the same instance.
    let answer = reply(
        &worker
            .handle(&mut call(&other.url("http", "/")))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(answer["body"], "granted");

    // No grant at all: nothing is reachable.
    let bare = load_with("caller", limits(Duration::from_secs(5)), Grants::default());
    let failure = Worker::new(bare, RetryPolicy::default())
        .handle(&mut call(&other.url("http", "/")))
        .unwrap()
        .unwrap_err();
    assert_eq!(failure.code.as_deref(), Some("http-denied"), "{failure}");
    assert_eq!(other.connections.load(Ordering::SeqCst), 1);
}

/// A plugin in JavaScript calls out with the web's `fetch`, which
/// ComponentizeJS implements over `wasi:http`: the grant applies to it as
/// to any other.
#[test]
fn a_javascript_plugin_calls_out_with_fetch_within_its_grant() {
    let server = Server::start(None, |_, body| {
        ok(&format!("got {}", String::from_utf8_lossy(body)))
    });
    let other = Server::start(None, |_, _| ok("should not be reached"));
    // A granted origin where nothing listens.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let fetcher = load_with(
        "fetcher",
        limits(Duration::from_secs(10)),
        grant(&[server.url("http", ""), closed.clone()]),
    );
    let mut worker = Worker::new(fetcher, RetryPolicy::default());
    let mut post = message(
        Kind::Command,
        "Fetch",
        serde_json::json!({ "method": "POST", "url": server.url("http", "/score"), "body": r#"{"order_id":"A-1"}"# }),
    );
    let answer = reply(&worker.handle(&mut post).unwrap().unwrap());
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["body"], r#"got {"order_id":"A-1"}"#);
    let requests = server.requests.lock().unwrap();
    assert!(
        requests[0].0.starts_with("POST /score HTTP/1.1"),
        "{}",
        requests[0].0
    );
    drop(requests);

    // Refused, or not connected: the promise rejects (the engine is not
    // left writing a body nobody reads, which it cannot take).
    for url in [other.url("http", "/"), format!("{closed}/score")] {
        for body in [None, Some("x".repeat(100_000))] {
            let mut failed = message(
                Kind::Command,
                "Fetch",
                serde_json::json!({ "method": "POST", "url": url, "body": body }),
            );
            let failure = worker.handle(&mut failed).unwrap().unwrap_err();
            assert_eq!(
                failure.code.as_deref(),
                Some("fetch-failed"),
                "{url}: {failure}"
            );
        }
    }
    assert_eq!(other.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn a_silent_server_is_cut_at_the_deadline_and_the_route_goes_on() {
    let silent = Server::start(None, |_, _| Answer::Silence);
    let fine = Server::start(None, |_, _| ok("fine"));
    let caller = load_with(
        "caller",
        limits(Duration::from_millis(500)),
        grant(&[silent.url("http", ""), fine.url("http", "")]),
    );
    let mut worker = Worker::new(caller, RetryPolicy::default());
    let started = Instant::now();
    let failure = worker
        .handle(&mut call(&silent.url("http", "/")))
        .unwrap()
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(failure.kind, FailureKind::Timeout | FailureKind::Transient),
        "{failure}"
    );
    assert!(
        took < Duration::from_secs(3),
        "the wait outlived the 500 ms deadline: {took:?}"
    );
    let answer = reply(
        &worker
            .handle(&mut call(&fine.url("http", "/")))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(answer["body"], "fine");
}

#[test]
fn a_body_over_the_cap_is_refused_whether_its_length_is_told_or_not() {
    let told = Server::start(None, |_, _| ok(&"x".repeat(2000)));
    // Chunked: the size shows only as the body arrives.
    let chunked = Server::start(None, |_, _| {
        let mut bytes =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
        for _ in 0..4 {
            bytes.extend_from_slice(format!("{:x}\r\n{}\r\n", 600, "y".repeat(600)).as_bytes());
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        Answer::Bytes(bytes)
    });
    let mut grants = grant(&[told.url("http", ""), chunked.url("http", "")]);
    grants.http_max_response = 1000;
    let caller = load_with("caller", limits(Duration::from_secs(5)), grants);
    let mut worker = Worker::new(caller, RetryPolicy::default());
    for server in [&told, &chunked] {
        let failure = worker
            .handle(&mut call(&server.url("http", "/")))
            .unwrap()
            .unwrap_err();
        assert_eq!(failure.kind, FailureKind::Transient, "{failure}");
        assert_eq!(failure.code.as_deref(), Some("http-too-large"), "{failure}");
    }
    // At the cap exactly it is read whole.
    let exact = Server::start(None, |_, _| ok(&"z".repeat(1000)));
    let mut grants = grant(&[exact.url("http", "")]);
    grants.http_max_response = 1000;
    let caller = load_with("caller", limits(Duration::from_secs(5)), grants);
    let answer = reply(
        &Worker::new(caller, RetryPolicy::default())
            .handle(&mut call(&exact.url("http", "/")))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(answer["length"], 1000);

    // A HEAD response announces a length it has no body for: not refused.
    let head = Server::start(None, |_, _| {
        Answer::Bytes(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2000000000\r\nconnection: close\r\n\r\n".to_vec(),
        )
    });
    let mut grants = grant(&[head.url("http", "")]);
    grants.http_max_response = 1000;
    let caller = load_with("caller", limits(Duration::from_secs(5)), grants);
    let mut ask = message(
        Kind::Command,
        "Call",
        serde_json::json!({ "method": "HEAD", "url": head.url("http", "/big.iso") }),
    );
    let answer = reply(
        &Worker::new(caller, RetryPolicy::default())
            .handle(&mut ask)
            .unwrap()
            .unwrap(),
    );
    assert_eq!(
        (answer["status"].as_u64(), answer["length"].as_u64()),
        (Some(200), Some(0))
    );
}

/// A CA and a server certificate for 127.0.0.1 and localhost it signed.
fn test_ca() -> (String, Arc<rustls::ServerConfig>) {
    let certs = crate::common::test_certificates();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![certs.cert_der.into()],
        rustls::pki_types::PrivateKeyDer::try_from(certs.key_der).unwrap(),
    )
    .unwrap();
    (certs.ca_pem, Arc::new(config))
}

#[test]
fn https_is_checked_against_the_roots_the_grant_trusts() {
    let (ca_pem, config) = test_ca();
    let server = Server::start(Some(config), |_, _| ok("secret"));
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("ca.pem");
    std::fs::write(&roots, ca_pem).unwrap();

    let mut trusting = grant(&[server.url("https", "")]);
    trusting.http_roots = Some(roots);
    let caller = load_with("caller", limits(Duration::from_secs(5)), trusting);
    let answer = reply(
        &Worker::new(caller, RetryPolicy::default())
            .handle(&mut call(&server.url("https", "/")))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(answer["body"], "secret");

    // The same server with only the built-in roots: not trusted.
    let caller = load_with(
        "caller",
        limits(Duration::from_secs(5)),
        grant(&[server.url("https", "")]),
    );
    let failure = Worker::new(caller, RetryPolicy::default())
        .handle(&mut call(&server.url("https", "/")))
        .unwrap()
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::Transient, "{failure}");
    assert_eq!(failure.code.as_deref(), Some("http-tls"), "{failure}");
}

#[test]
fn a_roots_file_that_is_not_pem_stops_the_load_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, "not a certificate").unwrap();
    let mut grants = grant(&["https://api.example.com".to_owned()]);
    grants.http_roots = Some(roots);
    let err = crate::common::engine()
        .load(
            &crate::common::wasm("caller"),
            crate::common::sandbox("caller", Limits::default(), grants),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("roots.pem") && err.contains("http_roots"),
        "{err}"
    );
}

/// The example's payments plugin in a running pipeline, charging through a
/// real (local) gateway: a charge goes through keyed by its message id, a
/// gateway timeout is retried under the same key, and a declined card is
/// dead-lettered for good with the gateway's reason.
#[tokio::test(flavor = "multi_thread")]
async fn payments_charge_through_a_gateway_and_a_declined_card_is_a_dead_letter() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let gateway = {
        let seen = seen.clone();
        Server::start(None, move |head, body| {
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("idempotency-key: "))
                .unwrap_or_default()
                .to_owned();
            let charge: serde_json::Value = serde_json::from_slice(body).unwrap();
            let mut seen = seen.lock().unwrap();
            seen.push(key.clone());
            let tries = seen.iter().filter(|k| **k == key).count();
            if charge["customer"] == "mallory" {
                Answer::Bytes(b"HTTP/1.1 402 Payment Required\r\ncontent-length: 18\r\nconnection: close\r\n\r\ninsufficient funds".to_vec())
            } else if charge["amount_cents"].as_u64().unwrap() % 100 == 13 && tries <= 2 {
                Answer::Bytes(b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec())
            } else {
                ok(r#"{"charge":"ch_1"}"#)
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let path = crate::common::write_pipeline(
        dir.path(),
        "pay",
        &format!(
            r#"
[plugins.payments]
wasm = "{{dist}}/payments.wasm"
commands = ["ChargePayment", "RefundPayment"]
retry = {{ immediate = 2, delayed = 0 }}
[plugins.payments.grants]
env = {{ GATEWAY_URL = "{}" }}
http = ["{}"]
"#,
            gateway.url("http", ""),
            gateway.url("http", "")
        ),
    );
    let p = switchyard::testing::TestPipeline::start(&path)
        .await
        .unwrap();
    let charge = |order: &str, customer: &str, cents: u64| serde_json::json!({ "order_id": order, "customer": customer, "amount_cents": cents });
    let flaky = p
        .send("ChargePayment", charge("A-1", "ada", 4513))
        .await
        .unwrap();
    p.published("PaymentCaptured", serde_json::json!({ "order_id": "A-1" }))
        .await
        .unwrap();
    let declined = p
        .send("ChargePayment", charge("A-2", "mallory", 1200))
        .await
        .unwrap();
    let record = p.dead_letter(&declined).await.unwrap();
    p.stop().await.unwrap();
    assert_eq!(record.error.kind, "permanent");
    assert_eq!(record.error.code.as_deref(), Some("card-declined"));
    assert!(
        record.error.message.contains("insufficient funds"),
        "{}",
        record.error.message
    );
    // Three tries of A-1 under its message id (two timeouts, then the
    // charge), and one of A-2: a permanent failure is not retried.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.iter().filter(|k| **k == flaky).count(), 3, "{seen:?}");
    assert_eq!(
        seen.iter().filter(|k| **k == declined).count(),
        1,
        "{seen:?}"
    );
}

/// The caller plugin behind an ingress, on the pipeline `pipeline` writes:
/// a `Call` to the granted server is answered with what the server said,
/// and a `Call` to a server outside the grant is dead-lettered as
/// `http-denied` without a connection to it. Gives the pipeline, for the
/// broker's clean-up.
pub async fn a_plugin_calls_out_on(
    pipeline: fn(&std::path::Path, &str) -> (std::path::PathBuf, switchyard::config::Pipeline),
) -> switchyard::config::Pipeline {
    let granted = Server::start(None, |_, body| ok(&format!("got {}", body.len())));
    let other = Server::start(None, |_, _| ok("should not be asked"));
    let dir = tempfile::tempdir().unwrap();
    let listen = crate::ingress::free_addr();
    let (path, p) = pipeline(
        dir.path(),
        &format!(
            "[ingress]\nlisten = \"{listen}\"\n[plugins.caller]\nwasm = \"{{dist}}/caller.wasm\"\ncommands = [\"Call\"]\n[plugins.caller.grants]\nhttp = [\"{}\"]\n",
            granted.url("http", "")
        ),
    );
    let host = tokio::task::spawn_blocking({
        let path = path.clone();
        move || crate::ingress::run(&path, listen, None)
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let call = |url: String, prefer: &'static str| {
        client
            .post(format!("http://{listen}/commands/Call"))
            .header("content-type", "application/json")
            .header("prefer", prefer)
            .body(serde_json::json!({ "method": "POST", "url": url, "body": "abc" }).to_string())
            .send()
    };
    let answered = call(granted.url("http", "/charges"), "wait=60")
        .await
        .unwrap();
    let status = answered.status().as_u16();
    let answer: serde_json::Value = serde_json::from_str(&answered.text().await.unwrap()).unwrap();
    let refused = call(other.url("http", "/charges"), "respond-async")
        .await
        .unwrap();
    let refused_status = refused.status().as_u16();
    let refused: serde_json::Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    let refused_id = refused["id"].as_str().unwrap().to_owned();
    // The refusal is permanent: dead-lettered on its first attempt.
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        let found = crate::common::dead_letters(&p)
            .await
            .into_iter()
            .find(|d| d.message.id == refused_id);
        if let Some(d) = found {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "the refused call was never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::task::spawn_blocking(move || crate::common::stop(host))
        .await
        .unwrap();
    assert_eq!(
        (status, &answer["status"], &answer["body"]),
        (200, &serde_json::json!(200), &serde_json::json!("got 3"))
    );
    assert_eq!(refused_status, 202);
    assert_eq!(record.error.code.as_deref(), Some("http-denied"));
    assert_eq!(record.error.kind, "permanent");
    assert_eq!(other.connections.load(Ordering::SeqCst), 0);
    assert!(
        granted.requests.lock().unwrap()[0]
            .0
            .starts_with("POST /charges HTTP/1.1\r\n"),
        "{:?}",
        granted.requests.lock().unwrap()
    );
    p
}

/// On RabbitMQ: outbound HTTP is the same, the command and its reply go
/// through the broker.
#[tokio::test(flavor = "multi_thread")]
async fn on_rabbitmq_a_plugin_calls_out_within_its_grant() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let p = a_plugin_calls_out_on(crate::amqp::pipeline).await;
    crate::amqp::clean_up(&p).await;
}

/// On Kafka: the same, the command and its reply go through the cluster.
#[tokio::test(flavor = "multi_thread")]
async fn on_kafka_a_plugin_calls_out_within_its_grant() {
    a_plugin_calls_out_on(crate::kafka::pipeline).await;
}

/// The Python and JavaScript examples call their services over the
/// network from a running pipeline: notices (componentize-py, the
/// `wasi:http` bindings) hands a notice to its mail service under the
/// message's id, and fraud (ComponentizeJS, `fetch`) holds an order its
/// risk service scores high; a mail service that answers 503 is retried.
#[tokio::test(flavor = "multi_thread")]
async fn the_python_and_javascript_examples_call_their_services() {
    let mail_calls = Arc::new(AtomicUsize::new(0));
    let server = {
        let mail_calls = mail_calls.clone();
        Server::start(None, move |head, body| {
            let body: serde_json::Value = serde_json::from_slice(body).unwrap();
            if head.starts_with("POST /scores ") {
                let score = if body["customer"] == "eve" { 95 } else { 5 };
                ok(&format!(r#"{{"score":{score}}}"#))
            } else if head.starts_with("POST /messages ")
                && mail_calls.fetch_add(1, Ordering::SeqCst) == 0
            {
                Answer::Bytes(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy".to_vec())
            } else {
                ok(r#"{"id":"mail-1"}"#)
            }
        })
    };
    let url = server.url("http", "");
    let dir = tempfile::tempdir().unwrap();
    let path = crate::common::write_pipeline(
        dir.path(),
        "services",
        &format!(
            r#"
[plugins.fraud]
wasm = "{{dist}}/fraud.wasm"
events = ["OrderPlaced"]
memory = "64 MiB"
timeout = "10s"
[plugins.fraud.grants]
env = {{ RISK_URL = "{url}" }}
http = ["{url}"]

[plugins.receipts]
wasm = "{{dist}}/receipts.wasm"
commands = ["SignReceipt"]

[plugins.notices]
wasm = "{{dist}}/notices.wasm"
events = ["ReceiptSigned"]
commands = ["NotifyCustomer"]
memory = "64 MiB"
timeout = "10s"
retry = {{ immediate = 2, delayed = 0 }}
[plugins.notices.grants]
env = {{ MAIL_API_URL = "{url}" }}
http = ["{url}"]
"#
        ),
    );
    let p = switchyard::testing::TestPipeline::start(&path)
        .await
        .unwrap();
    p.publish(
        "OrderPlaced",
        serde_json::json!({ "order_id": "R-1", "customer": "eve", "total_cents": 2400, "items": [] }),
    )
    .await
    .unwrap();
    // Held by its score, the order's customer is told, through the mail
    // service (the first try answered 503, the retry taken).
    let screened = p
        .published("OrderScreened", serde_json::json!({ "order_id": "R-1" }))
        .await
        .unwrap();
    let told = p
        .published("CustomerNotified", serde_json::json!({ "order_id": "R-1" }))
        .await
        .unwrap();
    p.stop().await.unwrap();
    let screened: serde_json::Value = serde_json::from_slice(&screened.payload).unwrap();
    assert_eq!(screened["verdict"], "review");
    assert_eq!(screened["reasons"], serde_json::json!(["risk score 95"]));
    let told: serde_json::Value = serde_json::from_slice(&told.payload).unwrap();
    assert_eq!(told["customer"], "eve");
    let requests = server.requests.lock().unwrap();
    let mails: Vec<_> = requests
        .iter()
        .filter(|(head, _)| head.starts_with("POST /messages "))
        .collect();
    assert_eq!(mails.len(), 2, "{requests:?}");
    // Both tries under the same key: the message's id.
    let key = |head: &str| {
        head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("idempotency-key: ")
                .map(str::to_owned)
        })
    };
    assert!(key(&mails[0].0).is_some(), "{}", mails[0].0);
    assert_eq!(key(&mails[0].0), key(&mails[1].0));
    let mail: serde_json::Value = serde_json::from_slice(&mails[1].1).unwrap();
    assert_eq!(mail["to"], "eve");
    assert_eq!(mail["text"], "order R-1 is on hold: risk score 95");
}
