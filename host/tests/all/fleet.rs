//! Deploys to a fleet (`[fleet]`): hosts of one pipeline on RabbitMQ,
//! following the versions recorded in PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::envelope::Kind;
use switchyard::fleet::{Fleet, HostReport};

use crate::common::{bin, message, stop, tally_lines, wasm};

/// `switchyard run` of the pipeline at `path` as fleet host `id`.
fn host(path: &Path, id: &str) -> Child {
    Command::new(bin())
        .args(["run"])
        .arg(path)
        .env("SWITCHYARD_HOST_ID", id)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The fleet's report of each host, once `done` holds for them (at most
/// 60 s).
async fn until_hosts(
    fleet: &Fleet,
    what: &str,
    done: impl Fn(&[HostReport]) -> bool,
) -> Vec<HostReport> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = fleet.hosts().await.unwrap();
        if done(&hosts) {
            return hosts;
        }
        assert!(Instant::now() < deadline, "{what}: {hosts:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn runs(hosts: &[HostReport], id: &str, version: &str) -> bool {
    hosts.iter().any(|h| {
        h.host == id && h.live() && h.running.get("tally").is_some_and(|r| r.version == version)
    })
}

/// The ids and version tags in a host's tally log.
fn tally(dir: &Path) -> Vec<(String, String)> {
    tally_lines(&dir.join("out").join("tally.log"))
}

/// Three hosts share a tally route on RabbitMQ while a steady stream of
/// messages flows: a deploy reaches all three (the CLI waits for them), no
/// message is lost or handled twice, a host started afterwards starts on
/// the new version, and a host that was stopped during the deploy starts on
/// it too. `fleet status` and `fleet history` say so.
#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_reaches_every_host_and_hosts_started_later_run_it() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let schema = crate::state::schema();
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (first, p) = crate::amqp::pipeline(
        dirs[0].path(),
        &format!(
            r#"prefetch = 20
[fleet]
url = "postgres://postgres@127.0.0.1:5432/test"
schema = "{schema}"
poll_interval = "500ms"
[admin]
listen = "off"
[plugins.tally]
wasm = "{{dist}}/tally.wasm"
events = ["Tick"]
grants = {{ dirs = [{{ host = "out", guest = "/out", writable = true }}] }}
"#
        ),
    );
    // The same pipeline (name, exchange, fleet) beside each host's own
    // state and tally log.
    let paths: Vec<PathBuf> = dirs
        .iter()
        .map(|d| {
            std::fs::create_dir_all(d.path().join("out")).unwrap();
            let path = d.path().join(first.file_name().unwrap());
            if path != first {
                std::fs::copy(&first, &path).unwrap();
            }
            path
        })
        .collect();
    let fleet = Fleet::connect(p.fleet.as_ref().unwrap(), &p.name)
        .await
        .unwrap();
    let mut hosts: Vec<Child> = (0..3).map(|i| host(&paths[i], &format!("h{i}"))).collect();
    until_hosts(&fleet, "three hosts on 0.1.0", |h| {
        (0..3).all(|i| runs(h, &format!("h{i}"), "0.1.0"))
    })
    .await;

    // A foreign-paced producer: 30 messages every 100 ms, 600 in all.
    let transport = switchyard::runtime::open(&p).await.unwrap();
    let producer = tokio::spawn(async move {
        let mut ids = Vec::new();
        for _ in 0..20 {
            let batch: Vec<_> = (0..30)
                .map(|n| message(Kind::Event, "Tick", json!({ "n": n })))
                .collect();
            ids.extend(batch.iter().map(|m| m.id.clone()));
            transport.enqueue(batch).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ids
    });
    // h2 stops before the deploy and misses it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h2 = hosts.pop().unwrap();
    tokio::task::spawn_blocking(move || stop(h2)).await.unwrap();
    let deployed = Command::new(bin())
        .args(["deploy"])
        .arg(wasm("tally_v2"))
        .args(["--plugin", "tally", "-p"])
        .arg(&paths[0])
        .args(["--wait", "30s"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&deployed.stdout).into_owned();
    assert!(
        deployed.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    assert!(said.contains("deployed tally 2.0.0"), "{said}");
    assert!(said.contains("2 live host(s) run it"), "{said}");

    // Started afterwards, h3 starts on 2.0.0; h2 comes back on it.
    hosts.push(host(&paths[3], "h3"));
    hosts.push(host(&paths[2], "h2"));
    let reports = until_hosts(&fleet, "four hosts on 2.0.0", |h| {
        (0..4).all(|i| runs(h, &format!("h{i}"), "2.0.0"))
    })
    .await;
    for id in ["h2", "h3"] {
        let r = reports.iter().find(|r| r.host == id).unwrap();
        assert!(r.problem.is_none(), "{r:?}");
    }
    let ids = producer.await.unwrap();

    // Every message handled once, across the hosts.
    let deadline = Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines: Vec<(String, String)> = dirs.iter().flat_map(|d| tally(d.path())).collect();
        if lines.len() >= ids.len() || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = Command::new(bin())
        .args(["fleet", "status", "-p"])
        .arg(&paths[0])
        .output()
        .unwrap();
    let history = Command::new(bin())
        .args(["fleet", "history", "-p"])
        .arg(&paths[0])
        .output()
        .unwrap();
    for h in hosts {
        tokio::task::spawn_blocking(move || stop(h)).await.unwrap();
    }
    let after = fleet.hosts().await.unwrap();
    crate::sagas::drop_schema(&schema).await;
    crate::amqp::clean_up(&p).await;

    let mut seen: Vec<&String> = lines.iter().map(|(id, _)| id).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), ids.len(), "lost messages");
    assert_eq!(lines.len(), ids.len(), "messages handled twice");
    assert!(
        lines.iter().any(|(_, v)| v == "v2"),
        "no message reached 2.0.0"
    );
    // h3 started after the deploy: it never ran 0.1.0.
    assert!(tally(dirs[3].path()).iter().all(|(_, v)| v == "v2"));
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("desired: tally 2.0.0"), "{status}");
    assert_eq!(status.matches(": converged").count(), 4, "{status}");
    let history = String::from_utf8_lossy(&history.stdout).into_owned();
    assert!(history.contains("tally            2.0.0"), "{history}");
    // Stopped cleanly, every host says so.
    assert!(after.iter().all(|h| h.stopped), "{after:#?}");
}
