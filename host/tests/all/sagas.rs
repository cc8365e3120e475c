//! Sagas on a running host: instances found from their messages, their
//! state and steps committed with the outcome, completion, messages that
//! find no instance, and two hosts that handle one instance's messages at
//! once (on RabbitMQ with PostgreSQL), where no step is lost.

use std::collections::BTreeMap;

use serde_json::json;
use switchyard::config;
use switchyard::envelope::{Envelope, Kind};
use switchyard::runtime;
use switchyard::saga::{Status, Step};
use switchyard::state::{Reader, Store};

use crate::common::{bin, dead_letters, message, write_pipeline};

pub fn ledger(not_found: &str) -> String {
    format!(
        r#"
    [plugins.ledger]
    wasm = "{{dist}}/ledger.wasm"
    events = ["Open", "Add", "Close", "Reject", "Peek", "Remind", "Expire", "Charge", "Debit.Fault"]
    retry = {{ immediate = 0, delayed = 0 }}
    [plugins.ledger.saga]
    starts = ["Open"]
    instance_key = "$.id"
    instance_keys = {{ Peek = "correlation-id" }}
    not_found = "{not_found}"

    [plugins.bank]
    wasm = "{{dist}}/bank.wasm"
    commands = ["Debit"]
    retry = {{ immediate = 0, delayed = 0 }}
"#
    )
}

pub fn open(id: &str) -> Envelope {
    message(Kind::Event, "Open", json!({ "id": id }))
}

pub fn add(id: &str, n: i64) -> Envelope {
    message(Kind::Event, "Add", json!({ "id": id, "n": n }))
}

fn close(id: &str) -> Envelope {
    message(Kind::Event, "Close", json!({ "id": id }))
}

fn remind(id: &str, after: std::time::Duration) -> Envelope {
    message(
        Kind::Event,
        "Remind",
        json!({ "id": id, "after_ms": after.as_millis() as u64 }),
    )
}

/// Runs `messages` through an embedded pipeline with the ledger saga until
/// none is left; returns the pipeline file and the pipeline.
async fn run_embedded(
    dir: &std::path::Path,
    not_found: &str,
    messages: Vec<Envelope>,
) -> (std::path::PathBuf, config::Pipeline) {
    crate::common::drain_embedded(dir, "sagas", &ledger(not_found), messages).await
}

fn embedded_state(pipeline: &config::Pipeline) -> std::sync::Arc<dyn Reader> {
    let config::TransportConfig::Embedded(e) = &pipeline.transport else {
        panic!("not embedded");
    };
    switchyard::state::sqlite::SqliteState::reader(&e.path)
}

