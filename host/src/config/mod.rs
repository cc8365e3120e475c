//! Pipeline files: TOML in, a validated, I/O-free [`Pipeline`] out.
//!
//! Loading happens in two stages. [`parse`] reads the TOML key by key
//! ([`reader`]), checks every value and the rules that span plugins (one
//! handler per command, one kind per type) and reports every problem at once
//! as [`Diagnostic`]s with their place in the file. Checking the plugins'
//! own declarations needs their `.wasm` files and happens later, in
//! [`crate::plugin`].

mod diagnostic;
mod names;
mod reader;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diagnostic::{Diagnostic, Diagnostics, Severity, locate};
pub use names::{MessageType, PluginName, format_size, parse_duration, parse_size};
use reader::{Section, Spanned, quote_list};

use crate::envelope::Kind;
use crate::recover::{FailureKind, RetryPolicy};

/// Per-plugin memory cap when the pipeline sets none. Enough for typical
/// handlers written in Rust, Go or JavaScript; small enough that a runaway
/// plugin cannot starve the host.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Per-message CPU deadline when the pipeline sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// A warm instance is replaced after this many messages, so state or memory
/// a plugin leaks between messages cannot grow without bound.
pub const DEFAULT_RECYCLE_AFTER: u64 = 10_000;
/// Most messages one handler call may emit; a plugin stuck in an emit loop
/// must not exhaust the host's memory.
pub const DEFAULT_MAX_OUTPUTS: u64 = 1_000;
/// Messages the embedded transport reads and settles per transaction.
pub const DEFAULT_BATCH_SIZE: u64 = 256;
/// How often an idle embedded consumer looks for messages written by another
/// process (such as `switchyard send`).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Wasm linear memory is 32-bit: 4 GiB is the most any plugin can use.
const MAX_MEMORY: u64 = 4 << 30;
const MIN_MEMORY: u64 = 1 << 20;
const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The most `[host] max_message_size` may allow: a plugin's whole output
/// for one message is capped at 64 MiB.
const MAX_MESSAGE_SIZE: u64 = 64 << 20;
/// Crashes in a row with a message in hand before it is dead-lettered.
pub const DEFAULT_CRASH_LOOP_LIMIT: u32 = 3;

/// A validated pipeline: what to run and how. Paths are absolute.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub name: String,
    /// The file it was read from.
    pub source: PathBuf,
    pub transport: TransportConfig,
    /// Where compiled components are cached; `None` means the user's cache
    /// directory.
    pub cache_dir: Option<PathBuf>,
    pub dead_letters: DeadLetterConfig,
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Where the admin HTTP listener (`/metrics`, `/healthz`) binds; `None`
    /// when turned off.
    pub admin: Option<SocketAddr>,
    /// The environment variable holding the bearer token that the admin
    /// API's changing endpoints (deploy, rollback) require; `None` turns
    /// them off.
    pub admin_token_env: Option<String>,
    /// `[host] watch`: reload plugins and this file when they change.
    pub watch: bool,
    /// How often watched files are looked at.
    pub watch_interval: Duration,
    /// Where the host keeps state of its own (deployed plugin versions,
    /// the messages in hand when it last stopped).
    pub state_dir: PathBuf,
    /// `[host] max_message_size`: the largest payload a message may have,
    /// arriving or emitted by a plugin.
    pub max_message_size: u64,
    /// `[host] crash_loop_limit`: a message in hand when the host died this
    /// many times in a row is dead-lettered (`crash-loop`) instead of being
    /// handled again.
    pub crash_loop_limit: u32,
    /// `[schemas]`: the JSON Schema file each message type's payload must
    /// match when a plugin publishes or sends it.
    pub schemas: BTreeMap<MessageType, PathBuf>,
    pub plugins: Vec<PluginSpec>,
}

/// How often `--watch` looks at the pipeline file and its plugins.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The admin listener's default: localhost only, on the port OpenTelemetry
/// uses for Prometheus exporters.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Where failed messages go and how often they may be replayed.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetterConfig {
    pub store: DeadLetterStoreConfig,
    /// The loop guard: a record replayed this many times is not replayed
    /// again without `--force`.
    pub max_replays: u32,
    /// Also publish each dead-lettered message, with its error context as
    /// headers, to a destination on the broker: `<queue>.dlq` (RabbitMQ) or
    /// `<topic>.dlq` (Kafka).
    pub broker: bool,
}

/// The dead-letter store.
#[derive(Clone, Debug, PartialEq)]
pub enum DeadLetterStoreConfig {
    /// A SQLite file (by default the embedded transport's own store).
    Embedded { path: PathBuf },
    /// A PostgreSQL database shared by several hosts.
    Postgres { url: UrlSource, schema: String },
}

/// Where a connection URL comes from: written in the file, or read from an
/// environment variable when the store is opened (keeps passwords out of
/// pipeline files).
#[derive(Clone, Debug, PartialEq)]
pub enum UrlSource {
    Literal(String),
    Env(String),
}

/// Replays of one record before the loop guard stops it.
pub const DEFAULT_MAX_REPLAYS: u32 = 3;
#[derive(Clone, Debug, PartialEq)]
pub enum TransportConfig {
    Embedded(EmbeddedConfig),
    Amqp(AmqpConfig),
    Kafka(KafkaConfig),
}

/// Settings of the Kafka transport.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaConfig {
    /// `host:port,host:port`.
    pub bootstrap_servers: String,
    /// Prepended to every topic name: `<prefix><MessageType>`.
    pub topic_prefix: String,
    /// Each route consumes in the group `<group_prefix>.<route>`.
    pub group_prefix: String,
    /// Partitions of the topics the host creates.
    pub partitions: i32,
    /// Replication factor of the topics the host creates.
    pub replication_factor: i32,
    /// Whether the host creates missing topics (otherwise it only checks
    /// that they exist, which on a cluster that auto-creates topics creates
    /// them with the cluster's defaults).
    pub create_topics: bool,
    /// Messages a route handles before it settles.
    pub batch_size: usize,
    /// How long to wait for the cluster (metadata, topic creation, commits).
    pub timeout: Duration,
    /// librdkafka `security.protocol`.
    pub security_protocol: String,
    /// librdkafka `sasl.mechanism`, when SASL is used.
    pub sasl_mechanism: Option<String>,
    /// Environment variables holding the SASL user name and password.
    pub sasl_username_env: Option<String>,
    pub sasl_password_env: Option<String>,
    /// CA certificate file for TLS.
    pub ssl_ca_location: Option<PathBuf>,
    /// Further librdkafka settings, passed as they are.
    pub properties: Vec<(String, String)>,
}

/// The librdkafka settings the transport owns: they carry its delivery
/// guarantees, so `[transport.properties]` cannot change them.
pub const KAFKA_RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "isolation.level",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
];

/// Settings of the RabbitMQ (AMQP 0-9-1) transport.
#[derive(Clone, Debug, PartialEq)]
pub struct AmqpConfig {
    /// Where the broker URL comes from (it may hold a password).
    pub url: UrlSource,
    /// Unacknowledged deliveries per route; also the most messages one
    /// route handles per batch.
    pub prefetch: u16,
    /// The topic exchange messages are published to.
    pub exchange: String,
    pub connect_timeout: Duration,
}

