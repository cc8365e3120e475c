//! Hot reload: plugin versions swapped in a running host under load, broken
//! builds refused, deploys over the admin API (with and without the token),
//! and pipeline changes applied while running. Real compiled plugins, the
//! real embedded store, the real HTTP listener.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use switchyard::config;
use switchyard::envelope::Kind;
use switchyard::runtime::{self, RunMode, RunOptions};
use switchyard::supervisor::{ChangeError, RouteInfo};
use switchyard::transport::Transport as _;

use crate::common::{
    Running, bin, eventually, message, refused, tally_lines, wasm, write_pipeline,
};

/// Replaces a file the way a build tool does: written beside it, renamed
/// over it.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn digest(bytes: &[u8]) -> String {
    switchyard::plugin::digest_of(bytes)
}

/// Waits (at most `secs` seconds) until the tally log's lines satisfy
/// `done`.
async fn until_logged(
    what: &str,
    secs: u64,
    log: &Path,
    done: impl Fn(&[(String, String)]) -> bool,
) {
    eventually(what, Duration::from_secs(secs), || {
        let ok = done(&tally_lines(log));
        async move { ok }
    })
    .await;
}

/// A pipeline with a tally plugin whose component is a copy in `dir`, so
/// the test can replace it.
fn tally_pipeline(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let component = plugins.join("tally.wasm");
    std::fs::copy(wasm("tally"), &component).unwrap();
    let path = write_pipeline(
        dir,
        "swaps",
        &format!(
            r#"
[transport]
sync = "normal"
poll_interval = "5ms"

[host]
watch_interval = "20ms"

[admin]
listen = "off"

[plugins.tally]
wasm = "plugins/tally.wasm"
events = ["Tick"]
grants = {{ dirs = [{{ host = "out", guest = "/out", writable = true }}] }}
{extra}
"#
        ),
    );
    (path, component)
}

