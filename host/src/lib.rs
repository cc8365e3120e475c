//! Switchyard: a host runtime that routes messages from brokers through
//! sandboxed WebAssembly component plugins.
//!
//! Data flows one way — transport → dispatch → plugin → outbox → transport —
//! and each module owns one concern:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | pipeline TOML → validated, I/O-free [`config::Pipeline`]; every error at once |
//! | [`envelope`] | the transport-neutral message |
//! | [`files`] | files the host creates for itself, private to its user |
//! | [`limits`] | the size and shape limits of a message arriving from outside |
//! | [`text`] | outside text made safe to log and store (`clip`) |
//! | [`transport`] | the [`transport::Transport`] contract and the embedded SQLite transport |
//! | [`plugin`] | wasmtime engine, compile cache, sandbox, host imports, contract checks |
//! | [`crash_loop`] | the crash-loop guard: messages in hand when the host died |
//! | [`dispatch`] | the per-route loop: receive → invoke → outbox → settle |
//! | [`recover`] | failure classification, retry policy, backoff, fingerprints |
//! | [`dlq`] | the dead-letter store (SQLite or PostgreSQL): record, list, group, replay, resolve |
//! | [`runtime`] | loading a pipeline's plugins and running its routes |
//! | [`telemetry`] | traces (OpenTelemetry), metrics, logging |
//! | [`admin`] | the admin HTTP listener: `/metrics`, `/healthz` |
//! | [`testing`] | whole pipelines in-process for integration tests, with deadlines |
//! | [`cli`] | the `switchyard` command line |

pub mod admin;
pub mod cli;
pub mod config;
pub mod crash_loop;
pub mod dispatch;
pub mod dlq;
pub mod envelope;
pub mod files;
pub mod limits;
pub mod plugin;
pub mod recover;
pub mod reload;
pub mod runtime;
pub mod schemas;
pub mod telemetry;
pub mod testing;
pub mod text;
pub mod transport;