/// The content type assumed for a message that does not name one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// The broker URL when the pipeline names none: a local RabbitMQ with its
/// default user.
pub const DEFAULT_AMQP_URL: &str = "amqp://127.0.0.1:5672/%2f";

/// The Kafka cluster when the pipeline names none.
pub const DEFAULT_KAFKA_SERVERS: &str = "127.0.0.1:9092";

/// Settings of the embedded, on-disk transport.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddedConfig {
    /// The SQLite database file.
    pub path: PathBuf,
    /// `true`: every commit reaches the disk before it counts (survives power
    /// loss). `false`: commits survive a crash of the host process but not of
    /// the machine.
    pub fsync: bool,
    pub batch_size: usize,
    pub poll_interval: Duration,
}

/// One plugin of a pipeline and the route that feeds it.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginSpec {
    pub name: PluginName,
    pub wasm: PathBuf,
    /// Command types routed to this plugin; it is their only handler.
    pub commands: Vec<MessageType>,
    /// Event types this plugin consumes.
    pub events: Vec<MessageType>,
    pub limits: Limits,
    pub retry: RetryPolicy,
    pub grants: Grants,
}

impl PluginSpec {
    /// Every type routed to this plugin, with its kind.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&MessageType, Kind)> {
        self.commands
            .iter()
            .map(|t| (t, Kind::Command))
            .chain(self.events.iter().map(|t| (t, Kind::Event)))
    }
}

/// Resource limits of one plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Linear memory cap in bytes; growing past it traps.
    pub memory: u64,
    /// CPU deadline for one `handle` call.
    pub timeout: Duration,
    /// Messages a warm instance handles before it is replaced.
    pub recycle_after: u64,
    /// Messages one `handle` call may emit.
    pub max_outputs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: DEFAULT_MEMORY,
            timeout: DEFAULT_TIMEOUT,
            recycle_after: DEFAULT_RECYCLE_AFTER,
            max_outputs: DEFAULT_MAX_OUTPUTS,
        }
    }
}

/// What a plugin may reach beyond its own memory. Nothing by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Grants {
    /// Environment variables with fixed values.
    pub env: Vec<(String, String)>,
    /// Host environment variables passed through by name (when set).
    pub inherit_env: Vec<String>,
    pub dirs: Vec<DirGrant>,
    /// Real wall and monotonic clocks; without it both read zero.
    pub clock: bool,
    /// The host's stdout and stderr; without it plugin output is discarded.
    pub stdio: bool,
    /// Addresses the plugin may connect to over TCP.
    pub network: Vec<SocketAddr>,
}

/// A host directory made visible to a plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct DirGrant {
    pub host: PathBuf,
    /// Absolute path inside the plugin, e.g. `/data`.
    pub guest: String,
    pub writable: bool,
}

/// Why a pipeline file could not be used.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    Invalid {
        path: PathBuf,
        source: String,
        diagnostics: Diagnostics,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => {
                write!(f, "cannot read pipeline {}: {error}", path.display())
            }
            ConfigError::Invalid {
                path,
                source,
                diagnostics,
            } => {
                let shown = path.display().to_string();
                for d in diagnostics.iter() {
                    writeln!(f, "{}", d.render(&shown, source))?;
                }
                let n = diagnostics.error_count();
                write!(
                    f,
                    "pipeline {shown} has {n} error{}",
                    if n == 1 { "" } else { "s" }
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// A parsed pipeline with its warnings.
#[derive(Debug)]
pub struct Loaded {
    pub pipeline: Pipeline,
    pub warnings: Vec<Diagnostic>,
    /// The file's text, to render warnings against.
    pub text: String,
}

/// Reads and validates a pipeline file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let (pipeline, diagnostics) = parse(&text, &absolute);
    match pipeline {
        Some(pipeline) if !diagnostics.has_errors() => Ok(Loaded {
            pipeline,
            warnings: diagnostics.into_vec(),
            text,
        }),
        _ => Err(ConfigError::Invalid {
            path: path.to_owned(),
            source: text,
            diagnostics,
        }),
    }
}

/// Parses pipeline text. `path` is the file's absolute location; relative
/// paths inside the file are resolved against its directory. Performs no I/O.
///
/// Returns the pipeline when there are no errors, and every diagnostic found.
pub fn parse(text: &str, path: &Path) -> (Option<Pipeline>, Diagnostics) {
    let mut diags = Diagnostics::default();
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            diags.push(
                Diagnostic::error(
                    format!("invalid TOML: {}", e.message().trim_end()),
                    e.span(),
                )
                .with_label("here"),
            );
            return (None, diags);
        }
    };
    let base = path.parent().map(Path::to_owned).unwrap_or_default();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline".into());

    let mut root = Section::new("", doc.as_table(), None);
    let mut p = Parser {
        diags: &mut diags,
        base: &base,
        pipeline_name: String::new(),
    };

    let name = p.pipeline_section(&mut root, &stem);
    p.pipeline_name = name.clone();
    let transport = p.transport_section(&mut root, &name);
    let host = p.host_section(&mut root);
    let defaults = p.defaults_section(&mut root);
    let dead_letters = p.dead_letters_section(&mut root, &transport);
    let telemetry = p.telemetry_section(&mut root);
    let (admin, admin_token_env) = p.admin_section(&mut root);
    let schemas = p.schemas_section(&mut root);
    let plugins = p.plugins_section(&mut root, &defaults);
    root.finish(p.diags);

    check_routing(&plugins, &mut diags);

    if diags.has_errors() {
        diags.sort();
        return (None, diags);
    }
    let pipeline = Pipeline {
        name,
        source: path.to_owned(),
        transport,
        cache_dir: host.cache_dir,
        dead_letters,
        telemetry,
        admin,
        admin_token_env,
        watch: host.watch,
        watch_interval: host.watch_interval,
        state_dir: host.state_dir,
        max_message_size: host.max_message_size,
        crash_loop_limit: host.crash_loop_limit,
        schemas,
        plugins: plugins.into_iter().filter_map(|p| p.spec).collect(),
    };
    diags.sort();
    (Some(pipeline), diags)
}

/// `[host]` as read.
struct HostSection {
    cache_dir: Option<PathBuf>,
    watch: bool,
    watch_interval: Duration,
    state_dir: PathBuf,
    max_message_size: u64,
    crash_loop_limit: u32,
}

/// A plugin as far as it could be read, plus the places its types were
/// written: cross-plugin rules are checked even when one of its other
/// settings is wrong, so every error shows up in one run.
struct ParsedPlugin {
    /// The key as written, for messages.
    key: String,
    /// `None` if any of its settings had an error.
    spec: Option<PluginSpec>,
    subscriptions: Vec<(MessageType, Kind)>,
    type_spans: BTreeMap<MessageType, Option<Range<usize>>>,
}

struct Parser<'a> {
    diags: &'a mut Diagnostics,
    base: &'a Path,
    pipeline_name: String,
}

