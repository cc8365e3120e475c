//! The chaos suite: hosts killed at random points on every transport,
//! RabbitMQ restarted and PostgreSQL stopped in the middle of a run, the
//! embedded store's disk full, and plugins that misbehave every way they
//! can while another route's throughput is measured. Every scenario counts
//! what was handled (none may be lost) and prints what it saw as `CHAOS`
//! lines; docs/reliability.md holds the figures of a full run.
//!
//! The scenarios stop and start the local RabbitMQ and PostgreSQL and mount
//! a small tmpfs, so they are left out of `cargo test` (ignored) and run one
//! at a time, as root, by `cargo xtask chaos` (`.ci/run` runs it). The size
//! comes from the environment: `CHAOS_RUNS` (default 1) runs of
//! `CHAOS_MESSAGES` (default 2,000) messages each; `cargo xtask chaos
//! --full` runs 10 of 20,000.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// Shared with the main suite; each binary uses a part of them.
#[allow(dead_code)]
#[path = "../all/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../all/reliability.rs"]
mod reliability;

mod brokers;
mod disk_full;
mod outages;
mod plugins;
mod sigkill;

/// One scenario at a time: they share the services they stop.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// `CHAOS_RUNS`.
pub fn runs() -> usize {
    env_number("CHAOS_RUNS", 1)
}

/// `CHAOS_MESSAGES`.
pub fn messages() -> usize {
    env_number("CHAOS_MESSAGES", 2_000)
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Prints one line of figures, for docs/reliability.md.
pub fn report(scenario: &str, transport: &str, figures: &str) {
    eprintln!("CHAOS | {scenario} | {transport} | {figures}");
}
