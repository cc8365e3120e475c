//! Pipelines on each transport, each on names of its own.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use switchyard::config::{self, Pipeline};

use crate::common::write_pipeline;
use crate::reliability::{BATCH, Broker};

fn load(dir: &Path, name: &str, toml: &str) -> (PathBuf, Pipeline) {
    let path = write_pipeline(dir, name, toml);
    let pipeline = config::load(&path).unwrap().pipeline;
    (path, pipeline)
}

pub fn embedded_pipeline(dir: &Path, body: &str) -> (PathBuf, Pipeline) {
    load(
        dir,
        "embedded",
        &format!(
            "[host]\ncache_dir = \"{{cache}}\"\n[admin]\nlisten = \"off\"\n[transport]\nsync = \"normal\"\n{body}"
        ),
    )
}

pub fn amqp_pipeline(dir: &Path, body: &str) -> (PathBuf, Pipeline) {
    let exchange = format!("switchyard-chaos.{}", switchyard::envelope::new_id());
    load(
        dir,
        "rabbit",
        &format!(
            "[host]\ncache_dir = \"{{cache}}\"\n[admin]\nlisten = \"off\"\n[transport]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1:5672/%2f\"\nexchange = \"{exchange}\"\nconnect_timeout = \"5s\"\n{body}"
        ),
    )
}

/// librdkafka's mock cluster, one per test binary.
fn kafka_servers() -> String {
    static SERVERS: OnceLock<String> = OnceLock::new();
    SERVERS
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let cluster = rdkafka::mocking::MockCluster::new(3).expect("mock Kafka cluster");
                tx.send(cluster.bootstrap_servers()).expect("send address");
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("mock cluster address")
        })
        .clone()
}

pub fn kafka_pipeline(dir: &Path, body: &str) -> (PathBuf, Pipeline) {
    let id = switchyard::envelope::new_id();
    load(
        dir,
        "kafka",
        &format!(
            "[host]\ncache_dir = \"{{cache}}\"\n[admin]\nlisten = \"off\"\n[transport]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\ntopic_prefix = \"t{id}.\"\ngroup_prefix = \"g{id}\"\npartitions = 3\ncreate_topics = false\ntimeout = \"20s\"\n{body}",
            kafka_servers()
        ),
    )
}

pub const EMBEDDED: Broker = Broker {
    name: "embedded",
    pipeline: embedded_pipeline,
    batch_key: "batch_size",
    // The batch in hand when the host died.
    duplicates_per_kill: BATCH,
    joined: None,
};

pub const RABBITMQ: Broker = Broker {
    name: "amqp",
    pipeline: amqp_pipeline,
    batch_key: "prefetch",
    duplicates_per_kill: BATCH,
    joined: None,
};

pub const KAFKA: Broker = Broker {
    name: "kafka",
    pipeline: kafka_pipeline,
    batch_key: "batch_size",
    duplicates_per_kill: 2 * BATCH,
    joined: Some("Partitions assigned"),
};

/// Removes a RabbitMQ pipeline's exchange and queues.
pub async fn clean_up_amqp(p: &Pipeline) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let config::TransportConfig::Amqp(amqp) = &p.transport else {
        return;
    };
    let Ok(c) = lapin::Connection::connect(
        "amqp://127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    else {
        return;
    };
    let Ok(ch) = c.create_channel().await else {
        return;
    };
    let name = |s: String| lapin::types::ShortString::try_new(s).unwrap();
    for plugin in &p.plugins {
        let queue = format!("{}.{}", amqp.exchange, plugin.name);
        let _ = ch
            .queue_delete(name(queue.clone()), QueueDeleteOptions::default())
            .await;
        for level in 1..=plugin.retry.delayed {
            let _ = ch
                .queue_delete(
                    name(format!("{queue}.retry.{level}")),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = ch
        .exchange_delete(
            name(amqp.exchange.clone()),
            ExchangeDeleteOptions::default(),
        )
        .await;
}