impl Parser<'_> {
    fn pipeline_section(&mut self, root: &mut Section<'_>, stem: &str) -> String {
        let Some(mut section) = root.table("pipeline", self.diags) else {
            return default_pipeline_name(stem);
        };
        let name = section.string("name", self.diags).and_then(|n| {
            match PluginName::try_from(n.value.as_str()) {
                Ok(_) => Some(n.value),
                Err(e) => {
                    self.diags.push(
                        Diagnostic::error(e.replace("plugin name", "pipeline name"), n.span)
                            .with_label("invalid name"),
                    );
                    None
                }
            }
        });
        let _ = section.string("description", self.diags);
        section.finish(self.diags);
        name.unwrap_or_else(|| default_pipeline_name(stem))
    }

    fn transport_section(&mut self, root: &mut Section<'_>, pipeline: &str) -> TransportConfig {
        let default_path = self.base.join(".switchyard").join(format!("{pipeline}.db"));
        let mut config = EmbeddedConfig {
            path: default_path,
            fsync: true,
            batch_size: DEFAULT_BATCH_SIZE as usize,
            poll_interval: DEFAULT_POLL_INTERVAL,
        };
        let Some(mut t) = root.table("transport", self.diags) else {
            return TransportConfig::Embedded(config);
        };
        let kind = t.string("kind", self.diags);
        let kind_span = kind.as_ref().and_then(|k| k.span.clone());
        match kind.as_ref().map(|k| k.value.as_str()) {
            None | Some("embedded") => {}
            Some("amqp") | Some("rabbitmq") => return self.amqp_transport(t, pipeline),
            Some("kafka") => return self.kafka_transport(t, pipeline),
            Some(other) => {
                let mut d =
                    Diagnostic::error(format!("unknown transport kind `{other}`"), kind_span)
                        .with_label("not a transport");
                d = d.with_note("help: the transport kinds are `embedded`, `amqp` and `kafka`");
                self.diags.push(d);
            }
        }
        if let Some(path) = t.string("path", self.diags) {
            if path.value.trim().is_empty() {
                self.diags
                    .error("`transport.path` must not be empty", path.span);
            } else {
                config.path = self.base.join(path.value);
            }
        }
        if let Some(sync) = t.string("sync", self.diags) {
            match sync.value.as_str() {
                "full" => config.fsync = true,
                "normal" => config.fsync = false,
                other => self.diags.push(
                    Diagnostic::error(format!("unknown sync mode `{other}`"), sync.span)
                        .with_label("expected \"full\" or \"normal\"")
                        .with_note("note: \"full\" survives power loss; \"normal\" survives a crash of the host process only"),
                ),
            }
        }
        if let Some(n) = t.count("batch_size", self.diags) {
            if (1..=10_000).contains(&n.value) {
                config.batch_size = n.value as usize;
            } else {
                self.diags.push(
                    Diagnostic::error("`transport.batch_size` must be between 1 and 10000", n.span)
                        .with_label("out of range"),
                );
            }
        }
        if let Some(d) = self.duration(&mut t, "poll_interval") {
            config.poll_interval = d.value;
        }
        t.finish(self.diags);
        TransportConfig::Embedded(config)
    }

    /// `[transport]` with `kind = "amqp"`.
    fn amqp_transport(&mut self, mut t: Section<'_>, pipeline: &str) -> TransportConfig {
        let mut config = AmqpConfig {
            url: UrlSource::Literal(DEFAULT_AMQP_URL.into()),
            prefetch: DEFAULT_BATCH_SIZE as u16,
            exchange: format!("switchyard.{pipeline}"),
            connect_timeout: Duration::from_secs(10),
        };
        let url = t.string("url", self.diags);
        let url_env = t.string("url_env", self.diags);
        match (url, url_env) {
            (Some(_), Some(e)) => self.diags.push(
                Diagnostic::error("give either `url` or `url_env`, not both", e.span)
                    .with_label("second URL"),
            ),
            (Some(u), None) => {
                if !(u.value.starts_with("amqp://") || u.value.starts_with("amqps://")) {
                    self.diags.push(
                        Diagnostic::error(
                            "`transport.url` must be an amqp:// or amqps:// URL",
                            u.span,
                        )
                        .with_label("expected e.g. \"amqp://127.0.0.1:5672/%2f\""),
                    );
                } else {
                    if has_password(&u.value) {
                        self.diags.push(
                            Diagnostic::warning("the broker URL contains a password", u.span.clone())
                                .with_label("password in clear text")
                                .with_note("help: put the URL in an environment variable and name it with `url_env`"),
                        );
                    }
                    config.url = UrlSource::Literal(u.value);
                }
            }
            (None, Some(e)) => {
                if e.value.is_empty() || e.value.contains('=') {
                    self.diags.push(
                        Diagnostic::error(
                            "`transport.url_env` must name an environment variable",
                            e.span,
                        )
                        .with_label("invalid name"),
                    );
                } else {
                    config.url = UrlSource::Env(e.value);
                }
            }
            (None, None) => {}
        }
        if let Some(n) = t.count("prefetch", self.diags) {
            match u16::try_from(n.value) {
                Ok(p) if p > 0 => config.prefetch = p,
                _ => self.diags.push(
                    Diagnostic::error("`transport.prefetch` must be between 1 and 65535", n.span)
                        .with_label("out of range"),
                ),
            }
        }
        if let Some(x) = t.string("exchange", self.diags) {
            if x.value.is_empty() || x.value.len() > 200 {
                self.diags.push(
                    Diagnostic::error("`transport.exchange` must be 1 to 200 characters", x.span)
                        .with_label("invalid exchange name"),
                );
            } else {
                config.exchange = x.value;
            }
        }
        if let Some(d) = self.duration(&mut t, "connect_timeout") {
            config.connect_timeout = d.value;
        }
        t.finish(self.diags);
        TransportConfig::Amqp(config)
    }

    /// `[transport]` with `kind = "kafka"`.
    fn kafka_transport(&mut self, mut t: Section<'_>, pipeline: &str) -> TransportConfig {
        let mut config = KafkaConfig {
            bootstrap_servers: DEFAULT_KAFKA_SERVERS.into(),
            topic_prefix: format!("{pipeline}."),
            group_prefix: format!("switchyard.{pipeline}"),
            partitions: 3,
            replication_factor: 1,
            create_topics: true,
            batch_size: DEFAULT_BATCH_SIZE as usize,
            timeout: Duration::from_secs(10),
            security_protocol: "plaintext".into(),
            sasl_mechanism: None,
            sasl_username_env: None,
            sasl_password_env: None,
            ssl_ca_location: None,
            properties: Vec::new(),
        };
        if let Some(b) = t.string("bootstrap_servers", self.diags) {
            if b.value.trim().is_empty() || b.value.contains("://") {
                self.diags.push(
                    Diagnostic::error(
                        "`transport.bootstrap_servers` must be a list of host:port",
                        b.span,
                    )
                    .with_label("expected e.g. \"kafka1:9092,kafka2:9092\""),
                );
            } else {
                config.bootstrap_servers = b.value;
            }
        }
        let topic_chars = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if let Some(p) = t.string("topic_prefix", self.diags) {
            if p.value.len() > 100 || !topic_chars(&p.value) {
                self.diags.push(
                    Diagnostic::error(
                        "`transport.topic_prefix` may hold letters, digits, `.`, `_` and `-`, up to 100",
                        p.span,
                    )
                    .with_label("not usable in a topic name"),
                );
            } else {
                config.topic_prefix = p.value;
            }
        }
        if let Some(g) = t.string("group_prefix", self.diags) {
            if g.value.is_empty() || g.value.len() > 200 {
                self.diags.push(
                    Diagnostic::error(
                        "`transport.group_prefix` must be 1 to 200 characters",
                        g.span,
                    )
                    .with_label("invalid group name"),
                );
            } else {
                config.group_prefix = g.value;
            }
        }
        if let Some(n) = t.count("partitions", self.diags) {
            match i32::try_from(n.value) {
                Ok(p) if (1..=10_000).contains(&p) => config.partitions = p,
                _ => self.diags.push(
                    Diagnostic::error("`transport.partitions` must be between 1 and 10000", n.span)
                        .with_label("out of range"),
                ),
            }
        }
        if let Some(n) = t.count("replication_factor", self.diags) {
            match i32::try_from(n.value) {
                Ok(r) if (1..=100).contains(&r) => config.replication_factor = r,
                _ => self.diags.push(
                    Diagnostic::error(
                        "`transport.replication_factor` must be between 1 and 100",
                        n.span,
                    )
                    .with_label("out of range"),
                ),
            }
        }
        if let Some(c) = t.bool("create_topics", self.diags) {
            config.create_topics = c.value;
        }
        if let Some(n) = t.count("batch_size", self.diags) {
            match usize::try_from(n.value) {
                Ok(b) if (1..=10_000).contains(&b) => config.batch_size = b,
                _ => self.diags.push(
                    Diagnostic::error("`transport.batch_size` must be between 1 and 10000", n.span)
                        .with_label("out of range"),
                ),
            }
        }
        if let Some(d) = self.duration(&mut t, "timeout") {
            config.timeout = d.value;
        }
        let mut protocol_span = None;
        if let Some(p) = t.string("security_protocol", self.diags) {
            match p.value.to_ascii_lowercase().as_str() {
                v @ ("plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl") => {
                    config.security_protocol = v.to_owned();
                    protocol_span = Some(p.span);
                }
                _ => self.diags.push(
                    Diagnostic::error(format!("unknown security protocol `{}`", p.value), p.span)
                        .with_label("expected plaintext, ssl, sasl_plaintext or sasl_ssl"),
                ),
            }
        }
        let sasl = config.security_protocol.starts_with("sasl");
        if let Some(m) = t.string("sasl_mechanism", self.diags) {
            match m.value.as_str() {
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
                    config.sasl_mechanism = Some(m.value);
                }
                _ => self.diags.push(
                    Diagnostic::error(format!("unknown SASL mechanism `{}`", m.value), m.span)
                        .with_label("expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
                ),
            }
        }
        for (key, slot) in [
            ("sasl_username_env", &mut config.sasl_username_env),
            ("sasl_password_env", &mut config.sasl_password_env),
        ] {
            if let Some(v) = t.string(key, self.diags) {
                if v.value.is_empty() || v.value.contains('=') {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`transport.{key}` must name an environment variable"),
                            v.span,
                        )
                        .with_label("invalid name"),
                    );
                } else {
                    *slot = Some(v.value);
                }
            }
        }
        if sasl && (config.sasl_username_env.is_none() || config.sasl_password_env.is_none()) {
            self.diags.push(
                Diagnostic::error(
                    "a SASL security protocol needs `sasl_username_env` and `sasl_password_env`",
                    protocol_span.unwrap_or_else(|| t.span()),
                )
                .with_label("SASL without credentials")
                .with_note("note: credentials come from environment variables, never from the pipeline file"),
            );
        }
        if let Some(ca) = t.string("ssl_ca_location", self.diags) {
            config.ssl_ca_location = Some(self.base.join(ca.value));
        }
        if let Some(mut props) = t.table("properties", self.diags) {
            for (k, v) in props.string_map(self.diags) {
                if KAFKA_RESERVED_PROPERTIES.contains(&k.value.as_str()) {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`{}` is set by the transport and cannot be changed", k.value),
                            k.span,
                        )
                        .with_label("reserved")
                        .with_note("note: the transport relies on it for at-least-once delivery, or has its own key for it"),
                    );
                } else if k.value.contains("password") || k.value.contains("secret") {
                    self.diags.push(
                        Diagnostic::error(
                            format!(
                                "`{}` looks like a secret; it cannot be given in the pipeline file",
                                k.value
                            ),
                            k.span,
                        )
                        .with_label("secret"),
                    );
                } else {
                    config.properties.push((k.value, v.value));
                }
            }
        }
        t.finish(self.diags);
        TransportConfig::Kafka(config)
    }

    fn duration(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Spanned<Duration>> {
        let s = section.string(key, self.diags)?;
        match parse_duration(&s.value) {
            Ok(d) if d.is_zero() => {
                self.diags.push(
                    Diagnostic::error(
                        format!("`{}.{key}` must be more than zero", section.path()),
                        s.span,
                    )
                    .with_label("zero"),
                );
                None
            }
            Ok(d) => Some(Spanned::new(d, s.span)),
            Err(e) => {
                self.diags
                    .push(Diagnostic::error(e, s.span).with_label("not a duration"));
                None
            }
        }
    }

    /// Reads the limit keys of `[defaults]` or a plugin table over `base`.
    fn limits(&mut self, section: &mut Section<'_>, base: &Limits) -> Limits {
        let mut limits = base.clone();
        if let Some(m) = section.string_or_int("memory", "a size like \"64 MiB\"", self.diags) {
            match parse_size(&m.value) {
                Ok(bytes) if (MIN_MEMORY..=MAX_MEMORY).contains(&bytes) => limits.memory = bytes,
                Ok(bytes) => self.diags.push(
                    Diagnostic::error(
                        format!(
                            "memory limit {} is out of range: it must be between 1 MiB and 4 GiB",
                            format_size(bytes)
                        ),
                        m.span,
                    )
                    .with_label("out of range"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, m.span).with_label("not a size")),
            }
        }
        if let Some(t) = self.duration(section, "timeout") {
            if t.value > MAX_TIMEOUT {
                self.diags.push(
                    Diagnostic::error(
                        format!(
                            "timeout {} is longer than the 15 minute maximum",
                            humantime::format_duration(t.value)
                        ),
                        t.span,
                    )
                    .with_label("too long"),
                );
            } else {
                limits.timeout = t.value;
            }
        }
        if let Some(n) = section.count("recycle_after", self.diags) {
            if n.value == 0 {
                self.diags.push(
                    Diagnostic::error("`recycle_after` must be at least 1", n.span)
                        .with_label("zero"),
                );
            } else {
                limits.recycle_after = n.value;
            }
        }
        if let Some(n) = section.count("max_outputs", self.diags) {
            limits.max_outputs = n.value;
        }
        limits
    }

    /// `[defaults]`: limits and `[defaults.retry]` for every plugin.
    fn defaults_section(&mut self, root: &mut Section<'_>) -> (Limits, RetryPolicy) {
        let Some(mut section) = root.table("defaults", self.diags) else {
            return (Limits::default(), RetryPolicy::default());
        };
        let limits = self.limits(&mut section, &Limits::default());
        let retry = match section.table("retry", self.diags) {
            Some(r) => self.retry(r, &RetryPolicy::default()),
            None => RetryPolicy::default(),
        };
        section.finish(self.diags);
        (limits, retry)
    }

    /// A `retry` table over `base`.
    fn retry(&mut self, mut r: Section<'_>, base: &RetryPolicy) -> RetryPolicy {
        let mut policy = base.clone();
        if let Some(n) = r.count("immediate", self.diags) {
            if n.value <= 100 {
                policy.immediate = n.value as u32;
            } else {
                self.diags.push(
                    Diagnostic::error(
                        format!("`{}.immediate` must be at most 100", r.path()),
                        n.span,
                    )
                    .with_label("too many"),
                );
            }
        }
        if let Some(n) = r.count("delayed", self.diags) {
            if n.value <= 1000 {
                policy.delayed = n.value as u32;
            } else {
                self.diags.push(
                    Diagnostic::error(
                        format!("`{}.delayed` must be at most 1000", r.path()),
                        n.span,
                    )
                    .with_label("too many"),
                );
            }
        }
        let attempts = (u64::from(policy.immediate) + 1) * (u64::from(policy.delayed) + 1);
        if attempts > crate::limits::MAX_HISTORY as u64 {
            self.diags.push(
                Diagnostic::error(
                    format!(
                        "`{}` lets one message be tried {attempts} times, more than the {} attempts a message carries in its history",
                        r.path(),
                        crate::limits::MAX_HISTORY
                    ),
                    r.span(),
                )
                .with_label("too many attempts")
                .with_note("help: each delayed retry makes `immediate + 1` attempts; lower `immediate` or `delayed`"),
            );
        }
        let backoff = self.duration(&mut r, "backoff");
        if let Some(d) = &backoff {
            policy.backoff = d.value;
        }
        let max = self.duration(&mut r, "max_backoff");
        if let Some(d) = &max {
            policy.max_backoff = d.value;
        }
        // Checked where the waits are set, not again in every table that
        // inherits them.
        if (backoff.is_some() || max.is_some()) && policy.max_backoff < policy.backoff {
            self.diags.push(
                Diagnostic::error(
                    format!(
                        "`{}.max_backoff` ({}) is shorter than `backoff` ({})",
                        r.path(),
                        humantime::format_duration(policy.max_backoff),
                        humantime::format_duration(policy.backoff)
                    ),
                    max.and_then(|m| m.span).or(r.span()),
                )
                .with_label("shorter than the first wait"),
            );
        }
        if let Some(kinds) = r.strings("retry_on", self.diags) {
            let mut retry_on = Vec::new();
            for k in kinds {
                match FailureKind::parse(&k.value) {
                    Some(kind) if kind.is_never_retried() => self.diags.push(
                        Diagnostic::error(format!("`{}` failures are never retried", k.value), k.span)
                            .with_label("not retryable")
                            .with_note("note: a permanent failure, a contract violation, a malformed or undeliverable message, or one that crashed the host again and again cannot be fixed by trying again; it goes to the dead-letter store"),
                    ),
                    Some(kind) => retry_on.push(kind),
                    None => self.diags.push(
                        Diagnostic::error(format!("unknown failure kind `{}`", k.value), k.span)
                            .with_label("not a failure kind")
                            .with_note("help: retryable kinds are `transient`, `timeout`, `trap` and `out-of-memory`"),
                    ),
                }
            }
            policy.retry_on = retry_on;
        }
        r.finish(self.diags);
        policy
    }

    /// `[telemetry]`: traces and metrics export.
    fn telemetry_section(&mut self, root: &mut Section<'_>) -> crate::telemetry::TelemetryConfig {
        use crate::telemetry::{TelemetryConfig, TraceExport};
        let mut config = TelemetryConfig::default();
        let Some(mut t) = root.table("telemetry", self.diags) else {
            return config;
        };
        if let Some(v) = t.string("traces", self.diags) {
            config.traces = match v.value.as_str() {
                "off" => Some(TraceExport::Off),
                "otlp" => Some(TraceExport::Otlp),
                "stdout" => Some(TraceExport::Stdout),
                other => {
                    self.diags.push(
                        Diagnostic::error(format!("unknown trace export `{other}`"), v.span)
                            .with_label("expected \"otlp\", \"stdout\" or \"off\""),
                    );
                    None
                }
            };
        }
        if let Some(v) = t.string("metrics", self.diags) {
            config.metrics_otlp = match v.value.as_str() {
                "otlp" => Some(true),
                "off" => Some(false),
                other => {
                    self.diags.push(
                        Diagnostic::error(format!("unknown metrics export `{other}`"), v.span)
                            .with_label("expected \"otlp\" or \"off\"")
                            .with_note(
                                "note: metrics are always served at /metrics on the admin listener",
                            ),
                    );
                    None
                }
            };
        }
        if let Some(e) = t.string("endpoint", self.diags) {
            if e.value.starts_with("http://") || e.value.starts_with("https://") {
                config.endpoint = Some(e.value);
            } else {
                self.diags.push(
                    Diagnostic::error(
                        "`telemetry.endpoint` must be an http:// or https:// URL",
                        e.span,
                    )
                    .with_label("expected e.g. \"http://127.0.0.1:4318\""),
                );
            }
        }
        config.service_name = t.string("service_name", self.diags).map(|s| s.value);
        if let Some(r) = t.number("sample_ratio", self.diags) {
            match r.value {
                v if (0.0..=1.0).contains(&v) => config.sample_ratio = Some(v),
                _ => self.diags.push(
                    Diagnostic::error("`telemetry.sample_ratio` must be between 0 and 1", r.span)
                        .with_label("out of range"),
                ),
            }
        }
        config.metrics_interval = self.duration(&mut t, "metrics_interval").map(|d| d.value);
        t.finish(self.diags);
        config
    }

    /// `[admin]`: the HTTP listener for `/metrics` and `/healthz`.
    /// `[schemas]`: message type = JSON Schema file.
    fn schemas_section(&mut self, root: &mut Section<'_>) -> BTreeMap<MessageType, PathBuf> {
        let mut out = BTreeMap::new();
        let Some(mut s) = root.table("schemas", self.diags) else {
            return out;
        };
        for (k, v) in s.string_map(self.diags) {
            match MessageType::try_from(k.value.as_str()) {
                Ok(t) if !v.value.trim().is_empty() => {
                    out.insert(t, self.base.join(&v.value));
                }
                Ok(_) => self.diags.push(
                    Diagnostic::error(
                        format!("the schema of `{}` is an empty path", k.value),
                        v.span,
                    )
                    .with_label("expected a JSON Schema file"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, k.span).with_label("not a message type")),
            }
        }
        // Every key was read as a type: nothing left to report as unknown.
        out
    }

    /// `[host]`: where the host keeps its caches and state, and whether it
    /// watches its files.
    fn host_section(&mut self, root: &mut Section<'_>) -> HostSection {
        let mut host = HostSection {
            cache_dir: None,
            watch: false,
            watch_interval: DEFAULT_WATCH_INTERVAL,
            state_dir: self.base.join(".switchyard"),
            max_message_size: crate::limits::DEFAULT_MAX_MESSAGE_SIZE,
            crash_loop_limit: DEFAULT_CRASH_LOOP_LIMIT,
        };
        let Some(mut h) = root.table("host", self.diags) else {
            return host;
        };
        host.cache_dir = h
            .string("cache_dir", self.diags)
            .map(|s| self.base.join(s.value));
        if let Some(dir) = h.string("state_dir", self.diags) {
            if dir.value.trim().is_empty() {
                self.diags
                    .error("`host.state_dir` must not be empty", dir.span);
            } else {
                host.state_dir = self.base.join(dir.value);
            }
        }
        if let Some(w) = h.bool("watch", self.diags) {
            host.watch = w.value;
        }
        if let Some(d) = self.duration(&mut h, "watch_interval") {
            host.watch_interval = d.value;
        }
        if let Some(m) = h.string_or_int("max_message_size", "a size like \"16 MiB\"", self.diags) {
            match parse_size(&m.value) {
                Ok(bytes) if (1..=MAX_MESSAGE_SIZE).contains(&bytes) => {
                    host.max_message_size = bytes;
                }
                Ok(bytes) => self.diags.push(
                    Diagnostic::error(
                        format!(
                            "max_message_size {} is out of range: it must be between 1 byte and {}",
                            format_size(bytes),
                            format_size(MAX_MESSAGE_SIZE)
                        ),
                        m.span,
                    )
                    .with_label("out of range"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, m.span).with_label("not a size")),
            }
        }
        if let Some(n) = h.count("crash_loop_limit", self.diags) {
            match u32::try_from(n.value) {
                Ok(v) if v >= 1 => host.crash_loop_limit = v,
                _ => self.diags.push(
                    Diagnostic::error("`host.crash_loop_limit` must be at least 1", n.span)
                        .with_label("out of range"),
                ),
            }
        }
        h.finish(self.diags);
        host
    }

    /// `[admin]`: the HTTP listener for `/metrics`, `/healthz` and the
    /// plugin endpoints, and the token its changing endpoints require.
    fn admin_section(&mut self, root: &mut Section<'_>) -> (Option<SocketAddr>, Option<String>) {
        let default = DEFAULT_ADMIN_LISTEN.parse().ok();
        let Some(mut a) = root.table("admin", self.diags) else {
            return (default, None);
        };
        let token_env = a.string("token_env", self.diags).and_then(|t| {
            let valid = !t.value.is_empty()
                && !t.value.starts_with(|c: char| c.is_ascii_digit())
                && t.value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid {
                Some(t.value)
            } else {
                self.diags.push(
                    Diagnostic::error(
                        format!("`{}` is not an environment variable name", t.value),
                        t.span,
                    )
                    .with_label("expected e.g. \"SWITCHYARD_ADMIN_TOKEN\"")
                    .with_note("note: the token itself never goes in the pipeline file"),
                );
                None
            }
        });
        let listen = match a.string("listen", self.diags) {
            None => default,
            Some(l) if l.value == "off" => None,
            Some(l) => match l.value.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`{}` is not an address with a port", l.value),
                            l.span,
                        )
                        .with_label("expected e.g. \"127.0.0.1:9464\" or \"off\""),
                    );
                    default
                }
            },
        };
        a.finish(self.diags);
        (listen, token_env)
    }

    /// `[dead_letters]`: where failed messages go.
    fn dead_letters_section(
        &mut self,
        root: &mut Section<'_>,
        transport: &TransportConfig,
    ) -> DeadLetterConfig {
        let default_path = match transport {
            TransportConfig::Embedded(embedded) => embedded.path.clone(),
            TransportConfig::Amqp(_) | TransportConfig::Kafka(_) => self
                .base
                .join(".switchyard")
                .join(format!("{}-dead-letters.db", self.pipeline_name)),
        };
        let mut config = DeadLetterConfig {
            store: DeadLetterStoreConfig::Embedded { path: default_path },
            max_replays: DEFAULT_MAX_REPLAYS,
            broker: false,
        };
        let Some(mut d) = root.table("dead_letters", self.diags) else {
            return config;
        };
        if let Some(b) = d.bool("broker", self.diags) {
            if b.value && matches!(transport, TransportConfig::Embedded(_)) {
                self.diags.push(
                    Diagnostic::error(
                        "`dead_letters.broker` needs a broker transport",
                        b.span,
                    )
                    .with_label("the embedded transport has no broker")
                    .with_note("note: it copies dead letters to `<queue>.dlq` on RabbitMQ or `<topic>.dlq` on Kafka; on the embedded transport, `switchyard dlq` is the place to look"),
                );
            } else {
                config.broker = b.value;
            }
        }
        let url = d.string("url", self.diags);
        let url_env = d.string("url_env", self.diags);
        let path = d.string("path", self.diags);
        let schema = d.string("schema", self.diags);
        if let Some(n) = d.count("max_replays", self.diags) {
            config.max_replays = u32::try_from(n.value).unwrap_or(u32::MAX);
        }
        let postgres = url.is_some() || url_env.is_some();
        if let (Some(u), Some(e)) = (&url, &url_env) {
            self.diags.push(
                Diagnostic::error("give either `url` or `url_env`, not both", e.span.clone())
                    .with_label("second URL")
                    .with_note(format!(
                        "note: `url` is already set to {}",
                        redact(&u.value)
                    )),
            );
        }
        let mut source = None;
        if let Some(u) = url {
            if !(u.value.starts_with("postgres://") || u.value.starts_with("postgresql://")) {
                self.diags.push(
                    Diagnostic::error("`dead_letters.url` must be a PostgreSQL URL", u.span)
                        .with_label("expected postgres://user@host:port/database")
                        .with_note("help: leave `url` out to keep dead letters in the embedded store (`path`)"),
                );
            } else {
                if has_password(&u.value) {
                    self.diags.push(
                        Diagnostic::warning("the dead-letter URL contains a password", u.span.clone())
                            .with_label("password in clear text")
                            .with_note("help: put the URL in an environment variable and name it with `url_env`"),
                    );
                }
                source = Some(UrlSource::Literal(u.value));
            }
        } else if let Some(e) = url_env {
            if e.value.is_empty() || e.value.contains('=') {
                self.diags.push(
                    Diagnostic::error(
                        "`dead_letters.url_env` must name an environment variable",
                        e.span,
                    )
                    .with_label("invalid name"),
                );
            } else {
                source = Some(UrlSource::Env(e.value));
            }
        }
        if postgres {
            if let Some(p) = &path {
                self.diags.push(
                    Diagnostic::error(
                        "`path` is for the embedded store; this one is PostgreSQL",
                        p.span.clone(),
                    )
                    .with_label("not used with a PostgreSQL store"),
                );
            }
            let schema = match schema {
                Some(s) if valid_identifier(&s.value) => s.value,
                Some(s) => {
                    self.diags.push(
                        Diagnostic::error(
                            format!(
                                "`{}` is not a valid schema name; use lowercase letters, digits and `_`",
                                s.value
                            ),
                            s.span,
                        )
                        .with_label("invalid schema"),
                    );
                    String::new()
                }
                None => "switchyard".into(),
            };
            if let Some(url) = source {
                config.store = DeadLetterStoreConfig::Postgres { url, schema };
            }
        } else {
            if let Some(s) = &schema {
                self.diags.push(
                    Diagnostic::error(
                        "`schema` is for a PostgreSQL store; set `url` or `url_env`",
                        s.span.clone(),
                    )
                    .with_label("not used without a URL"),
                );
            }
            if let Some(p) = path {
                config.store = DeadLetterStoreConfig::Embedded {
                    path: self.base.join(p.value),
                };
            }
        }
        d.finish(self.diags);
        config
    }

    fn plugins_section(
        &mut self,
        root: &mut Section<'_>,
        defaults: &(Limits, RetryPolicy),
    ) -> Vec<ParsedPlugin> {
        let Some(mut plugins) = root.table("plugins", self.diags) else {
            self.diags.push(
                Diagnostic::error("the pipeline has no plugins", None)
                    .with_note("help: add a table per plugin, e.g. [plugins.orders] with wasm = \"orders.wasm\" and commands = [\"PlaceOrder\"]"),
            );
            return Vec::new();
        };
        let entries = plugins.entries(self.diags);
        if entries.is_empty() {
            self.diags.push(
                Diagnostic::error("the pipeline has no plugins", plugins.span())
                    .with_label("add at least one [plugins.NAME] table"),
            );
        }
        entries
            .into_iter()
            .map(|(name, section)| self.plugin(name, section, defaults))
            .collect()
    }

    fn plugin(
        &mut self,
        name: Spanned<String>,
        mut section: Section<'_>,
        defaults: &(Limits, RetryPolicy),
    ) -> ParsedPlugin {
        let plugin_name = match PluginName::try_from(name.value.as_str()) {
            Ok(n) => Some(n),
            Err(e) => {
                self.diags
                    .push(Diagnostic::error(e, name.span.clone()).with_label("invalid name"));
                None
            }
        };
        let wasm = section
            .required_string("wasm", "\"path/to/plugin.wasm\"", self.diags)
            .and_then(|w| {
                if w.value.trim().is_empty() {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`plugins.{}.wasm` must not be empty", name.value),
                            w.span,
                        )
                        .with_label("empty path"),
                    );
                    None
                } else {
                    Some(self.base.join(w.value))
                }
            });
        let mut type_spans = BTreeMap::new();
        let errors_before = self.diags.error_count();
        let commands = self.types(&mut section, "commands", &mut type_spans);
        let events = self.types(&mut section, "events", &mut type_spans);
        let limits = self.limits(&mut section, &defaults.0);
        let retry = match section.table("retry", self.diags) {
            Some(r) => self.retry(r, &defaults.1),
            None => defaults.1.clone(),
        };
        let grants = match section.table("grants", self.diags) {
            Some(g) => self.grants(g),
            None => Grants::default(),
        };
        // An empty plugin is only worth its own error if its lists were not
        // just reported as malformed or misspelt.
        let misspelt_list = section
            .unknown_keys()
            .iter()
            .any(|k| reader::closest(k, &["commands", "events"]).is_some());
        if commands.is_empty()
            && events.is_empty()
            && self.diags.error_count() == errors_before
            && !misspelt_list
        {
            self.diags.push(
                Diagnostic::error(
                    format!("plugin `{}` handles nothing", name.value),
                    section.span().or(name.span.clone()),
                )
                .with_label("no `commands` or `events`")
                .with_note("help: list the types routed to it, e.g. `commands = [\"PlaceOrder\"]` or `events = [\"OrderPlaced\"]`"),
            );
        }
        section.finish(self.diags);
        let subscriptions = commands
            .iter()
            .map(|t| (t.clone(), Kind::Command))
            .chain(events.iter().map(|t| (t.clone(), Kind::Event)))
            .collect();
        let spec = match (plugin_name, wasm) {
            (Some(name), Some(wasm)) => Some(PluginSpec {
                name,
                wasm,
                commands,
                events,
                limits,
                retry,
                grants,
            }),
            _ => None,
        };
        ParsedPlugin {
            key: name.value,
            spec,
            subscriptions,
            type_spans,
        }
    }

    fn types(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        spans: &mut BTreeMap<MessageType, Option<Range<usize>>>,
    ) -> Vec<MessageType> {
        let mut out = Vec::new();
        for t in section.strings(key, self.diags).unwrap_or_default() {
            match MessageType::try_from(t.value.as_str()) {
                Ok(mt) => {
                    if spans.contains_key(&mt) {
                        self.diags.push(
                            Diagnostic::error(
                                format!("`{mt}` is listed twice in [{}]", section.path()),
                                t.span,
                            )
                            .with_label("duplicate")
                            .with_note(
                                "note: a plugin lists each type once, under `commands` or `events`",
                            ),
                        );
                        continue;
                    }
                    spans.insert(mt.clone(), t.span);
                    out.push(mt);
                }
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, t.span).with_label("invalid message type")),
            }
        }
        out
    }

    fn grants(&mut self, mut g: Section<'_>) -> Grants {
        let mut grants = Grants::default();
        if let Some(mut env) = g.table("env", self.diags) {
            for (k, v) in env.string_map(self.diags) {
                if k.value.is_empty() || k.value.contains('=') || k.value.contains('\0') {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`{}` is not a valid environment variable name", k.value),
                            k.span,
                        )
                        .with_label("invalid name"),
                    );
                } else {
                    grants.env.push((k.value, v.value));
                }
            }
        }
        grants.inherit_env = g
            .strings("inherit_env", self.diags)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.value)
            .collect();
        for mut d in g.tables("dirs", self.diags).unwrap_or_default() {
            let host = d.required_string("host", "\"path/on/host\"", self.diags);
            let guest = d.required_string("guest", "\"/data\"", self.diags);
            let writable = d.bool("writable", self.diags).is_some_and(|b| b.value);
            if let Some(guest) = &guest
                && !guest.value.starts_with('/')
            {
                self.diags.push(
                    Diagnostic::error(
                        format!(
                            "guest path `{}` must be absolute, like `/data`",
                            guest.value
                        ),
                        guest.span.clone(),
                    )
                    .with_label("relative path"),
                );
            }
            d.finish(self.diags);
            if let (Some(host), Some(guest)) = (host, guest)
                && guest.value.starts_with('/')
            {
                grants.dirs.push(DirGrant {
                    host: self.base.join(host.value),
                    guest: guest.value,
                    writable,
                });
            }
        }
        grants.clock = g.bool("clock", self.diags).is_some_and(|b| b.value);
        grants.stdio = g.bool("stdio", self.diags).is_some_and(|b| b.value);
        for addr in g.strings("network", self.diags).unwrap_or_default() {
            match addr.value.parse::<SocketAddr>() {
                Ok(a) => grants.network.push(a),
                Err(_) => self.diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` is not an IP address with a port, like \"127.0.0.1:6379\"",
                            addr.value
                        ),
                        addr.span,
                    )
                    .with_label("invalid address"),
                ),
            }
        }
        g.finish(self.diags);
        grants
    }
}

fn valid_identifier(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Whether a connection string carries a password: `user:password@` in a
/// URL, a `password=` query parameter, or a `password=` key-value pair.
fn has_password(url: &str) -> bool {
    redact(url) != url
}

/// Keys whose values are secrets, in URL queries and key-value connection
/// strings (`host=db password=…`).
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

/// A connection string as it may be shown: the password of
/// `scheme://user:password@host`, and the value of every `password=` (or
/// `sslpassword=`) query parameter or key-value pair, become `***`.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (before_query, query) = match rest.split_once('?') {
                Some((b, q)) => (b, Some(q)),
                None => (rest, None),
            };
            let mut out = format!("{scheme}://");
            match before_query.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***@{host}")),
                    None => out.push_str(before_query),
                },
                None => out.push_str(before_query),
            }
            if let Some(q) = query {
                out.push('?');
                let pairs: Vec<String> = q
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if SECRET_KEYS.contains(&k.to_ascii_lowercase().as_str()) => {
                            format!("{k}=***")
                        }
                        _ => pair.to_owned(),
                    })
                    .collect();
                out.push_str(&pairs.join("&"));
            }
            out
        }
        None => redact_key_values(url),
    }
}

