//! At-least-once on Kafka: the shared reliability runs.

use crate::kafka::KAFKA;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_nothing() {
    crate::reliability::sigkill_at_random_points(&KAFKA).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_host_finishes_the_work_of_a_killed_one() {
    crate::reliability::second_host_takes_over(&KAFKA).await;
}
