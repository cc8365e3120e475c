//! Integration tests of the host against real compiled plugin components and
//! the real embedded store. One test binary (faster to link), one module per
//! concern. Plugins come from `dist/plugins/`, built by
//! `cargo xtask build-plugins` (which `cargo xtask test` runs first).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod amqp;
mod amqp_reliability;
mod broker_contract;
mod cli;
mod common;
mod concurrency;
mod config_fixtures;
mod console;
mod contract;
mod dead_letters;
mod dlq_store;
mod durability;
mod fleet;
mod hot_reload;
mod http_out;
mod ingress;
mod journal;
mod kafka;
mod kafka_reliability;
mod layers;
mod loading;
mod new_project;
mod outbox;
mod polyglot;
mod reliability;
mod sagas;
mod sandbox;
mod schemas;
mod state;
mod telemetry;
mod transport;