/// `key=value key='quoted value'`, with secret values replaced.
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for part in key_values(s) {
        match part {
            KeyValuePart::Pair { key, value, text } => {
                if SECRET_KEYS.contains(&key.to_ascii_lowercase().as_str()) {
                    out.push_str(&text[..text.len() - value.len()]);
                    out.push_str("***");
                } else {
                    out.push_str(text);
                }
            }
            KeyValuePart::Other(text) => out.push_str(text),
        }
    }
    out
}

/// A piece of a key-value connection string (libpq's
/// `host=db password='a b'`), in order, so that the pieces put back
/// together are the string.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyValuePart<'a> {
    /// `key = value` as written (`text`); `value` as written, quotes and
    /// escapes included, at the end of `text`.
    Pair {
        key: &'a str,
        value: &'a str,
        text: &'a str,
    },
    /// Spaces between pairs, or trailing text that is not a pair.
    Other(&'a str),
}

/// Splits a key-value connection string into its pieces.
pub fn key_values(s: &str) -> Vec<KeyValuePart<'_>> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let trimmed = rest.trim_start();
        if trimmed.len() < rest.len() {
            parts.push(KeyValuePart::Other(&rest[..rest.len() - trimmed.len()]));
        }
        rest = trimmed;
        if rest.is_empty() {
            return parts;
        }
        let Some(eq) = rest.find('=') else {
            parts.push(KeyValuePart::Other(rest));
            return parts;
        };
        let key = rest[..eq].trim();
        let after = &rest[eq + 1..];
        let value_at = eq + 1 + (after.len() - after.trim_start().len());
        let value = &rest[value_at..];
        // The value: quoted (with `\'` and `\\` escapes) or up to a space.
        let len = if value.starts_with('\'') {
            let mut escaped = false;
            let mut end = value.len();
            for (i, c) in value.char_indices().skip(1) {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        let end = value_at + len;
        parts.push(KeyValuePart::Pair {
            key,
            value: &rest[value_at..end],
            text: &rest[..end],
        });
        rest = &rest[end..];
    }
}

