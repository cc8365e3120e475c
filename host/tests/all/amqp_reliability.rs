//! At-least-once on RabbitMQ: the shared reliability runs, and a broker
//! restart in the middle of a run.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::amqp::{BROKER_IN_USE, RABBITMQ, clean_up};
use crate::reliability::{
    BATCH, MESSAGES, check_all_handled, distinct, enqueue_ticks, host, lines, tally,
    tally_pipeline, wait_until,
};

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_nothing() {
    let _broker = BROKER_IN_USE.read().await;
    let p = crate::reliability::sigkill_at_random_points(&RABBITMQ).await;
    clean_up(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_host_finishes_the_work_of_a_killed_one() {
    let _broker = BROKER_IN_USE.read().await;
    let p = crate::reliability::second_host_takes_over(&RABBITMQ).await;
    clean_up(&p).await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("rabbitmqctl runs (the test restarts the local RabbitMQ)");
    assert!(status.success(), "rabbitmqctl {args:?}: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_mid_run_loses_nothing() {
    // Every other broker test waits while RabbitMQ is down.
    let _broker = BROKER_IN_USE.write().await;
    let dir = tempfile::tempdir().unwrap();
    let (path, p) = tally_pipeline(&RABBITMQ, dir.path());
    let ids = enqueue_ticks(&p, MESSAGES / 2).await;
    let log = tally(dir.path());

    let mut h = host(&path, &[]);
    wait_until("progress", &mut [&mut h], Duration::from_secs(120), || {
        lines(&log).len() >= 1000
    });
    rabbitmqctl(&["stop_app"]);
    let at_stop = lines(&log).len();
    std::thread::sleep(Duration::from_secs(1));
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    wait_until(
        "the host to reconnect and finish",
        &mut [&mut h],
        Duration::from_secs(180),
        || distinct(&[&log]) >= ids.len(),
    );
    h.kill().unwrap();
    h.wait().unwrap();
    let duplicates = check_all_handled(&ids, &lines(&log));
    eprintln!(
        "amqp broker restart: stopped after {at_stop} of {} handled; all handled after reconnecting, {duplicates} twice",
        ids.len()
    );
    assert!(at_stop < ids.len(), "the run ended before the restart");
    assert!(duplicates <= BATCH, "{duplicates} duplicates");
    clean_up(&p).await;
}
