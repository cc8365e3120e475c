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
    let p = config::load(&path).unwrap().pipeline;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let host = Running::start(
        &p,
        RunOptions {
            admin: Some(addr),
            admin_token: Some("s3cret-token".into()),
            ..RunOptions::quiet(RunMode::Serve)
        },
    )
    .await;
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