fn default_pipeline_name(stem: &str) -> String {
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.starts_with(|c: char| c.is_ascii_lowercase()) {
        cleaned
    } else {
        format!("p-{cleaned}")
    }
}

/// Rules across plugins: a type has one kind, a command has one handler.
fn check_routing(plugins: &[ParsedPlugin], diags: &mut Diagnostics) {
    let mut seen: BTreeMap<&MessageType, (Kind, &ParsedPlugin)> = BTreeMap::new();
    for p in plugins {
        for (t, kind) in &p.subscriptions {
            let kind = *kind;
            let span = p.type_spans.get(t).cloned().flatten();
            let Some((prev_kind, prev)) = seen.get(t) else {
                seen.insert(t, (kind, p));
                continue;
            };
            if *prev_kind != kind {
                diags.push(
                    Diagnostic::error(
                        format!(
                            "`{t}` is {} for plugin `{}` but {} for plugin `{}`",
                            prev_kind.with_article(),
                            prev.key,
                            kind.with_article(),
                            p.key
                        ),
                        span,
                    )
                    .with_label(format!("listed under `{kind}s` here"))
                    .with_note(format!(
                        "note: a message type is either a command or an event in the whole pipeline; plugin `{}` lists it under `{prev_kind}s`",
                        prev.key
                    )),
                );
            } else if kind == Kind::Command {
                diags.push(
                    Diagnostic::error(
                        format!(
                            "command `{t}` has two handlers: plugins `{}` and `{}`",
                            prev.key, p.key
                        ),
                        span,
                    )
                    .with_label("second handler")
                    .with_note("note: a command has exactly one handler; if several plugins must react, publish an event instead"),
                );
            }
        }
    }
}

