//! Deploys to a fleet (`[fleet]`): hosts of one pipeline on RabbitMQ,
//! following the versions recorded in PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::envelope::Kind;
use switchyard::fleet::{Fleet, HostReport};

use crate::common::{bin, message, stop, tally_lines, wasm};
use crate::reliability::Broker;

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

/// [`host`], its log written to `log`.
fn host_logged(path: &Path, id: &str, log: &Path) -> Child {
    Command::new(bin())
        .args(["run"])
        .arg(path)
        .env("SWITCHYARD_HOST_ID", id)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The deployer's copy of `file` with tally's build replaced by `build`,
/// copied beside it and named relatively: the hosts, whose files are
/// elsewhere, can only have it from the fleet.
fn deployer_copy(file: &Path, build: &str, edit: impl Fn(String) -> String) -> String {
    let dir = file.parent().unwrap();
    std::fs::copy(wasm(build), dir.join("only-here.wasm")).unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    let tally = format!("\"{}\"", wasm("tally").display());
    assert!(text.contains(&tally), "{text}");
    edit(text.replace(&tally, "\"only-here.wasm\""))
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

/// The fleet's report of each host, once host `id` reports a problem
/// that says `what` (at most 60 s).
async fn until_problem(fleet: &Fleet, id: &str, what: &str) -> Vec<HostReport> {
    until_hosts(fleet, &format!("{id} says {what:?}"), |h| {
        h.iter()
            .any(|r| r.host == id && r.problem.as_deref().is_some_and(|p| p.contains(what)))
    })
    .await
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

/// `n` directories, each with the same pipeline on `broker` (name, broker
/// names, the fleet in `schema`, a tally route; `extra` is more of it)
/// beside a state and tally log of its own.
pub(crate) fn copies(
    broker: &Broker,
    n: usize,
    schema: &str,
    poll: &str,
    extra: &str,
) -> (
    Vec<tempfile::TempDir>,
    Vec<PathBuf>,
    switchyard::config::Pipeline,
) {
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    // The Kafka test pipelines have their admin listener off already.
    let admin = if broker.name == "amqp" {
        "[admin]\nlisten = \"off\"\n"
    } else {
        ""
    };
    let (first, p) = (broker.pipeline)(
        dirs[0].path(),
        &format!(
            r#"{batch} = 20
[fleet]
url = "postgres://postgres@127.0.0.1:5432/test"
schema = "{schema}"
poll_interval = "{poll}"
{admin}{extra}
[plugins.tally]
wasm = "{{dist}}/tally.wasm"
events = ["Tick"]
grants = {{ dirs = [{{ host = "out", guest = "/out", writable = true }}] }}
"#,
            batch = broker.batch_key,
        ),
    );
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
    (dirs, paths, p)
}

/// A fresh fleet schema and `n` copies of a RabbitMQ pipeline in it
/// ([`copies`]), with the fleet's tables open.
async fn on_rabbitmq(
    n: usize,
    poll: &str,
    extra: &str,
) -> (
    String,
    Vec<tempfile::TempDir>,
    Vec<PathBuf>,
    switchyard::config::Pipeline,
    Fleet,
) {
    let schema = crate::state::schema();
    let (dirs, paths, p) = copies(&crate::amqp::RABBITMQ, n, &schema, poll, extra);
    let fleet = Fleet::connect(p.fleet.as_ref().unwrap(), &p.name)
        .await
        .unwrap();
    (schema, dirs, paths, p, fleet)
}

/// Starts hosts `h0`.. on the first `n` of `paths`, once each reports
/// running tally 0.1.0.
async fn start_hosts(fleet: &Fleet, paths: &[PathBuf], n: usize) -> Vec<Child> {
    let hosts: Vec<Child> = (0..n).map(|i| host(&paths[i], &format!("h{i}"))).collect();
    until_hosts(fleet, "the hosts on 0.1.0", |h| {
        (0..n).all(|i| runs(h, &format!("h{i}"), "0.1.0"))
    })
    .await;
    hosts
}

/// A producer at a steady pace, through its own connection to the broker:
/// `rounds` batches of `per_round` ticks, 100 ms apart. Gives their ids.
async fn produce(
    p: &switchyard::config::Pipeline,
    rounds: usize,
    per_round: usize,
) -> tokio::task::JoinHandle<Vec<String>> {
    let transport = switchyard::runtime::open(p).await.unwrap();
    tokio::spawn(async move {
        let mut ids = Vec::new();
        for _ in 0..rounds {
            let batch: Vec<_> = (0..per_round)
                .map(|n| message(Kind::Event, "Tick", json!({ "n": n })))
                .collect();
            ids.extend(batch.iter().map(|m| m.id.clone()));
            transport.enqueue(batch).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ids
    })
}

/// `switchyard deploy BUILD --plugin tally -p PIPELINE EXTRA…`.
pub(crate) fn deploy_tally(pipeline: &Path, build: &str, extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(["deploy"])
        .arg(wasm(build))
        .args(["--plugin", "tally", "-p"])
        .arg(pipeline)
        .args(extra)
        .output()
        .unwrap()
}

/// Three hosts share a tally route on RabbitMQ while a steady stream of
/// messages flows: a deploy reaches all three (the CLI waits for them), no
/// message is lost or handled twice, a host started afterwards starts on
/// the new version, and a host that was stopped during the deploy starts on
/// it too. `fleet status` and `fleet history` say so.
#[tokio::test(flavor = "multi_thread")]
async fn on_rabbitmq_a_deploy_reaches_every_host_and_hosts_started_later_run_it() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let p = a_deploy_reaches_every_host(&crate::amqp::RABBITMQ).await;
    crate::amqp::clean_up(&p).await;
}

/// The same on Kafka, where the hosts share the topics' partitions in one
/// consumer group.
#[tokio::test(flavor = "multi_thread")]
async fn on_kafka_a_deploy_reaches_every_host_and_hosts_started_later_run_it() {
    a_deploy_reaches_every_host(&crate::kafka::KAFKA).await;
}

async fn a_deploy_reaches_every_host(broker: &Broker) -> switchyard::config::Pipeline {
    let schema = crate::state::schema();
    let (dirs, paths, p) = copies(broker, 4, &schema, "500ms", "");
    let fleet = Fleet::connect(p.fleet.as_ref().unwrap(), &p.name)
        .await
        .unwrap();
    let mut hosts = start_hosts(&fleet, &paths, 3).await;
    // On Kafka, a host that joins or leaves the group while records flow
    // has what it handled until its next heartbeat handled again by the
    // partition's next owner (librdkafka's mock cluster refuses commits
    // from the moment a rebalance begins; docs/architecture.md). There the
    // hosts come and go while nothing flows; the deploy itself still comes
    // under traffic.
    let quiet_membership = broker.name != "amqp";
    let all_handled = |n: usize| {
        let dirs = &dirs;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while dirs.iter().map(|d| tally(d.path()).len()).sum::<usize>() < n
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // h2 stops before the deploy and misses it.
    let mut h2 = hosts.pop();
    if quiet_membership {
        let h2 = h2.take().unwrap();
        tokio::task::spawn_blocking(move || stop(h2)).await.unwrap();
        // The group settles on the two hosts left.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // A producer at a steady pace: 30 messages every 100 ms, 600 in all.
    let mut producer = Some(produce(&p, 20, 30).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(h2) = h2 {
        tokio::task::spawn_blocking(move || stop(h2)).await.unwrap();
    }
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
    let mut produced = None;
    if quiet_membership {
        let ids = producer.take().unwrap().await.unwrap();
        all_handled(ids.len()).await;
        // Past librdkafka's commit interval: the offsets are in.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        produced = Some(ids);
    }

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
    let ids = match produced {
        Some(ids) => ids,
        None => producer.take().unwrap().await.unwrap(),
    };

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
    // The hosts that handled messages say when they last settled one.
    assert!(status.contains("last settled a message"), "{status}");
    let history = String::from_utf8_lossy(&history.stdout).into_owned();
    assert!(history.contains("tally            2.0.0"), "{history}");
    // Stopped cleanly, every host says so.
    assert!(after.iter().all(|h| h.stopped), "{after:#?}");
    p
}

/// A canary of a release that fails every message, while a producer keeps
/// a steady pace: it runs on one host only, the fleet rolls it back by
/// itself well within its watch (the CLI waiting for the verdict exits 1
/// and says why), every host runs the earlier version again, and the few
/// messages it dead-lettered are all replayed and handled.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_canary_stays_on_one_host_and_is_rolled_back() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let schema = crate::state::schema();
    // The bad release fails for good at once: no retry.
    let (dirs, paths, p) = copies(
        &crate::amqp::RABBITMQ,
        3,
        &schema,
        "300ms",
        &format!(
            "[dead_letters]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\n[defaults]\nretry = {{ immediate = 0, delayed = 0 }}\n"
        ),
    );
    let fleet = Fleet::connect(p.fleet.as_ref().unwrap(), &p.name)
        .await
        .unwrap();
    let hosts = start_hosts(&fleet, &paths, 3).await;
    let deploy = |build: &str, extra: &[&str]| deploy_tally(&paths[0], build, extra);
    // The version the fleet runs, recorded: what a canary is compared
    // with, and returns to.
    let base = deploy("tally", &["--wait", "30s"]);
    assert!(
        base.status.success(),
        "{}",
        String::from_utf8_lossy(&base.stderr)
    );

    let producer = produce(&p, 40, 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Which hosts ever report the bad release while it is tried.
    let (watching, watched) = tokio::sync::oneshot::channel::<()>();
    let spy = {
        let fleet = Fleet::connect(p.fleet.as_ref().unwrap(), &p.name)
            .await
            .unwrap();
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut watched = watched;
            loop {
                for h in fleet.hosts().await.unwrap() {
                    if h.running.get("tally").is_some_and(|r| r.version == "3.0.0") {
                        seen.insert(h.host);
                    }
                }
                if watched.try_recv().is_ok() {
                    return seen.into_iter().collect::<Vec<String>>();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let canary = deploy(
        "tally_fails",
        &[
            "--canary",
            "1",
            "--watch",
            "2m",
            "--margin",
            "0.1",
            "--min-attempts",
            "10",
        ],
    );
    let took = started.elapsed();
    let _ = watching.send(());
    let on_bad_release = spy.await.unwrap();
    let said = String::from_utf8_lossy(&canary.stdout).into_owned();
    assert_eq!(
        canary.status.code(),
        Some(1),
        "{said}{}",
        String::from_utf8_lossy(&canary.stderr)
    );
    assert!(said.contains("canary on h0"), "{said}");
    assert!(
        said.contains("rolled back: 100.0 % of the canary's attempts failed"),
        "{said}"
    );
    assert!(said.contains("3 live host(s) run"), "{said}");
    assert!(took < Duration::from_secs(60), "the verdict took {took:?}");
    let ids = producer.await.unwrap();
    let history = fleet.history(10).await.unwrap();
    let reports = fleet.hosts().await.unwrap();

    // Only the canary failed messages; replayed, they are handled.
    let dead = crate::common::dead_letters(&p).await;
    let replay = Command::new(bin())
        .args(["dlq", "replay", "--all", "-p"])
        .arg(&paths[0])
        .output()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let handled = loop {
        let mut seen: Vec<String> = dirs
            .iter()
            .flat_map(|d| tally(d.path()))
            .map(|(id, _)| id)
            .collect();
        seen.sort();
        seen.dedup();
        if seen.len() >= ids.len() || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for h in hosts {
        tokio::task::spawn_blocking(move || stop(h)).await.unwrap();
    }
    crate::sagas::drop_schema(&schema).await;
    crate::amqp::clean_up(&p).await;

    assert_eq!(
        history[0].state,
        switchyard::fleet::RolloutState::RolledBack
    );
    assert_eq!(history[0].canary, vec!["h0".to_owned()]);
    for r in reports.iter().filter(|r| r.live()) {
        assert_eq!(r.running["tally"].version, "0.1.0", "{r:?}");
    }
    assert!(!dead.is_empty());
    assert!(dead.len() < ids.len() / 2, "{} dead letters", dead.len());
    for d in &dead {
        assert_eq!(d.plugin_version, "3.0.0");
        assert_eq!(d.error.code.as_deref(), Some("bad-release"));
    }
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(handled.len(), ids.len(), "not every message was handled");
    assert_eq!(on_bad_release, vec!["h0".to_owned()]);
}

/// Tried from outside: a client of our own (pika) sends `Echo` commands at
/// a steady pace and counts the replies on its own queue while the echo
/// plugin of three hosts is deployed to; every command is answered once,
/// with its own body.
#[test]
fn a_deploy_under_a_foreign_clients_steady_traffic_loses_nothing() {
    let _shared = crate::amqp::BROKER_IN_USE.blocking_read();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = crate::state::schema();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (first, p) = crate::amqp::pipeline(
        dirs[0].path(),
        &format!(
            "[fleet]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\npoll_interval = \"500ms\"\n[admin]\nlisten = \"off\"\n[plugins.echo]\nwasm = \"{{dist}}/echo.wasm\"\ncommands = [\"Echo\"]\n"
        ),
    );
    let paths: Vec<PathBuf> = dirs
        .iter()
        .map(|d| {
            let path = d.path().join(first.file_name().unwrap());
            if path != first {
                std::fs::copy(&first, &path).unwrap();
            }
            path
        })
        .collect();
    let fleet = rt
        .block_on(Fleet::connect(p.fleet.as_ref().unwrap(), &p.name))
        .unwrap();
    let hosts: Vec<Child> = (0..3).map(|i| host(&paths[i], &format!("h{i}"))).collect();
    let on = |version: &'static str| {
        move |h: &[HostReport]| {
            (0..3).all(|i| {
                h.iter().any(|r| {
                    r.host == format!("h{i}")
                        && r.live()
                        && r.running.get("echo").is_some_and(|e| e.version == version)
                })
            })
        }
    };
    rt.block_on(until_hosts(
        &fleet,
        "three hosts on echo 0.1.0",
        on("0.1.0"),
    ));
    // 400 commands, one every 10 ms; the deploy comes a second in.
    let client = Command::new(crate::amqp::python())
        .arg(crate::common::workspace_root().join("tests/interop/steady_commands.py"))
        .args([crate::amqp::BROKER, &crate::amqp::exchange(&p), "400", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let deployed = Command::new(bin())
        .args(["deploy"])
        .arg(wasm("echo_v2"))
        .args(["--plugin", "echo", "-p"])
        .arg(&paths[0])
        .args(["--wait", "30s"])
        .output()
        .unwrap();
    let counted = client.wait_with_output().unwrap();
    let reports = rt.block_on(fleet.hosts()).unwrap();
    for h in hosts {
        stop(h);
    }
    rt.block_on(crate::sagas::drop_schema(&schema));
    rt.block_on(crate::amqp::clean_up(&p));
    assert!(
        deployed.status.success(),
        "{}{}",
        String::from_utf8_lossy(&deployed.stdout),
        String::from_utf8_lossy(&deployed.stderr)
    );
    assert!(on("0.2.0")(&reports), "{reports:#?}");
    assert!(
        counted.status.success(),
        "{}",
        String::from_utf8_lossy(&counted.stderr)
    );
    let counted: serde_json::Value = serde_json::from_slice(&counted.stdout).unwrap();
    assert_eq!(
        counted,
        json!({ "sent": 400, "answered": 400, "duplicates": 0, "mismatched": 0 })
    );
}

/// A canary that makes too few attempts in its watch has shown nothing:
/// it is rolled back, not promoted, and the verdict says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_canary_that_saw_no_traffic_is_not_promoted() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let (schema, _dirs, paths, p, fleet) = on_rabbitmq(2, "200ms", "").await;
    let hosts = start_hosts(&fleet, &paths, 2).await;
    let deploy = |build: &str, extra: &[&str]| deploy_tally(&paths[0], build, extra);
    let base = deploy("tally", &["--wait", "30s"]);
    let canary = deploy("tally_v2", &["--canary", "1", "--watch", "2s"]);
    let history = fleet.history(1).await.unwrap();
    for h in hosts {
        tokio::task::spawn_blocking(move || stop(h)).await.unwrap();
    }
    crate::sagas::drop_schema(&schema).await;
    crate::amqp::clean_up(&p).await;
    assert!(
        base.status.success(),
        "{}",
        String::from_utf8_lossy(&base.stderr)
    );
    let said = String::from_utf8_lossy(&canary.stdout).into_owned();
    assert_eq!(
        canary.status.code(),
        Some(1),
        "{said}{}",
        String::from_utf8_lossy(&canary.stderr)
    );
    assert!(
        said.contains("made 0 attempts on it in its watch, fewer than the 20 needed"),
        "{said}"
    );
    assert_eq!(
        history[0].state,
        switchyard::fleet::RolloutState::RolledBack
    );
}

/// `switchyard CMD… -p PIPELINE EXTRA…`, its exit code and what it said.
fn cli(args: &[&str], pipeline: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("-p")
        .arg(pipeline)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A whole pipeline file is deployed: its new route (tally now also takes
/// `Published`) and its new build (tally 2.0.0) reach both running hosts
/// at once; events of the new type are each handled once, by 2.0.0; a host
/// started afterwards from the old file runs the deployed one. A file the
/// running hosts cannot take (a changed [fleet]) and a file that does not
/// parse are refused whole, with nothing recorded; a dry run records
/// nothing. A rollback returns the earlier file, and the history says who
/// did what.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_file_deploy_reaches_every_host_and_is_refused_whole_when_wrong() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let (schema, dirs, paths, p, fleet) = on_rabbitmq(4, "300ms", "").await;
    let mut hosts = start_hosts(&fleet, &paths, 2).await;
    // The deployer edits its copy of the file: a new build, which only it
    // has, and a new type.
    let new = deployer_copy(&paths[3], "tally_v2", |t| {
        t.replace(r#"events = ["Tick"]"#, r#"events = ["Tick", "Published"]"#)
    });
    assert!(new.contains("Published"));
    std::fs::write(&paths[3], &new).unwrap();
    let digest = switchyard::plugin::digest_of(new.as_bytes());

    let (code, dry) = cli(&["deploy"], &paths[3], &["--dry-run"]);
    assert_eq!(code, Some(0), "{dry}");
    assert!(dry.contains("the first pipeline file deployed"), "{dry}");
    assert!(dry.contains("tally 2.0.0"), "{dry}");
    assert!(dry.contains("dry run: nothing recorded"), "{dry}");
    assert!(fleet.history(10).await.unwrap().is_empty());

    let (code, said) = cli(&["deploy"], &paths[3], &["--wait", "30s"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("2 live host(s) run it"), "{said}");
    let first = fleet.history(10).await.unwrap();
    assert_eq!(first.len(), 2, "{first:#?}");
    assert!(
        first
            .iter()
            .any(|d| d.plugin == "(pipeline file)" && d.digest == digest)
    );
    // Nothing new: nothing recorded.
    let (code, again) = cli(&["deploy"], &paths[3], &[]);
    assert_eq!(code, Some(0), "{again}");
    assert!(again.contains("nothing new to record"), "{again}");

    // Events of the type the file added reach the hosts, once each.
    let transport = switchyard::runtime::open(&p).await.unwrap();
    let events: Vec<_> = (0..50)
        .map(|n| message(Kind::Event, "Published", json!({ "n": n })))
        .collect();
    let ids: Vec<String> = events.iter().map(|m| m.id.clone()).collect();
    transport.enqueue(events).await.unwrap();
    // A host started afterwards from the old file starts on the deployed
    // one.
    let h2_log = dirs[2].path().join("h2.log");
    hosts.push(host_logged(&paths[2], "h2", &h2_log));
    let reports = until_hosts(&fleet, "h2 on the deployed file", |h| {
        runs(h, "h2", "2.0.0")
            && h.iter()
                .any(|r| r.host == "h2" && r.pipeline.as_deref() == Some(&digest))
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let handled = || -> Vec<(String, String)> {
        dirs.iter()
            .flat_map(|d| tally(d.path()))
            .filter(|(id, _)| ids.contains(id))
            .collect()
    };
    while handled().len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A moment more, for a message handled twice to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = handled();
    let (status_code, status) = cli(&["deploy", "--status"], &paths[0], &[]);

    // Refused whole: a section running hosts cannot change, and a file
    // that does not parse. Nothing is recorded.
    std::fs::write(
        &paths[3],
        new.replace(r#"poll_interval = "300ms""#, r#"poll_interval = "400ms""#),
    )
    .unwrap();
    let (refused_code, refused) = cli(&["deploy"], &paths[3], &[]);
    std::fs::write(&paths[3], format!("{new}\n[plugins.broken]\nwasm = 3\n")).unwrap();
    let (invalid_code, invalid) = cli(&["deploy"], &paths[3], &[]);
    let after_refusals = fleet.history(10).await.unwrap().len();

    // The first file has nothing before it to roll back to.
    let (no_earlier_code, no_earlier) =
        cli(&["fleet", "rollback", "--pipeline-file"], &paths[0], &[]);
    // A second file takes `Published` away; a rollback brings it back.
    std::fs::write(&paths[3], new.replace(r#", "Published""#, "")).unwrap();
    let (second_code, second) = cli(&["deploy"], &paths[3], &["--wait", "30s"]);
    let (rollback_code, rolled_back) = cli(
        &["fleet", "rollback", "--pipeline-file"],
        &paths[0],
        &["--wait", "30s"],
    );
    let history = fleet.history(10).await.unwrap();
    let after = fleet.hosts().await.unwrap();
    for h in hosts {
        tokio::task::spawn_blocking(move || stop(h)).await.unwrap();
    }
    crate::sagas::drop_schema(&schema).await;
    crate::amqp::clean_up(&p).await;

    assert!(
        reports
            .iter()
            .filter(|r| r.live())
            .all(|r| r.problem.is_none()),
        "{reports:#?}"
    );
    let mut seen: Vec<&String> = lines.iter().map(|(id, _)| id).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), ids.len(), "lost events of the new type");
    assert_eq!(lines.len(), ids.len(), "events handled twice");
    assert!(lines.iter().all(|(_, v)| v == "v2"), "{lines:?}");
    let h2_log = std::fs::read_to_string(&h2_log).unwrap();
    assert!(
        h2_log.contains("starting on the pipeline file deployed to the fleet"),
        "{h2_log}"
    );
    assert_eq!(status_code, Some(0), "{status}");
    assert!(status.contains("(pipeline file)"), "{status}");
    assert_eq!(status.matches("3 of 3 live host(s)").count(), 2, "{status}");

    assert_eq!(refused_code, Some(1), "{refused}");
    assert!(refused.contains("[fleet] changed"), "{refused}");
    assert_eq!(invalid_code, Some(1), "{invalid}");
    assert!(invalid.contains("wasm = 3"), "{invalid}");
    assert_eq!(after_refusals, 2, "a refused deploy was recorded");
    assert_eq!(no_earlier_code, Some(1), "{no_earlier}");
    assert!(no_earlier.contains("no earlier version"), "{no_earlier}");

    assert_eq!(second_code, Some(0), "{second}");
    assert!(second.contains("tally 2.0.0: unchanged"), "{second}");
    assert_eq!(rollback_code, Some(0), "{rolled_back}");
    assert!(
        rolled_back.contains("3 live host(s) run it"),
        "{rolled_back}"
    );
    assert_eq!(history[0].plugin, "(pipeline file)");
    assert_eq!(history[0].digest, digest);
    assert_eq!(
        history[0].verdict.as_deref(),
        Some(&*format!("rollback of #{}", history[1].seq))
    );
    for r in after.iter().filter(|r| !r.stopped) {
        assert_eq!(r.pipeline.as_deref(), Some(&*digest), "{r:?}");
    }
}

/// What is in the fleet's tables is not trusted: a build that does not
/// match its digest, and a pipeline file that does not parse, are refused
/// by the host with the reason (it keeps running what it has), and a host
/// row no host of ours wrote does not break `fleet status`. A good deploy
/// still goes through afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_fleet_table_is_refused_with_the_reason() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let (schema, _dirs, paths, p, fleet) = on_rabbitmq(1, "200ms", "").await;
    let hosts = start_hosts(&fleet, &paths, 1).await;
    let client = crate::sagas::pg_client().await;
    let insert = |plugin: &'static str, digest: String, bytes: Vec<u8>| {
        let (client, schema, name) = (&client, schema.clone(), p.name.clone());
        async move {
            client
                .execute(
                    &format!("INSERT INTO {schema}.fleet_builds VALUES ($1, $2, 0)"),
                    &[&digest, &bytes],
                )
                .await
                .unwrap();
            client
                .execute(
                    &format!(
                        "INSERT INTO {schema}.fleet_deploys (pipeline, plugin, digest, version, by_whom, at_ms)
                         VALUES ($1, $2, $3, '9.9.9', 'mallory', 0)"
                    ),
                    &[&name, &plugin, &digest],
                )
                .await
                .unwrap();
        }
    };
    // A build stored under a digest that is not its own.
    let v2 = std::fs::read(wasm("tally_v2")).unwrap();
    insert("tally", "sha256:".to_owned() + &"0".repeat(64), v2).await;
    let swapped = until_problem(&fleet, "h0", "reads back as").await;
    // A pipeline file stored under its own digest that is not TOML.
    let garbage = b"[pipeline\nname = ".to_vec();
    insert(
        "(pipeline file)",
        switchyard::plugin::digest_of(&garbage),
        garbage,
    )
    .await;
    let unparsed = until_problem(&fleet, "h0", "the fleet's pipeline file (deploy #").await;
    // A host row with a garbled report.
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.fleet_hosts (pipeline, host, started_at_ms, seen_at_ms, running)
                 VALUES ($1, 'intruder', 0, $2, '{{not json')"
            ),
            &[&p.name, &i64::try_from(switchyard::envelope::now_ms()).unwrap()],
        )
        .await
        .unwrap();
    let (status_code, status) = cli(&["fleet", "status"], &paths[0], &[]);
    // A good build is still taken.
    let good = deploy_tally(&paths[0], "tally_v2", &["--wait", "30s"]);
    let reports = fleet.hosts().await.unwrap();
    for h in hosts {
        tokio::task::spawn_blocking(move || stop(h)).await.unwrap();
    }
    crate::sagas::drop_schema(&schema).await;
    crate::amqp::clean_up(&p).await;

    for r in swapped.iter().chain(&unparsed) {
        assert_eq!(r.running["tally"].version, "0.1.0", "{r:?}");
    }
    assert_eq!(status_code, Some(1), "{status}");
    assert!(status.contains("host intruder"), "{status}");
    assert!(status.contains("host h0: NOT CONVERGED"), "{status}");
    assert!(
        good.status.success(),
        "{}{}",
        String::from_utf8_lossy(&good.stdout),
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(runs(&reports, "h0", "2.0.0"), "{reports:#?}");
}

/// A pipeline file a host cannot take while it runs (it changes tally's
/// delayed retries, which lays out the broker's retry queues anew) is
/// refused there: the host keeps its own file and says why, `--wait` and
/// `deploy --status` name it, and the next file, without that change, is
/// taken at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_file_a_host_cannot_take_is_refused_there_with_the_reason() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let (schema, _dirs, paths, p, fleet) = on_rabbitmq(2, "200ms", "").await;
    let hosts = start_hosts(&fleet, &paths, 1).await;
    let good = deployer_copy(&paths[1], "tally_v2", |t| t);
    let bad = good.replace(
        "grants = {",
        "retry = { immediate = 1, delayed = 2 }\ngrants = {",
    );
    assert_ne!(bad, good);
    std::fs::write(&paths[1], &bad).unwrap();
    let (bad_code, bad_said) = cli(&["deploy"], &paths[1], &["--wait", "5s"]);
    let (status_code, status) = cli(&["deploy", "--status"], &paths[1], &[]);
    let refused = fleet.hosts().await.unwrap();
    std::fs::write(&paths[1], &good).unwrap();
    let (good_code, good_said) = cli(&["deploy"], &paths[1], &["--wait", "30s"]);
    let taken = fleet.hosts().await.unwrap();
    for h in hosts {
        tokio::task::spawn_blocking(move || stop(h)).await.unwrap();
    }
    crate::sagas::drop_schema(&schema).await;
    crate::amqp::clean_up(&p).await;

    assert_eq!(bad_code, Some(1), "{bad_said}");
    assert!(
        bad_said.contains("h0: (pipeline file): runs its own pipeline file"),
        "{bad_said}"
    );
    assert!(
        bad_said.contains("delayed retries of `tally` changed"),
        "{bad_said}"
    );
    assert_eq!(status_code, Some(1), "{status}");
    assert!(status.contains("0 of 1 live host(s)"), "{status}");
    let h0 = refused.iter().find(|h| h.host == "h0").unwrap();
    assert_eq!(h0.pipeline, None, "{h0:?}");
    assert!(
        h0.problem.as_deref().unwrap_or("").contains("refused"),
        "{h0:?}"
    );
    assert_eq!(good_code, Some(0), "{good_said}");
    let h0 = taken.iter().find(|h| h.host == "h0").unwrap();
    assert_eq!(
        h0.pipeline.as_deref(),
        Some(&*switchyard::plugin::digest_of(good.as_bytes())),
        "{h0:?}"
    );
    assert_eq!(h0.running["tally"].version, "2.0.0", "{h0:?}");
    assert_eq!(h0.problem, None, "{h0:?}");
}