/// An instance's state as JSON values, by its own keys.
fn instance_state(r: &dyn Reader, id: &str) -> BTreeMap<String, serde_json::Value> {
    let prefix = switchyard::saga::stored_prefix(id);
    r.keys("ledger", &prefix, None, 1000)
        .unwrap()
        .into_iter()
        .map(|k| {
            let v = r.get("ledger", &k).unwrap().unwrap();
            (
                switchyard::saga::instance_key(id, &k).unwrap().to_owned(),
                serde_json::from_slice(&v).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saga_keeps_each_instance_and_every_step_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut peek = message(Kind::Event, "Peek", json!("anything"));
    peek.correlation_id = Some("L-2".into());
    let opening = open("L-1");
    let reject = message(Kind::Event, "Reject", json!({ "id": "L-2" }));
    let after_close = add("L-1", 100);
    let nowhere = add("L-404", 1);
    let unresolvable = message(Kind::Event, "Add", json!({ "ledger": "L-1", "n": 1 }));
    // One enqueue, so that one batch holds several steps of one instance.
    let messages = vec![
        opening.clone(),
        open("L-2"),
        add("L-1", 2),
        add("L-1", 3),
        add("L-2", 10),
        peek,
        reject.clone(),
        close("L-1"),
        after_close.clone(),
        nowhere.clone(),
        unresolvable.clone(),
    ];
    let (path, pipeline) = run_embedded(dir.path(), "dead-letter", messages).await;

    let state = embedded_state(&pipeline);
    let l1 = state.instance("ledger", "L-1").unwrap().unwrap();
    assert_eq!(l1.status, Status::Completed);
    assert_eq!(l1.version, 4);
    assert_eq!(l1.last_type, "Close");
    // Its last message was dead-lettered: failed, its steps as they were.
    let l2 = state.instance("ledger", "L-2").unwrap().unwrap();
    assert_eq!((l2.status, l2.version), (Status::Failed, 3));
    assert_eq!(
        instance_state(state.as_ref(), "L-1"),
        BTreeMap::from([
            ("total".to_owned(), json!(5)),
            ("adds".to_owned(), json!(2)),
            ("opened_by".to_owned(), json!(opening.id)),
        ])
    );
    assert_eq!(instance_state(state.as_ref(), "L-2")["peeked"], json!(true));

    let steps: Vec<Step> = state.steps("ledger", "L-1").unwrap();
    let types: Vec<&str> = steps.iter().map(|s| s.message_type.as_str()).collect();
    assert_eq!(types, ["Open", "Add", "Add", "Close"]);
    assert_eq!(steps[0].message_id, opening.id);
    assert_eq!(steps[0].outputs.len(), 1);
    assert_eq!(steps[0].outputs[0].message_type, "Opened");
    assert_eq!(steps[1].changes["total"].as_deref(), Some("2"));
    assert!(steps[3].completed && !steps[2].completed);
    assert_eq!(
        steps.iter().map(Step::version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );

    // Every message that found no instance is dead-lettered, saying why;
    // a failed step names its instance.
    let letters = dead_letters(&pipeline).await;
    let by_id = |id: &str| {
        letters
            .iter()
            .find(|l| l.message.id == id)
            .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:#?}"))
    };
    assert_eq!(letters.len(), 4, "{letters:#?}");
    let completed = by_id(&after_close.id);
    assert_eq!(completed.error.kind, "no-instance");
    assert!(completed.error.message.contains("has completed"));
    assert!(
        completed
            .error
            .details
            .contains(&("saga.instance".into(), "L-1".into()))
    );
    assert!(
        by_id(&nowhere.id)
            .error
            .message
            .contains("has no instance L-404")
    );
    assert!(
        by_id(&unresolvable.id)
            .error
            .message
            .contains("$.id does not resolve")
    );
    let rejected = by_id(&reject.id);
    assert_eq!(rejected.error.kind, "permanent");
    assert!(
        rejected
            .error
            .details
            .contains(&("saga.instance".into(), "L-2".into()))
    );

    // What the CLI shows of them.
    let out = std::process::Command::new(bin())
        .args(["sagas", "list", "-p"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("L-1") && text.contains("completed"), "{text}");
    assert!(text.contains("L-2") && text.contains("failed"), "{text}");
    let out = std::process::Command::new(bin())
        .args(["sagas", "list", "--status", "failed", "-p"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("L-2") && !text.contains("L-1"), "{text}");
    let out = std::process::Command::new(bin())
        .args(["sagas", "list", "--status", "running", "-p"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("L-2") && !text.contains("L-1"), "{text}");
    let out = std::process::Command::new(bin())
        .args(["sagas", "show", "ledger", "L-1", "-p"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "status    completed",
        "total      5",
        "set      total = 5",
        "published Opened",
        "completed the instance",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let out = std::process::Command::new(bin())
        .args(["sagas", "show", "ledger", "L-1", "--json", "-p"])
        .arg(&path)
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"]["total"], json!(5));
    assert_eq!(shown["steps"].as_array().unwrap().len(), 4);
    let out = std::process::Command::new(bin())
        .args(["sagas", "show", "ledger", "L-404", "-p"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // A failed instance still gets its messages; the next step that
    // succeeds makes it running again.
    run_embedded(dir.path(), "dead-letter", vec![add("L-2", 1)]).await;
    let l2 = state.instance("ledger", "L-2").unwrap().unwrap();
    assert_eq!((l2.status, l2.version), (Status::Running, 4));
    assert_eq!(instance_state(state.as_ref(), "L-2")["total"], json!(11));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_without_an_instance_is_ignored_when_the_pipeline_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pipeline) = run_embedded(dir.path(), "ignore", vec![add("L-404", 1)]).await;
    assert!(dead_letters(&pipeline).await.is_empty());
    let state = embedded_state(&pipeline);
    assert_eq!(state.instance("ledger", "L-404").unwrap(), None);
}

#[test]
fn a_saga_table_that_cannot_work_is_refused_with_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        "bad-saga",
        r#"
    [plugins.ledger]
    wasm = "{dist}/ledger.wasm"
    events = ["Open", "Add"]
    [plugins.ledger.saga]
    starts = ["Begin"]
    instance_keys = { Open = "order_id", Close = "$.id" }
    not_found = "drop"
"#,
    );
    let Err(e) = config::load(&path) else {
        panic!("a broken saga table loaded");
    };
    let text = format!("{e:#}");
    for want in [
        "saga ledger starts on `Begin`, which it does not handle",
        "`order_id` is not a JSON path",
        "instance key for `Close`, which it does not handle",
        "`plugins.ledger.saga.not_found` must be `ignore` or `dead-letter`, found `drop`",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let path = write_pipeline(
        dir.path(),
        "keyless",
        r#"
    [plugins.ledger]
    wasm = "{dist}/ledger.wasm"
    events = ["Open", "Add"]
    [plugins.ledger.saga]
    starts = ["Open"]
    instance_keys = { Open = "$.id" }
"#,
    );
    let Err(e) = config::load(&path) else {
        panic!("a saga without an instance key for Add loaded");
    };
    let text = format!("{e:#}");
    assert!(
        text.contains("saga ledger does not say how `Add` finds its instance"),
        "{text}"
    );
}

fn step(instance: &str, read_version: u64) -> Step {
    Step {
        instance: instance.into(),
        read_version,
        message_id: switchyard::envelope::new_id(),
        message_type: "Add".into(),
        at_ms: switchyard::envelope::now_ms(),
        started_at_ms: 1,
        plugin_version: "1.0.0".into(),
        completed: false,
        changes: BTreeMap::new(),
        outputs: Vec::new(),
        timeouts: Vec::new(),
        fired: None,
    }
}

/// Steps that read the same version: one commits, the other is a conflict
/// and changes nothing, whichever store.
async fn conflicts_are_refused(store: &dyn Store) {
    let commit = |s: Step| {
        let mut changes = switchyard::state::Changes::default();
        changes.writes.insert(
            switchyard::saga::stored_key(&s.instance, "by"),
            Some(s.message_id.clone().into_bytes()),
        );
        store.commit("ledger", changes, vec![s], Vec::new())
    };
    commit(step("C-1", 0)).await.unwrap();
    let e = commit(step("C-1", 0)).await.unwrap_err();
    assert!(switchyard::saga::is_conflict(&e), "{e:#}");
    let second = step("C-1", 1);
    commit(second.clone()).await.unwrap();
    let e = commit(step("C-1", 1)).await.unwrap_err();
    assert!(switchyard::saga::is_conflict(&e), "{e:#}");
    let key = switchyard::saga::stored_key("C-1", "by");
    let (instance, by) = {
        let store_ref = store;
        (
            tokio::task::block_in_place(|| store_ref.instance("ledger", "C-1"))
                .unwrap()
                .unwrap(),
            tokio::task::block_in_place(|| store_ref.get("ledger", &key)).unwrap(),
        )
    };
    assert_eq!(instance.version, 2);
    assert_eq!(by, Some(second.message_id.into_bytes()));
    let steps = tokio::task::block_in_place(|| store.steps("ledger", "C-1")).unwrap();
    assert_eq!(steps.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_on_a_moved_instance_is_a_conflict_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = switchyard::state::sqlite::SqliteState::open(&dir.path().join("s.db")).unwrap();
    conflicts_are_refused(&store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_on_a_moved_instance_is_a_conflict_in_postgresql() {
    let schema = crate::state::schema();
    let store = switchyard::state::postgres::PostgresState::connect(
        "postgres://postgres@127.0.0.1:5432/test",
        &schema,
        "sagas",
    )
    .await
    .unwrap();
    conflicts_are_refused(&store).await;
    // Twenty hosts start one instance at the same moment: one wins.
    let store = std::sync::Arc::new(store);
    let starts: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .commit(
                        "ledger",
                        switchyard::state::Changes::default(),
                        vec![step("race", 0)],
                        Vec::new(),
                    )
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for start in starts {
        results.push(start.await);
    }
    let won = results.iter().filter(|r| matches!(r, Ok(Ok(())))).count();
    assert_eq!(won, 1);
    for r in results {
        if let Ok(Err(e)) = r {
            assert!(switchyard::saga::is_conflict(&e), "{e:#}");
        }
    }
    drop_schema(&schema).await;
}

/// A connection to the tests' PostgreSQL database.
pub(crate) async fn pg_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        "postgres://postgres@127.0.0.1:5432/test",
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

pub(crate) async fn drop_schema(schema: &str) {
    pg_client()
        .await
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Two hosts share a saga's queue on RabbitMQ, with PostgreSQL as the
/// store: both handle adds to the same ledgers at once. Every add counts
/// exactly once, whatever conflicts there were.
#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_never_both_win_a_step_on_rabbitmq_with_postgresql() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let schema = crate::state::schema();
    let (_, pipeline) = crate::amqp::pipeline(
        dir.path(),
        &format!(
            "prefetch = 20\n{}\n[state]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\n",
            ledger("dead-letter")
        ),
    );
    let transport = runtime::open(&pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    let ledgers: Vec<String> = (0..5).map(|i| format!("L-{i}")).collect();
    transport
        .enqueue(ledgers.iter().map(|l| open(l)).collect())
        .await
        .unwrap();
    crate::amqp::drain(&pipeline).await;
    let adds: Vec<Envelope> = (0..300i64)
        .map(|i| add(&ledgers[(i % 5) as usize], i))
        .collect();
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..300i64 {
        *want.entry(ledgers[(i % 5) as usize].clone()).or_default() += i;
    }
    transport.enqueue(adds).await.unwrap();
    tokio::join!(
        crate::amqp::drain_beside_another(&pipeline),
        crate::amqp::drain_beside_another(&pipeline)
    );
    // A batch given back by a conflict after one host stopped.
    crate::amqp::drain(&pipeline).await;

    assert!(dead_letters(&pipeline).await.is_empty());
    let store = switchyard::state::open(&pipeline.state, &pipeline.name)
        .await
        .unwrap();
    let got = tokio::task::spawn_blocking(move || {
        ledgers
            .iter()
            .map(|l| {
                let total = store
                    .get("ledger", &switchyard::saga::stored_key(l, "total"))
                    .unwrap()
                    .map(|v| String::from_utf8(v).unwrap().parse::<i64>().unwrap())
                    .unwrap_or_default();
                let version = store.instance("ledger", l).unwrap().unwrap().version;
                (l.clone(), (total, version))
            })
            .collect::<BTreeMap<_, _>>()
    })
    .await
    .unwrap();
    for (l, total) in want {
        // Each of its 60 adds is one step after the opening one.
        assert_eq!(got[&l], (total, 61), "{l}");
    }

    // A step dead-lettered on a broker marks its instance failed in the
    // store; the next step that succeeds makes it running again.
    let status = |id: &'static str| {
        let pipeline = pipeline.clone();
        async move {
            let store = switchyard::state::open(&pipeline.state, &pipeline.name)
                .await
                .unwrap();
            tokio::task::spawn_blocking(move || store.instance("ledger", id).unwrap().unwrap())
                .await
                .unwrap()
        }
    };
    transport
        .enqueue(vec![message(Kind::Event, "Reject", json!({ "id": "L-0" }))])
        .await
        .unwrap();
    // Drained until its dead letter is there: a drain ends when the
    // broker's counts and the routes look idle, which a loaded machine can
    // make look so a moment early.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        crate::amqp::drain(&pipeline).await;
        if !dead_letters(&pipeline).await.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(dead_letters(&pipeline).await.len(), 1);
    let l0 = status("L-0").await;
    assert_eq!((l0.status, l0.version), (Status::Failed, 61));
    assert_eq!(status("L-1").await.status, Status::Running);
    transport.enqueue(vec![add("L-0", 1)]).await.unwrap();
    crate::amqp::drain(&pipeline).await;
    let l0 = status("L-0").await;
    assert_eq!((l0.status, l0.version), (Status::Running, 62));
    drop_schema(&schema).await;
    crate::amqp::clean_up(&pipeline).await;
}

/// A saga's timeouts on the embedded store, driven by a test that moves
/// time forward instead of sleeping: a timeout fires once, into its
/// instance; one whose instance completed first never fires.
#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_fires_into_its_instance_when_time_is_advanced() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), "timeouts", &ledger("dead-letter"));
    let p = switchyard::testing::TestPipeline::start(&path)
        .await
        .unwrap();
    let half_an_hour = std::time::Duration::from_secs(1800);
    let mut ids = Vec::new();
    for m in [
        open("L-1"),
        add("L-1", 7),
        remind("L-1", half_an_hour),
        open("L-2"),
        remind("L-2", half_an_hour),
        close("L-2"),
    ] {
        ids.push(p.enqueue(m).await.unwrap());
    }
    for id in &ids {
        p.handled("ledger", id).await.unwrap();
    }
    let store = switchyard::state::sqlite::SqliteState::reader(match &p.pipeline().transport {
        config::TransportConfig::Embedded(e) => &e.path,
        _ => panic!("not embedded"),
    });
    let pending = store.timeouts("ledger", "L-1").unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].message_type, "Expire");
    // The completed instance's timeout is gone with it.
    assert!(store.timeouts("ledger", "L-2").unwrap().is_empty());
    // Not due yet: nothing fires.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(store.instance("ledger", "L-1").unwrap().unwrap().version, 3);

    p.advance_time(half_an_hour).await.unwrap();
    p.published("Expired", json!({ "id": "L-1", "total": 7 }))
        .await
        .unwrap();
    p.idle().await.unwrap();
    assert!(store.timeouts("ledger", "L-1").unwrap().is_empty());
    let steps = store.steps("ledger", "L-1").unwrap();
    assert_eq!(steps.len(), 4);
    assert_eq!(steps[3].message_type, "Expire");
    assert_eq!(steps[3].fired.as_deref(), Some(pending[0].id.as_str()));
    assert_eq!(steps[2].timeouts[0].id, pending[0].id);
    // L-2's timeout message (scheduled before L-2 completed) was dropped,
    // not handled and not dead-lettered.
    assert_eq!(store.instance("ledger", "L-2").unwrap().unwrap().version, 3);
    assert!(dead_letters(p.pipeline()).await.is_empty());

    // A timeout whose handling fails for good is dead-lettered, and no
    // longer pending.
    p.enqueue(open("L-3")).await.unwrap();
    let failing = message(
        Kind::Event,
        "Remind",
        json!({ "id": "L-3", "after_ms": 1_800_000u64, "fail": true }),
    );
    let failing_id = p.enqueue(failing).await.unwrap();
    p.handled("ledger", &failing_id).await.unwrap();
    let pending = store.timeouts("ledger", "L-3").unwrap();
    assert_eq!(pending.len(), 1);
    p.advance_time(half_an_hour).await.unwrap();
    let letter = p.dead_letter(&pending[0].id).await.unwrap();
    assert!(
        letter
            .error
            .details
            .contains(&("saga.instance".into(), "L-3".into()))
    );
    assert!(store.timeouts("ledger", "L-3").unwrap().is_empty());
    assert_eq!(
        store.instance("ledger", "L-3").unwrap().unwrap().status,
        Status::Failed
    );
    // Its replay goes to the instance though the timeout is forgotten: it
    // fails again here (the ledger's state says so), which it could not if
    // it were dropped.
    let replayed = p.enqueue(letter.replay_message()).await.unwrap();
    let settled_as = |id: &str| {
        p.settled()
            .into_iter()
            .filter(|s| s.message().id == id)
            .map(|s| matches!(s, switchyard::testing::Settled::DeadLettered { .. }))
            .collect::<Vec<bool>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while settled_as(&replayed).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the replay was not settled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Dead-lettered twice: the replay ran on the instance, not dropped.
    assert_eq!(settled_as(&replayed), [true, true]);
    assert_eq!(store.steps("ledger", "L-3").unwrap().len(), 2);
    p.stop().await.unwrap();
    // Everything was kept in the test's own store: nothing was written
    // beside the pipeline file.
    let beside: Vec<_> = std::fs::read_dir(dir.path().join(".switchyard"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(beside.is_empty(), "written beside the pipeline: {beside:?}");
}

/// On RabbitMQ with PostgreSQL, due timeouts are sent from the store by
/// whichever of two hosts claims them: each fires once.
#[tokio::test(flavor = "multi_thread")]
async fn timeouts_fire_once_from_postgresql_with_two_hosts_on_rabbitmq() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let schema = crate::state::schema();
    let (_, pipeline) = crate::amqp::pipeline(
        dir.path(),
        &format!(
            "{}\n[state]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\n",
            ledger("dead-letter")
        ),
    );
    let transport = runtime::open(&pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    let ledgers: Vec<String> = (0..10).map(|i| format!("T-{i}")).collect();
    transport
        .enqueue(ledgers.iter().map(|l| open(l)).collect())
        .await
        .unwrap();
    crate::amqp::drain(&pipeline).await;
    let mut reminders: Vec<Envelope> = ledgers
        .iter()
        .map(|l| remind(l, std::time::Duration::from_millis(500)))
        .collect();
    // One whose expiry fails for good: dead-lettered once, then forgotten.
    transport.enqueue(vec![open("T-F")]).await.unwrap();
    crate::amqp::drain(&pipeline).await;
    reminders.push(message(
        Kind::Event,
        "Remind",
        json!({ "id": "T-F", "after_ms": 500, "fail": true }),
    ));
    transport.enqueue(reminders).await.unwrap();
    let options = || runtime::RunOptions::quiet(runtime::RunMode::Serve);
    let a = crate::common::Running::start(&pipeline, options()).await;
    let b = crate::common::Running::start(&pipeline, options()).await;
    let store = switchyard::state::open(&pipeline.state, &pipeline.name)
        .await
        .unwrap();
    let versions = |store: std::sync::Arc<dyn Store>, ledgers: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            ledgers
                .iter()
                .map(|l| {
                    store
                        .instance("ledger", l)
                        .unwrap()
                        .map_or(0, |i| i.version)
                })
                .collect::<Vec<u64>>()
        })
        .await
        .unwrap()
    };
    crate::common::eventually(
        "every timeout handled",
        std::time::Duration::from_secs(30),
        || {
            let handled = versions(store.clone(), ledgers.clone());
            async move { handled.await.iter().all(|n| *n >= 3) }
        },
    )
    .await;
    // Two more polls of both hosts: nothing fires twice.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(versions(store.clone(), ledgers.clone()).await, vec![3; 10]);
    a.stop().await;
    b.stop().await;
    let pending = tokio::task::spawn_blocking(move || {
        (
            store.timeouts("ledger", "T-0").unwrap(),
            store.timeouts("ledger", "T-F").unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(pending.0.is_empty(), "{pending:?}");
    assert!(
        pending.1.is_empty(),
        "the dead-lettered timeout is forgotten: {pending:?}"
    );
    let letters = dead_letters(&pipeline).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].message.message_type, "Expire");
    drop_schema(&schema).await;
    crate::amqp::clean_up(&pipeline).await;
}

fn charge(id: &str, amount: i64) -> Envelope {
    message(Kind::Event, "Charge", json!({ "id": id, "amount": amount }))
}

/// A command a saga sent that fails for good comes back to the instance
/// that sent it as a fault, naming the command, the error and the dead
/// letter: the saga undoes what it did.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_command_comes_back_to_its_saga_as_a_fault() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), "faults", &ledger("dead-letter"));
    let p = switchyard::testing::TestPipeline::start(&path)
        .await
        .unwrap();
    p.enqueue(open("L-1")).await.unwrap();
    p.enqueue(charge("L-1", 50)).await.unwrap();
    p.published("Debited", json!({ "id": "L-1", "amount": 50 }))
        .await
        .unwrap();
    p.enqueue(charge("L-1", 500)).await.unwrap();
    let debit = p.sent("Debit", json!({ "amount": 500 })).await.unwrap();
    let letter = p.dead_letter(&debit.id).await.unwrap();
    assert_eq!(letter.route, "bank");
    let compensated = p
        .published("Compensated", json!({ "id": "L-1" }))
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&compensated.payload).unwrap();
    assert_eq!(body["code"], json!("insufficient-funds"));
    assert_eq!(body["dead_letter"], json!(letter.id));
    p.idle().await.unwrap();
    let store = switchyard::state::sqlite::SqliteState::reader(match &p.pipeline().transport {
        config::TransportConfig::Embedded(e) => &e.path,
        _ => panic!("not embedded"),
    });
    let state = instance_state(store.as_ref(), "L-1");
    assert_eq!(state.get("compensated"), Some(&json!("insufficient-funds")));
    assert_eq!(state.get("charged"), None);
    let steps = store.steps("ledger", "L-1").unwrap();
    let types: Vec<&str> = steps.iter().map(|s| s.message_type.as_str()).collect();
    assert_eq!(types, ["Open", "Charge", "Charge", "Debit.Fault"]);
    assert_eq!(steps[2].outputs[0].id, debit.id);
    p.stop().await.unwrap();
}

/// The same on RabbitMQ with PostgreSQL: the fault is published with the
/// dead-lettered command's settlement.
#[tokio::test(flavor = "multi_thread")]
async fn a_fault_comes_back_on_rabbitmq() {
    let _shared = crate::amqp::BROKER_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let schema = crate::state::schema();
    let (_, pipeline) = crate::amqp::pipeline(
        dir.path(),
        &format!(
            "{}\n[state]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\nschema = \"{schema}\"\n",
            ledger("dead-letter")
        ),
    );
    let transport = runtime::open(&pipeline).await.unwrap();
    transport.start_consuming().await.unwrap();
    transport.enqueue(vec![open("F-1")]).await.unwrap();
    crate::amqp::drain(&pipeline).await;
    transport.enqueue(vec![charge("F-1", 500)]).await.unwrap();
    crate::amqp::drain(&pipeline).await;
    let store = switchyard::state::open(&pipeline.state, &pipeline.name)
        .await
        .unwrap();
    let (state, version) = tokio::task::spawn_blocking(move || {
        (
            instance_state(store.as_ref(), "F-1"),
            store.instance("ledger", "F-1").unwrap().unwrap().version,
        )
    })
    .await
    .unwrap();
    assert_eq!(state.get("compensated"), Some(&json!("insufficient-funds")));
    assert_eq!(version, 3);
    let letters = dead_letters(&pipeline).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message.message_type, "Debit");
    drop_schema(&schema).await;
    crate::amqp::clean_up(&pipeline).await;
}

/// The example pipeline's fulfilment saga (`pipelines/orders.toml`): an
/// order that ships completes its instance; one no carrier takes is
/// refunded, released and cancelled through the fault of its `ShipOrder`;
/// one whose payment fails for good is released and cancelled when its
/// timeout passes, with nothing to refund.
#[tokio::test(flavor = "multi_thread")]
async fn the_example_fulfilment_saga_ships_or_undoes_each_order() {
    let path = crate::common::workspace_root()
        .join("pipelines")
        .join("orders.toml");
    let p = switchyard::testing::TestPipeline::start(&path)
        .await
        .unwrap();
    let order = |id: &str, quantity: u32, price: u64| {
        json!({"order_id": id, "customer": "ada",
               "items": [{"sku": "lamp", "quantity": quantity, "unit_price_cents": price}]})
    };

    p.send("PlaceOrder", order("S-1", 2, 1250)).await.unwrap();
    p.published(
        "OrderShipped",
        json!({"order_id": "S-1", "tracking": "SY-S-1"}),
    )
    .await
    .unwrap();

    p.send("PlaceOrder", order("S-2", 150, 1000)).await.unwrap();
    let ship = p
        .sent("ShipOrder", json!({"order_id": "S-2", "units": 150}))
        .await
        .unwrap();
    let letter = p.dead_letter(&ship.id).await.unwrap();
    assert_eq!(letter.error.code.as_deref(), Some("parcel-too-large"));
    p.sent(
        "RefundPayment",
        json!({"order_id": "S-2", "amount_cents": 150_000}),
    )
    .await
    .unwrap();
    p.sent("ReleaseStock", json!({"order_id": "S-2", "units": 150}))
        .await
        .unwrap();
    let cancel = p
        .sent("CancelOrder", json!({"order_id": "S-2"}))
        .await
        .unwrap();
    let reason: serde_json::Value = serde_json::from_slice(&cancel.payload).unwrap();
    let reason = reason["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("parcel-too-large") && reason.contains(&letter.id),
        "{reason}"
    );

    // Nothing to charge: the payment fails for good, and the saga waits
    // for its timeout with the stock reserved.
    p.send("PlaceOrder", order("S-3", 1, 0)).await.unwrap();
    let charge = p
        .sent("ChargePayment", json!({"order_id": "S-3"}))
        .await
        .unwrap();
    p.dead_letter(&charge.id).await.unwrap();
    let reserved = p
        .published("StockReserved", json!({"order_id": "S-3"}))
        .await
        .unwrap();
    p.handled("fulfilment", &reserved.id).await.unwrap();
    p.advance_time(std::time::Duration::from_secs(31))
        .await
        .unwrap();
    p.sent(
        "CancelOrder",
        json!({"order_id": "S-3", "reason": "not reserved and paid within 30 s"}),
    )
    .await
    .unwrap();
    p.sent("ReleaseStock", json!({"order_id": "S-3", "units": 1}))
        .await
        .unwrap();
    p.idle().await.unwrap();
    let store = switchyard::state::sqlite::SqliteState::reader(match &p.pipeline().transport {
        config::TransportConfig::Embedded(e) => &e.path,
        _ => panic!("not embedded"),
    });
    // Cancelled, but open for a payment still on its way until its grace
    // period is over.
    let s3 = store.instance("fulfilment", "S-3").unwrap().unwrap();
    assert_eq!(s3.status, Status::Running);
    assert_eq!(store.timeouts("fulfilment", "S-3").unwrap().len(), 1);
    p.advance_time(std::time::Duration::from_secs(601))
        .await
        .unwrap();
    p.idle().await.unwrap();
    let refunds: Vec<String> = p
        .settled()
        .iter()
        .filter_map(|s| match s {
            switchyard::testing::Settled::Handled { outputs, .. } => Some(outputs.clone()),
            _ => None,
        })
        .flatten()
        .filter(|o| o.message_type == "RefundPayment")
        .map(|o| String::from_utf8_lossy(&o.payload).into_owned())
        .collect();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert!(refunds[0].contains("S-2"), "{refunds:?}");

    let outcome = |id: &str| -> String {
        let key = switchyard::saga::stored_key(id, "outcome");
        serde_json::from_slice(&store.get("fulfilment", &key).unwrap().unwrap()).unwrap()
    };
    for id in ["S-1", "S-2", "S-3"] {
        let i = store.instance("fulfilment", id).unwrap().unwrap();
        assert_eq!(i.status, Status::Completed, "{id}");
    }
    assert_eq!(outcome("S-1"), "shipped");
    assert!(outcome("S-2").starts_with("cancelled: shipping failed for good (parcel-too-large)"));
    assert_eq!(
        outcome("S-3"),
        "cancelled: not reserved and paid within 30 s"
    );
    let steps = store.steps("fulfilment", "S-2").unwrap();
    let types: Vec<&str> = steps.iter().map(|s| s.message_type.as_str()).collect();
    assert_eq!(types.last(), Some(&"ShipOrder.Fault"), "{types:?}");
    p.stop().await.unwrap();
}