impl Pipeline {
    pub fn plugin(&self, name: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.name.as_str() == name)
    }

    /// The kind of a message type routed somewhere in this pipeline.
    pub fn kind_of(&self, message_type: &str) -> Option<Kind> {
        self.plugins
            .iter()
            .flat_map(PluginSpec::subscriptions)
            .find(|(t, _)| t.as_str() == message_type)
            .map(|(_, k)| k)
    }

    /// The plugins a message of this type is delivered to.
    pub fn subscribers(&self, message_type: &str) -> Vec<&PluginName> {
        self.plugins
            .iter()
            .filter(|p| p.subscriptions().any(|(t, _)| t.as_str() == message_type))
            .map(|p| &p.name)
            .collect()
    }

    /// Every routed type of one kind, sorted, for hints in error messages.
    pub fn types_of_kind(&self, kind: Kind) -> Vec<&str> {
        let mut types: Vec<&str> = self
            .plugins
            .iter()
            .flat_map(PluginSpec::subscriptions)
            .filter(|(_, k)| *k == kind)
            .map(|(t, _)| t.as_str())
            .collect();
        types.sort_unstable();
        types.dedup();
        types
    }

    /// The embedded transport settings, if the pipeline uses it.
    pub fn embedded(&self) -> Option<&EmbeddedConfig> {
        match &self.transport {
            TransportConfig::Embedded(e) => Some(e),
            TransportConfig::Amqp(_) | TransportConfig::Kafka(_) => None,
        }
    }

    /// Messages a route handles per batch.
    pub fn batch_size(&self) -> usize {
        match &self.transport {
            TransportConfig::Embedded(e) => e.batch_size,
            TransportConfig::Amqp(a) => usize::from(a.prefetch),
            TransportConfig::Kafka(k) => k.batch_size,
        }
    }

    /// A one-line hint listing the types of a kind.
    pub fn hint_types(&self, kind: Kind) -> String {
        quote_list(&self.types_of_kind(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::{has_password, redact};

    #[test]
    fn every_form_of_password_is_redacted() {
        let cases = [
            (
                "postgres://ada:s3cret@db:5432/shop",
                "postgres://ada:***@db:5432/shop",
            ),
            (
                "postgres://ada@db/shop?password=s3cret&sslmode=require",
                "postgres://ada@db/shop?password=***&sslmode=require",
            ),
            (
                "postgresql://db/shop?sslmode=require&PASSWORD=s3cret",
                "postgresql://db/shop?sslmode=require&PASSWORD=***",
            ),
            (
                "host=db user=ada password=s3cret dbname=shop",
                "host=db user=ada password=*** dbname=shop",
            ),
            (
                "host=db password = 's3cret \\' with a quote' dbname=shop",
                "host=db password = *** dbname=shop",
            ),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
        ];
        for (given, shown) in cases {
            assert_eq!(redact(given), shown, "{given}");
            assert!(!redact(given).contains("s3cret"));
            assert!(has_password(given), "{given}");
        }
        for plain in [
            "postgres://db/shop?sslmode=require",
            "host=db dbname=shop",
            "amqp://127.0.0.1",
        ] {
            assert_eq!(redact(plain), plain);
            assert!(!has_password(plain));
        }
    }
}
