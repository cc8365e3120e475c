//! At-least-once on Kafka: the shared reliability runs.

use crate::kafka::pipeline;
use crate::reliability::{BATCH, Broker};

const KAFKA: Broker = Broker {
    name: "kafka",
    pipeline,
    batch_key: "batch_size",
    // The batch in hand, and the one before it if its commit had not
    // reached the cluster yet.
    duplicates_per_kill: 2 * BATCH,
};

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_nothing() {
    crate::reliability::sigkill_at_random_points(&KAFKA).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_host_finishes_the_work_of_a_killed_one() {
    crate::reliability::second_host_takes_over(&KAFKA).await;
}
