//! Pipeline files: TOML in, a validated, I/O-free [`Pipeline`] out.
//!
//! Loading is staged, one stage per place:
//!
//! 1. text: [`load()`] reads the file and hands its text to [`parse()`],
//!    which makes a TOML document of it;
//! 2. `reader`: each table is read key by key, a wrong type or an unknown
//!    key becoming a [`Diagnostic`] with its place in the file;
//! 3. `parse`: one parser per section (`[pipeline]`, `[transport]`,
//!    `[host]` and `[admin]`, `[defaults]` and `retry` tables,
//!    `[dead_letters]`, `[telemetry]`, `[schemas]`, `[plugins]` and their
//!    grants) checks every value, then the rules that span plugins are
//!    checked (one handler per command, one kind per type);
//! 4. `model`: the validated [`Pipeline`], made only when no error was
//!    found.
//!
//! The pipeline file's JSON Schema ([`schema::generate`]) is made from
//! what the reader asks for, by parsing example files with the reader's
//! shape recorder on; `schemas/pipeline.schema.json` is its published copy.
//!
//! Every problem is reported at once. Checking the plugins' own
//! declarations needs their `.wasm` files and happens later, in the
//! `plugin` module. Passwords in connection strings are masked by
//! [`redact()`] wherever one is shown.

mod diagnostic;
mod load;
mod model;
mod names;
mod origin;
mod parse;
mod reader;
mod redact;
pub mod schema;

pub use diagnostic::{Diagnostic, Diagnostics, Severity, locate};
pub use load::{ConfigError, Loaded, load};
pub use model::{
    AmqpConfig, DEFAULT_ADMIN_LISTEN, DEFAULT_AMQP_URL, DEFAULT_BATCH_SIZE, DEFAULT_CONTENT_TYPE,
    DEFAULT_CRASH_LOOP_LIMIT, DEFAULT_JOURNAL_MAX_PAYLOAD, DEFAULT_JOURNAL_MAX_RECORDS,
    DEFAULT_JOURNAL_RETENTION, DEFAULT_KAFKA_SERVERS, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_OUTPUTS, DEFAULT_MAX_REPLAYS, DEFAULT_MEMORY, DEFAULT_POLL_INTERVAL,
    DEFAULT_RECYCLE_AFTER, DEFAULT_TIMEOUT, DEFAULT_WATCH_INTERVAL, DeadLetterConfig, DirGrant,
    EmbeddedConfig, FleetConfig, Grants, IngressConfig, IngressTls, JournalConfig,
    KAFKA_RESERVED_PROPERTIES, KafkaConfig, Limits, MAX_HISTORY, Pipeline, PluginSpec, StateConfig,
    StoreConfig, TelemetryConfig, TraceExport, TransportConfig, UrlSource,
};
pub use names::{MessageType, PluginName, format_size, parse_duration, parse_size};
pub use origin::{Origin, Scheme};
pub use parse::parse;
pub use redact::{KeyValuePart, key_values, redact};