fn tick(n: u64) -> switchyard::envelope::Envelope {
    message(Kind::Event, "Tick", json!({ "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_swaps_under_load_handle_every_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, component) = tally_pipeline(dir.path(), "");
    let p = config::load(&path).unwrap().pipeline;
    let v1 = std::fs::read(wasm("tally")).unwrap();
    let v2 = std::fs::read(wasm("tally_v2")).unwrap();
    let host = Running::start(
        &p,
        RunOptions {
            watch: true,
            ..RunOptions::quiet(RunMode::Serve)
        },
    )
    .await;

    // Load: about 2,500 events a second from another connection to the
    // store, as `switchyard publish` would write them.
    let running = Arc::new(AtomicBool::new(true));
    let producer = {
        let running = running.clone();
        let p = p.clone();
        tokio::spawn(async move {
            let transport = runtime::open_transport(&p).unwrap();
            let mut ids = Vec::new();
            let mut n = 0;
            while running.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..25).map(|i| tick(n + i)).collect();
                n += 25;
                ids.extend(batch.iter().map(|m| m.id.clone()));
                transport.enqueue(batch).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };

    let log = dir.path().join("out").join("tally.log");
    for swap in 0..20 {
        // Let some messages through on each version.
        let before = tally_lines(&log).len();
        until_logged("messages between swaps", 20, &log, |l| {
            l.len() >= before + 50
        })
        .await;
        let next = if swap % 2 == 0 { &v2 } else { &v1 };
        replace(&component, next);
        let want = digest(next);
        eventually(
            "the route to serve the new version",
            Duration::from_secs(20),
            || {
                let want = want.clone();
                let host = &host;
                async move { host.route("tally").await.is_some_and(|r| r.digest == want) }
            },
        )
        .await;
    }
    // And on the last version: a swap the route takes between two of the
    // producer's batches may otherwise be the last thing that happens.
    let before = tally_lines(&log).len();
    until_logged("messages on the last version", 20, &log, |l| {
        l.len() >= before + 50
    })
    .await;
    running.store(false, Ordering::Relaxed);
    let sent = producer.await.unwrap();
    until_logged("every message to be handled", 60, &log, |l| {
        l.len() >= sent.len()
    })
    .await;
    let route = host.route("tally").await.unwrap();
    host.stop().await;

    let lines = tally_lines(&log);
    let handled: Vec<&str> = lines.iter().map(|(id, _)| id.as_str()).collect();
    let unique: HashSet<&str> = handled.iter().copied().collect();
    let expected: HashSet<&str> = sent.iter().map(String::as_str).collect();
    assert_eq!(unique.len(), handled.len(), "a message was handled twice");
    assert_eq!(unique, expected, "handled ≠ sent");
    // One run of lines per version served: the log switches exactly at
    // each swap, never back and forth.
    let runs = 1 + lines.windows(2).filter(|w| w[0].1 != w[1].1).count();
    assert_eq!(route.swaps, 20);
    assert_eq!(
        runs,
        21,
        "the version changed {} times in the log",
        runs - 1
    );
    assert_eq!(route.version, "0.1.0");
    let by_v2 = lines.iter().filter(|(_, t)| t == "v2").count();
    assert!(by_v2 > 0 && by_v2 < lines.len());
    eprintln!(
        "{} messages, {} by v2, 20 swaps; the last swap took {} µs",
        lines.len(),
        by_v2,
        route.last_swap_us.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_builds_are_refused_and_the_old_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[plugins.rogue]
wasm = "plugins/rogue.wasm"
commands = ["Misbehave", "Sent"]
events = ["Poke"]
"#;
    let (path, component) = tally_pipeline(dir.path(), extra);
    std::fs::copy(wasm("rogue"), dir.path().join("plugins").join("rogue.wasm")).unwrap();
    let p = config::load(&path).unwrap().pipeline;
    let host = Running::start(
        &p,
        RunOptions {
            watch: true,
            ..RunOptions::quiet(RunMode::Serve)
        },
    )
    .await;
    let v1 = host.route("tally").await.unwrap();

    // Not a component at all.
    let why = refused(host.control.deploy("tally", b"not wasm".to_vec()).await);
    assert!(why.contains("not a WebAssembly file"), "{why}");
    // A core module, not a component.
    let why = refused(
        host.control
            .deploy("tally", b"\0asm\x01\0\0\0".to_vec())
            .await,
    );
    assert!(why.contains("core WebAssembly module"), "{why}");
    // A build that traps while it starts.
    let why = refused(
        host.control
            .deploy("tally", std::fs::read(wasm("tally_trap")).unwrap())
            .await,
    );
    assert!(why.contains("plugin `tally`"), "{why}");
    assert!(
        why.contains("wasm `unreachable` instruction executed"),
        "{why}"
    );
    // A build that cannot be instantiated within the memory limit.
    let why = refused(
        host.control
            .deploy("tally", std::fs::read(wasm("tally_ballast")).unwrap())
            .await,
    );
    assert!(why.contains("cannot instantiate plugin tally"), "{why}");
    // A build that drops the commands its route owns.
    let why = refused(
        host.control
            .deploy("rogue", std::fs::read(wasm("tally")).unwrap())
            .await,
    );
    assert!(why.contains("Misbehave"), "{why}");
    // Unknown plugin.
    assert!(matches!(
        host.control
            .deploy("nobody", std::fs::read(wasm("tally")).unwrap())
            .await,
        Err(ChangeError::UnknownPlugin(_))
    ));
    // A half-written file in the watched place: refused, then the whole
    // file is picked up.
    let v2 = std::fs::read(wasm("tally_v2")).unwrap();
    replace(&component, &v2[..v2.len() / 2]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host.route("tally").await.unwrap().digest, v1.digest);

    // Still v1, still serving.
    let transport = runtime::open_transport(&p).unwrap();
    let m = tick(1);
    let id = m.id.clone();
    transport.enqueue(vec![m]).await.unwrap();
    let log = dir.path().join("out").join("tally.log");
    until_logged("v1 to handle the message", 10, &log, |l| {
        l.contains(&(id.clone(), "v1".into()))
    })
    .await;
    let now = host.route("tally").await.unwrap();
    assert_eq!((now.digest, now.swaps), (v1.digest, 0));

    replace(&component, &v2);
    eventually(
        "the whole v2 file to be taken",
        Duration::from_secs(10),
        || {
            let host = &host;
            let want = digest(&v2);
            let transport = &transport;
            async move {
                // The route takes it with its next batch.
                let _ = transport.enqueue(vec![tick(2)]).await;
                host.route("tally").await.is_some_and(|r| r.digest == want)
            }
        },
    )
    .await;
    host.stop().await;
}

/// A free port on localhost for an admin listener.
fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn deploys_need_the_token_survive_a_restart_and_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tally_pipeline(dir.path(), "");
    let p = config::load(&path).unwrap().pipeline;
    let addr = free_port();
    let options = || RunOptions {
        admin: Some(addr),
        admin_token: Some("s3cret-token".into()),
        ..RunOptions::quiet(RunMode::Serve)
    };
    let host = Running::start(&p, options()).await;
    let url = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let v2 = std::fs::read(wasm("tally_v2")).unwrap();

    // Without a token, with a wrong one: refused, nothing changes.
    let r = client
        .put(format!("{url}/plugins/tally"))
        .body(v2.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .put(format!("{url}/plugins/tally"))
        .bearer_auth("guess")
        .body(v2.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(format!("{url}/plugins/tally/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(host.route("tally").await.unwrap().version, "0.1.0");

    // With it, through the CLI.
    let out = std::process::Command::new(bin())
        .args(["deploy"])
        .arg(wasm("tally_v2"))
        .args(["--plugin", "tally", "--host", &url])
        .env("SWITCHYARD_ADMIN_TOKEN", "s3cret-token")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("deployed tally 2.0.0"), "{stdout}");
    // The route takes it with its next message.
    let transport = runtime::open_transport(&p).unwrap();
    let m = tick(1);
    let id = m.id.clone();
    transport.enqueue(vec![m]).await.unwrap();
    let log = dir.path().join("out").join("tally.log");
    until_logged("v2 to handle the message", 10, &log, |l| {
        l.contains(&(id.clone(), "v2".into()))
    })
    .await;
    let listed = std::process::Command::new(bin())
        .args(["plugins", "list", "--host", &url])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("tally") && listed.contains("2.0.0"),
        "{listed}"
    );
    assert!(listed.contains("deployed"), "{listed}");
    host.stop().await;

    // A restart runs the deployed version.
    let host = Running::start(&p, options()).await;
    let route = host.route("tally").await.unwrap();
    assert_eq!(
        (route.version.as_str(), route.source.as_str()),
        ("2.0.0", "deployed")
    );

    // Rolled back: the pipeline's file again; once more: nothing to roll back.
    let r = client
        .post(format!("{url}/plugins/tally/rollback"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let info: RouteInfo = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(info.pending.unwrap().version, "0.1.0");
    let r = client
        .post(format!("{url}/plugins/tally/rollback"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body = String::from_utf8_lossy(&r.bytes().await.unwrap()).into_owned();
    assert!(body.contains("no deployment to roll back"), "{body}");
    host.stop().await;
    let host = Running::start(&p, options()).await;
    assert_eq!(host.route("tally").await.unwrap().source, "file");
    host.stop().await;

    // A host without a token refuses every change.
    let host = Running::start(
        &p,
        RunOptions {
            admin_token: None,
            ..options()
        },
    )
    .await;
    let r = client
        .put(format!("{url}/plugins/tally"))
        .bearer_auth("s3cret-token")
        .body(v2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_added_to_the_pipeline_file_starts_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[plugins.rogue]
wasm = "plugins/rogue.wasm"
commands = ["Misbehave", "Sent"]
events = ["Poke"]
"#;
    let (path, _) = tally_pipeline(dir.path(), extra);
    std::fs::copy(wasm("rogue"), dir.path().join("plugins").join("rogue.wasm")).unwrap();
    std::fs::create_dir_all(dir.path().join("out2")).unwrap();
    let p = config::load(&path).unwrap().pipeline;
    let host = Running::start(
        &p,
        RunOptions {
            watch: true,
            ..RunOptions::quiet(RunMode::Serve)
        },
    )
    .await;
    let transport = runtime::open_transport(&p).unwrap();
    let before: Vec<_> = (0..10).map(tick).collect();
    transport.enqueue(before.clone()).await.unwrap();
    let log = dir.path().join("out").join("tally.log");
    until_logged("tally to handle the first ticks", 10, &log, |l| {
        l.len() == 10
    })
    .await;

    // A change that would give a command two handlers is refused whole:
    // the consumer added with it does not start.
    let original = std::fs::read_to_string(&path).unwrap();
    let second = r#"
[plugins.second]
wasm = "plugins/tally.wasm"
events = ["Tick"]
grants = { dirs = [{ host = "out2", guest = "/out", writable = true }] }
"#;
    let double = format!(
        "{original}{second}\n[plugins.rogue2]\nwasm = \"plugins/rogue.wasm\"\ncommands = [\"Misbehave\"]\n"
    );
    replace(&path, double.as_bytes());
    let why = refused(host.control.reload_from_disk().await);
    assert!(why.contains("Misbehave"), "{why}");
    assert!(host.route("second").await.is_none());

    // The transport cannot change while running: refused whole too.
    replace(
        &path,
        format!("{original}{second}")
            .replace("poll_interval = \"5ms\"", "poll_interval = \"7ms\"")
            .as_bytes(),
    );
    let why = refused(host.control.reload_from_disk().await);
    assert!(why.contains("[transport] changed"), "{why}");

    // Adding the consumer alone applies, noticed by the watcher.
    replace(&path, format!("{original}{second}").as_bytes());
    eventually("the new route to start", Duration::from_secs(10), || {
        let host = &host;
        async move { host.route("second").await.is_some() }
    })
    .await;
    // Published as `switchyard publish` would: routed by the file as it is
    // now.
    let transport = runtime::open_transport(&config::load(&path).unwrap().pipeline).unwrap();
    let after: Vec<_> = (10..20).map(tick).collect();
    transport.enqueue(after.clone()).await.unwrap();
    let log2 = dir.path().join("out2").join("tally.log");
    until_logged("the new consumer to receive", 10, &log2, |l| l.len() == 10).await;
    let got: HashSet<String> = tally_lines(&log2).into_iter().map(|(id, _)| id).collect();
    let want: HashSet<String> = after.iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        got, want,
        "the new consumer gets what was published after it joined"
    );
    until_logged("tally to keep receiving", 10, &log, |l| l.len() == 20).await;

    // Removing it stops its route.
    replace(&path, original.as_bytes());
    eventually("the route to stop", Duration::from_secs(10), || {
        let host = &host;
        async move { host.route("second").await.is_none() }
    })
    .await;
    host.stop().await;
}

/// A route with nothing to do takes a new version at once, not with its
/// next message: what `plugins list` and a fleet's status show is what it
/// runs.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_route_takes_a_new_version_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tally_pipeline(dir.path(), "");
    let p = config::load(&path).unwrap().pipeline;
    let host = Running::start(&p, RunOptions::quiet(RunMode::Serve)).await;
    let v2 = std::fs::read(wasm("tally_v2")).unwrap();
    host.control.deploy("tally", v2.clone()).await.unwrap();
    eventually(
        "the idle route to run v2, no message sent",
        Duration::from_secs(10),
        || {
            let host = &host;
            let want = digest(&v2);
            async move {
                host.route("tally")
                    .await
                    .is_some_and(|r| r.digest == want && r.pending.is_none())
            }
        },
    )
    .await;
    host.stop().await;
}
