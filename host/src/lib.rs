//! Switchyard: a host runtime that routes messages from brokers through
//! sandboxed WebAssembly component plugins.
//!
//! # The path of one message
//!
//! 1. A transport's `Subscription::receive` turns what the broker holds into
//!    [`transport::Delivery`]s: `transport::amqp::receive` and
//!    `transport::kafka::receive` read CloudEvents attributes
//!    (`transport::cloudevents::decode`); the embedded store reads its rows.
//!    What cannot be decoded still arrives, marked `malformed`.
//! 2. The route's loop, [`dispatch::run_route`], admits each one:
//!    [`dispatch::admit`] marks what breaks the limits of [`limits`] or is
//!    of a type the route does not take as `malformed`.
//! 3. [`dispatch::Worker::handle_batch`] runs each through the plugin:
//!    `Worker::attempt_all` calls `plugin::Instance::handle_traced` and
//!    retries at once where [`recover::RetryPolicy::decide`] says so; a
//!    malformed delivery is dead-lettered without reaching the plugin.
//! 4. `dispatch::plan` turns each verdict into outputs, a delayed retry or
//!    a dead letter; `dispatch::commit` writes the dead letters first.
//! 5. `Subscription::settle` stores the outputs and removes the input: in
//!    one transaction on the embedded store; on a broker, outputs are
//!    published and confirmed before the input is acknowledged (at least
//!    once). What fails is received again; what a broker refuses for good
//!    comes back as [`transport::Refused`] and is dead-lettered.
//!
//! # Modules, from the top down
//!
//! A module uses only modules below it (`host/tests/all/layers.rs` fails
//! on any use that goes up, and on any cycle).
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the `switchyard` command line |
//! | `testing` | whole pipelines in-process for integration tests (feature `testing`) |
//! | [`runtime`] | loading a pipeline's plugins, starting its transport, stores, routes and admin listener, and stopping them |
//! | [`ingress`] | the HTTP ingress: requests to commands and events, replies back (`[ingress]`) |
//! | [`admin`] | the admin HTTP listener: `/metrics`, `/healthz`, `/plugins`, and the console's routes |
//! | [`console`] | the web console at `/ui`: sessions, CSRF, the overview, dead letters, message journeys, plugins |
//! | [`fleet`] | deploys to a fleet (`[fleet]`): the desired versions in PostgreSQL, a host following them and reporting what it runs |
//! | [`supervisor`] | the route supervisor: one route per plugin, and every change to a running host (swaps, pipeline edits, deploys, rollbacks, the file watcher) |
//! | [`dispatch`] | one route: the loop (`mod.rs`), the worker and its immediate retries (`worker.rs`), lanes of a route with `concurrency` above 1 (`lanes.rs`), a saga message's instance and step (`saga.rs`), verdicts to durable steps (`plan.rs`), the order of writes (`commit.rs`), the versions a route runs (`version.rs`) |
//! | `crash_loop` | the crash-loop guard: messages in hand when the host died |
//! | [`story`] | the story of a message or flow, from the journal and the dead-letter store (`why`, the console) |
//! | [`dlq`] | the dead-letter store (SQLite or PostgreSQL): record, list, group, replay, resolve |
//! | [`transport`] | the [`transport::Transport`] contract; the embedded SQLite transport, RabbitMQ and Kafka; CloudEvents bindings |
//! | [`journal`] | the record of every handling of a message (SQLite or PostgreSQL), which `switchyard why` reads |
//! | `schemas` | JSON Schema contracts of payloads |
//! | [`plugin`] | wasmtime engine, compile cache, sandbox, host imports, deadline-bounded waits, contract checks |
//! | [`state`] | plugin state: what a call reads (store, batch, call), what it changed, the SQLite and PostgreSQL stores |
//! | `pg` | PostgreSQL connections of the host's own stores, with TLS |
//! | [`telemetry`] | traces (OpenTelemetry), metrics, logging |
//! | [`limits`] | the size and shape limits of a message arriving from outside |
//! | [`config`] | pipeline TOML → validated, I/O-free [`config::Pipeline`]; every error at once |
//! | [`saga`] | sagas: how a message finds its instance, instances and their steps, conflicts |
//! | [`envelope`] | the transport-neutral message, its attempt history, the host's own headers |
//! | [`recover`] | failure kinds, the retry policy, backoff, fingerprints |
//! | `text`, `files`, `json_diff`, `pem` | leaves: outside text made safe to log, private files, JSON differences, PEM certificates for TLS |

pub mod admin;
pub mod cli;
pub mod config;
pub mod console;
mod crash_loop;
pub mod dispatch;
pub mod dlq;
pub mod envelope;
mod files;
pub mod fleet;
pub mod ingress;
pub mod journal;
mod json_diff;
pub mod limits;
mod pem;
mod pg;
pub mod plugin;
pub mod recover;
pub mod runtime;
pub mod saga;
mod schemas;
pub mod state;
pub mod story;
pub mod supervisor;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
mod text;
pub mod transport;
