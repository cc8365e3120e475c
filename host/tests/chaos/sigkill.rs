//! SIGKILL at random points, run after run, on every transport.

use crate::brokers::{EMBEDDED, KAFKA, RABBITMQ};
use crate::reliability::{Broker, sigkill_run};

async fn runs_of(broker: &Broker) {
    let _one = crate::one_at_a_time().await;
    let (runs, messages) = (crate::runs(), crate::messages());
    let mut duplicates = Vec::new();
    let mut seconds = Vec::new();
    for _ in 0..runs {
        let (pipeline, run) = sigkill_run(broker, messages).await;
        crate::brokers::clean_up_amqp(&pipeline).await;
        duplicates.push(run.duplicates);
        seconds.push(run.took.as_secs());
    }
    crate::report(
        "SIGKILL x3 per run",
        broker.name,
        &format!(
            "{runs} runs x {messages} messages: 0 lost; duplicates per run {duplicates:?} (max {}); seconds per run {seconds:?}",
            duplicates.iter().max().copied().unwrap_or(0)
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_on_the_embedded_transport() {
    runs_of(&EMBEDDED).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_on_rabbitmq() {
    runs_of(&RABBITMQ).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn sigkill_on_kafka() {
    runs_of(&KAFKA).await;
}
