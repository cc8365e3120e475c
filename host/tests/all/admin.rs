//! The admin listener guards itself: tokens before bodies, headers within a
//! deadline, a cap on connections.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use switchyard::config;
use switchyard::runtime::{RunMode, RunOptions};
use switchyard::telemetry::Telemetry;

use crate::common::{Running, write_pipeline};

/// Starts an admin listener with no pipeline behind it.
async fn listener(header_timeout: Duration) -> SocketAddr {
    let admin = switchyard::admin::Admin::bind("127.0.0.1:0".parse().unwrap(), Telemetry::off())
        .await
        .unwrap()
        .with_header_timeout(header_timeout);
    let addr = admin.local_addr().unwrap();
    tokio::spawn(admin.serve(std::future::pending()));
    addr
}

/// Runs the pipeline at `path` in this process with its admin listener on
/// a free port, and changes allowed with `token` if there is one.
async fn with_admin(path: &std::path::Path, token: Option<&str>) -> (Running, SocketAddr) {
    let p = config::load(path).unwrap().pipeline;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let host = Running::start(
        &p,
        RunOptions {
            admin: Some(addr),
            admin_token: token.map(Into::into),
            ..RunOptions::quiet(RunMode::Serve)
        },
    )
    .await;
    (host, addr)
}

/// What the server sends until it closes, or until `limit`.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&out).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthorized_upload_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let path = write_pipeline(
        dir.path(),
        "admin",
        r#"
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let (host, addr) = with_admin(&path, Some("s3cret-token")).await;
    // 200 MB announced, none of it sent: a server that read the body before
    // the token would wait for it and never answer.
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(
            b"PUT /plugins/tally HTTP/1.1\r\nHost: admin\r\nContent-Length: 200000000\r\n\r\n",
        )
        .unwrap();
        let started = Instant::now();
        let (text, _) = read_until_closed(&mut s, Duration::from_secs(5));
        (text, started.elapsed())
    })
    .await
    .unwrap();
    assert!(answer.0.starts_with("HTTP/1.1 401"), "{answer:?}");
    assert!(answer.1 < Duration::from_secs(5), "{answer:?}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let addr = listener(Duration::from_millis(300)).await;
    let (text, closed) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: adm").unwrap();
        read_until_closed(&mut s, Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert!(closed, "the connection was closed: {text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_are_closed_and_the_listener_keeps_serving() {
    let addr = listener(Duration::from_secs(30)).await;
    tokio::task::spawn_blocking(move || {
        // Idle connections up to the limit, each holding its place.
        let idle: Vec<TcpStream> = (0..switchyard::admin::MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Give the listener time to take them all in.
        std::thread::sleep(Duration::from_millis(300));
        let mut extra = TcpStream::connect(addr).unwrap();
        let (_, closed) = read_until_closed(&mut extra, Duration::from_secs(3));
        assert!(closed, "a connection past the limit is closed at once");
        drop(idle);
        // Places free again: a scrape gets its answer.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
                .unwrap();
            let (text, _) = read_until_closed(&mut s, Duration::from_secs(2));
            if text.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no answer after the idle ones left"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
}

/// A TCP forwarder to PostgreSQL that can be cut (its connections closed,
/// new ones closed on arrival) and restored, for a store that goes away.
struct Forwarder {
    addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

async fn forwarder(upstream: String) -> Forwarder {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            if *cut_rx.borrow() {
                continue;
            }
            let mut cut_rx = cut_rx.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cut_rx.wait_for(|c| *c) => {}
                }
            });
        }
    });
    Forwarder { addr, cut }
}

/// The status and body of `GET path`.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let (text, _) = read_until_closed(&mut s, Duration::from_secs(10));
        let status = text
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

/// Asks `path` until `want` holds of its answer, for up to 15 s.
async fn until(addr: SocketAddr, path: &str, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(addr, path).await;
        if want(status, &body) || Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_stores_and_turns_unready_while_draining() {
    let url = crate::dead_letters::postgres_url();
    // postgres://user@HOST:PORT/db: the forwarder stands in for HOST:PORT.
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let (upstream, db) = rest.split_once('/').unwrap();
    let proxy = forwarder(upstream.to_owned()).await;
    let scratch = crate::dead_letters::Scratch::new();
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "ready",
        &format!(
            r#"
        [dead_letters]
        url = "{scheme_user}@{addr}/{db}"
        schema = "{schema}"
        [plugins.rogue]
        wasm = "{{dist}}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        timeout = "3s"
        retry = {{ immediate = 0, delayed = 0 }}
        "#,
            addr = proxy.addr,
            schema = scratch.schema
        ),
    );
    let (host, addr) = with_admin(&path, None).await;
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));

    // The dead-letter store goes away: not ready, and the answer says why;
    // the process is still alive.
    proxy.cut.send_replace(true);
    let (status, body) = until(addr, "/readyz", |s, _| s == 503).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready\n"), "{body}");
    assert!(body.contains("the dead-letter store"), "{body}");
    assert!(!body.contains("transport"), "{body}");
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));

    // It comes back: ready again, once it answers.
    proxy.cut.send_replace(false);
    let answer = until(addr, "/readyz", |s, _| s == 200).await;
    assert_eq!(answer, (200, "ready\n".to_owned()));

    // A handler holds its route for up to its 3 s deadline; asked to stop,
    // the host finishes it first, and says it is draining meanwhile.
    host.control
        .transport()
        .enqueue(vec![crate::common::misbehave("sleep")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = tokio::spawn(host.stop());
    let (status, body) = until(addr, "/readyz", |s, _| s == 503).await;
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "not ready\n- draining: the host is stopping and takes no new work\n"
        )
    );
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    assert!(!stopping.is_finished(), "the answer came while draining");
    stopping.await.unwrap();
    // Once stopped, the listener is gone.
    assert!(TcpStream::connect(addr).is_err());
}
