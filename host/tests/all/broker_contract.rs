//! What every broker transport must do, written once and run on each (as
//! `dlq_store.rs` does for the two dead-letter stores): the RabbitMQ and
//! Kafka test files call these with their [`Broker`], and add what only
//! their broker has to show.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard::config::Pipeline;
use switchyard::envelope::Kind;
use switchyard::runtime::{self, RunMode};
use switchyard::transport::Transport;

use crate::common::{dead_letters, message, misbehave};
use crate::reliability::Broker;

/// Commands and events reach the routes that take them, each once, and a
/// drained host leaves nothing behind. `queued` sees the broker right
/// after the messages were enqueued, before any host ran.
pub async fn commands_and_events_flow(
    broker: &Broker,
    dir: &Path,
    queued: impl AsyncFnOnce(&Pipeline, &dyn Transport),
    drain: impl AsyncFnOnce(&Pipeline),
) -> Pipeline {
    std::fs::create_dir(dir.join("out")).unwrap();
    let (_, p) = (broker.pipeline)(
        dir,
        r#"
        [defaults.retry]
        immediate = 0
        delayed = 0
        [plugins.rogue]
        wasm = "{dist}/rogue.wasm"
        commands = ["Misbehave", "Sent"]
        [plugins.tally]
        wasm = "{dist}/tally.wasm"
        events = ["Published", "Tick"]
        grants = { dirs = [{ host = "out", guest = "/out", writable = true }] }
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let tick = message(Kind::Event, "Tick", json!(1));
    let stored = transport
        .enqueue(vec![misbehave("publish"), misbehave("ok"), tick.clone()])
        .await
        .unwrap();
    assert_eq!(stored, 3, "one delivery per destination route");
    queued(&p, &*transport).await;

    drain(&p).await;

    let tally = std::fs::read_to_string(dir.join("out").join("tally.log")).unwrap();
    let ids: Vec<&str> = tally.lines().collect();
    assert_eq!(
        ids.len(),
        2,
        "the Tick and the event `publish` made: {tally}"
    );
    assert!(ids.contains(&tick.id.as_str()));
    assert!(dead_letters(&p).await.is_empty());
    assert!(transport.is_idle().await.unwrap());
    p
}

/// A requester's inbox gets the reply to its command once a host runs,
/// within `within`; before that, a wait times out with nothing.
pub async fn a_reply_reaches_the_requester_and_a_missing_one_times_out(
    broker: &Broker,
    dir: &Path,
    within: Duration,
) -> Pipeline {
    let (_, p) = (broker.pipeline)(
        dir,
        r#"
        [plugins.echo]
        wasm = "{dist}/echo.wasm"
        commands = ["Echo"]
        events = ["Tick"]
        retry = { delayed = 0 }
        "#,
    );
    let transport = runtime::open(&p).await.unwrap();
    transport.start_consuming().await.unwrap();
    let mut inbox = transport.reply_inbox().await.unwrap();
    let mut cmd = message(Kind::Command, "Echo", json!({"hello": broker.name}));
    cmd.reply_to = Some(inbox.address().to_owned());
    cmd.correlation_id = Some(format!("corr-{}", broker.name));
    transport.enqueue(vec![cmd.clone()]).await.unwrap();
    assert!(
        inbox
            .wait(&cmd.id, Duration::from_millis(300))
            .await
            .unwrap()
            .is_none(),
        "no host runs yet"
    );

    // A host comes up and handles the waiting command.
    let plugins = runtime::load_plugins(&p).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let host_pipeline = p.clone();
    let host = tokio::spawn(async move {
        runtime::run(&host_pipeline, plugins, RunMode::Serve, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let reply = inbox.wait(&cmd.id, within).await.unwrap().expect("a reply");
    assert_eq!(reply.payload, cmd.payload);
    assert_eq!(reply.in_reply_to, cmd.id);
    assert_eq!(reply.correlation_id, format!("corr-{}", broker.name));
    let _ = stop_tx.send(());
    host.await.unwrap().unwrap();
    p
}
