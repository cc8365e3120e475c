//! The validated model: what a pipeline file becomes once every section has
//! been checked ([`Pipeline`] and the settings it is made of), with the
//! defaults and bounds of those settings. Plain data: no TOML, no I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::names::{MessageType, PluginName};
use super::origin::Origin;
use super::reader::quote_list;
use crate::envelope::Kind;
use crate::recover::RetryPolicy;

/// Per-plugin memory cap when the pipeline sets none. Enough for typical
/// handlers written in Rust, Go or JavaScript; small enough that a runaway
/// plugin cannot starve the host.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Per-message CPU deadline when the pipeline sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// A warm instance is replaced after this many messages, so state or memory
/// a plugin leaks between messages cannot grow without bound.
pub const DEFAULT_RECYCLE_AFTER: u64 = 10_000;
/// The most warm instances one route may run side by side.
pub const MAX_CONCURRENCY: usize = 64;
/// Most messages one handler call may emit; a plugin stuck in an emit loop
/// must not exhaust the host's memory.
pub const DEFAULT_MAX_OUTPUTS: u64 = 1_000;
/// Earlier attempts a message may carry in its history, and so the most
/// attempts a retry policy may make of one message (the pipeline refuses
/// larger policies): few enough that the history, with each attempt's error
/// clipped to 1 KiB, fits one AMQP header frame.
pub const MAX_HISTORY: usize = 64;
/// Messages the embedded transport reads and settles per transaction.
pub const DEFAULT_BATCH_SIZE: u64 = 256;
/// How often an idle embedded consumer looks for messages written by another
/// process (such as `switchyard send`).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Crashes in a row with a message in hand before it is dead-lettered.
pub const DEFAULT_CRASH_LOOP_LIMIT: u32 = 3;
/// The default largest payload a message may have, in and out
/// (`[host] max_message_size`). RabbitMQ 4 refuses larger messages by
/// default; a plugin's whole output per call is capped at 64 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 16 << 20;

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
    pub state: StateConfig,
    pub journal: JournalConfig,
    /// `[fleet]`: the hosts of this pipeline follow the versions deployed
    /// to a shared PostgreSQL database; `None` when not configured.
    pub fleet: Option<FleetConfig>,
    pub telemetry: TelemetryConfig,
    /// Where the admin HTTP listener (`/metrics`, `/healthz`) binds; `None`
    /// when turned off.
    pub admin: Option<SocketAddr>,
    /// The environment variable holding the bearer token that the admin
    /// API's changing endpoints (deploy, rollback) require; `None` turns
    /// them off.
    pub admin_token_env: Option<String>,
    /// `[ingress]`: commands and events over HTTP; `None` without the
    /// table.
    pub ingress: Option<IngressConfig>,
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

/// How often `--watch` looks at the pipeline file and its plugins.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The admin listener's default: localhost only, on the port OpenTelemetry
/// uses for Prometheus exporters.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Where failed messages go and how often they may be replayed.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetterConfig {
    pub store: StoreConfig,
    /// The loop guard: a record replayed this many times is not replayed
    /// again without `--force`.
    pub max_replays: u32,
    /// Also publish each dead-lettered message, with its error context as
    /// headers, to a destination on the broker: `<queue>.dlq` (RabbitMQ) or
    /// `<topic>.dlq` (Kafka).
    pub broker: bool,
}

/// Default of `max_state_value`: the largest value a plugin may store.
pub const DEFAULT_MAX_STATE_VALUE: u64 = 1 << 20;
/// Default of `max_state_keys`: state keys one call may write.
pub const DEFAULT_MAX_STATE_KEYS: u64 = 1000;

/// A store of the host's own: the dead-letter store, the state store.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreConfig {
    /// A SQLite file (by default the embedded transport's own store).
    Embedded { path: PathBuf },
    /// A PostgreSQL database shared by several hosts.
    Postgres { url: UrlSource, schema: String },
}

/// `[fleet]`: where the desired versions of a pipeline's plugins are
/// kept for every host of it, and how often a host looks.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// The PostgreSQL database.
    pub url: UrlSource,
    /// The schema of its tables.
    pub schema: String,
    /// How often a host looks for a new desired version when no
    /// notification came, and reports what it runs.
    pub poll_interval: Duration,
}

/// How often a fleet host looks, by default.
pub const DEFAULT_FLEET_POLL: Duration = Duration::from_secs(2);

/// `[state]`: where plugins' state is kept. On the embedded transport it is
/// always the transport's own file (its settle transaction writes it); on
/// a broker, a SQLite file of its own by default, or PostgreSQL for hosts
/// that share work.
#[derive(Clone, Debug, PartialEq)]
pub struct StateConfig {
    pub store: StoreConfig,
    /// How long the record of a message an exactly-once plugin handled is
    /// kept: a redelivery later than this is handled again.
    pub processed_retention: Duration,
}

/// `[journal]`: the record of every handling of a message, which `switchyard
/// why` reads.
#[derive(Clone, Debug, PartialEq)]
pub struct JournalConfig {
    pub enabled: bool,
    /// On the embedded transport always its own file (the settle
    /// transaction writes it); on a broker a SQLite file of its own by
    /// default, or PostgreSQL for hosts that share work.
    pub store: StoreConfig,
    /// Records older than this are removed.
    pub retention: Duration,
    /// The oldest records beyond this many are removed.
    pub max_records: u64,
    /// Keep each message's payload, clipped to this many bytes (`payloads
    /// = true`, `max_payload`); `None` keeps none.
    pub payloads: Option<usize>,
}

/// `[ingress]`: the HTTP listener that turns requests into commands and
/// events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressConfig {
    pub listen: SocketAddr,
    /// The environment variable holding a bearer token good for every
    /// type. With neither it nor `type_tokens`, requests need no token
    /// (loopback only).
    pub token_env: Option<String>,
    /// `[ingress.tokens]`: per message type, the environment variable of a
    /// token good for that type only (a webhook sender's, say).
    pub type_tokens: BTreeMap<MessageType, String>,
    /// HTTPS instead of plain HTTP: the certificate chain and its key.
    pub tls: Option<IngressTls>,
    /// The largest request body taken.
    pub max_body: u64,
    /// How long a command's request waits for the reply by default.
    pub wait: Duration,
    /// The longest wait a request may ask for (`Prefer: wait=N`).
    pub max_wait: Duration,
    /// How long the id of a message a client named is remembered, so that
    /// a retry under it is not sent again.
    pub dedupe_window: Duration,
}

/// `[ingress] tls_cert` and `tls_key`: PEM files, read when the host starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressTls {
    /// The certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Default of `[ingress] listen`.
pub const DEFAULT_INGRESS_LISTEN: &str = "127.0.0.1:9465";
/// Default of `[ingress] max_body`.
pub const DEFAULT_INGRESS_MAX_BODY: u64 = 1 << 20;
/// Default of `[ingress] wait`.
pub const DEFAULT_INGRESS_WAIT: Duration = Duration::from_secs(5);
/// Default of `[ingress] max_wait`.
pub const DEFAULT_INGRESS_MAX_WAIT: Duration = Duration::from_secs(60);
/// Default of `[ingress] dedupe_window`.
pub const DEFAULT_INGRESS_DEDUPE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Default of `[journal] retention`.
pub const DEFAULT_JOURNAL_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default of `[journal] max_records`.
pub const DEFAULT_JOURNAL_MAX_RECORDS: u64 = 1_000_000;
/// Default of `[journal] max_payload`.
pub const DEFAULT_JOURNAL_MAX_PAYLOAD: u64 = 4096;

/// Default of `[state] processed_retention`.
pub const DEFAULT_PROCESSED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where a connection URL comes from: written in the file, or read from an
/// environment variable when the store is opened (keeps passwords out of
/// pipeline files).
#[derive(Clone, Debug, PartialEq)]
pub enum UrlSource {
    Literal(String),
    Env(String),
}

impl UrlSource {
    /// The URL, read from its variable if it lives in one; `what` names the
    /// store in the error.
    pub fn resolve(&self, what: &str) -> anyhow::Result<String> {
        match self {
            UrlSource::Literal(u) => Ok(u.clone()),
            UrlSource::Env(name) => std::env::var(name).map_err(|_| {
                anyhow::anyhow!("the {what} URL is read from ${name}, which is not set")
            }),
        }
    }
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
    /// On a broker, record each handled message with its outputs in the
    /// state store, in the transaction of its state changes, and never
    /// hand a redelivery of it to the plugin again (`exactly_once`). The
    /// embedded transport settles a message and its effects in one commit
    /// anyway.
    pub exactly_once: bool,
    /// The plugin is a saga (`[plugins.NAME.saga]`): its messages belong
    /// to instances, each with state of its own. A saga on a broker is
    /// exactly-once whatever `exactly_once` says.
    pub saga: Option<std::sync::Arc<crate::saga::SagaSpec>>,
}

impl PluginSpec {
    /// Whether handled messages are recorded so a redelivery is not
    /// handled again (on a broker).
    pub fn is_exactly_once(&self) -> bool {
        self.exactly_once || self.saga.is_some()
    }

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
    /// The largest value a plugin may store in its state, in bytes.
    pub max_state_value: u64,
    /// State keys one `handle` call may write.
    pub max_state_keys: u64,
    /// Warm instances the plugin's route runs side by side (`concurrency`).
    pub concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: DEFAULT_MEMORY,
            timeout: DEFAULT_TIMEOUT,
            recycle_after: DEFAULT_RECYCLE_AFTER,
            max_outputs: DEFAULT_MAX_OUTPUTS,
            max_state_value: DEFAULT_MAX_STATE_VALUE,
            max_state_keys: DEFAULT_MAX_STATE_KEYS,
            concurrency: 1,
        }
    }
}

/// What a plugin may reach beyond its own memory. Nothing by default.
#[derive(Clone, Debug, PartialEq)]
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
    /// Origins the plugin may send HTTP requests to (`wasi:http`).
    pub http: Vec<Origin>,
    /// A PEM file of roots trusted for HTTPS besides the Mozilla roots
    /// built into the host.
    pub http_roots: Option<PathBuf>,
    /// The largest HTTP response body the plugin may receive.
    pub http_max_response: u64,
}

/// The response body cap when the grant names none.
pub const DEFAULT_HTTP_MAX_RESPONSE: u64 = 1 << 20;

impl Default for Grants {
    fn default() -> Self {
        Grants {
            env: Vec::new(),
            inherit_env: Vec::new(),
            dirs: Vec::new(),
            clock: false,
            stdio: false,
            network: Vec::new(),
            http: Vec::new(),
            http_roots: None,
            http_max_response: DEFAULT_HTTP_MAX_RESPONSE,
        }
    }
}

/// A host directory made visible to a plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct DirGrant {
    pub host: PathBuf,
    /// Absolute path inside the plugin, e.g. `/data`.
    pub guest: String,
    pub writable: bool,
}

/// Where spans go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TraceExport {
    /// No spans are made at all.
    #[default]
    Off,
    /// OTLP over HTTP/protobuf to a collector or backend.
    Otlp,
    /// A tree per trace printed on stdout, for local debugging.
    Stdout,
}

/// Telemetry settings from the pipeline, before the `OTEL_*` environment is
/// applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TelemetryConfig {
    pub traces: Option<TraceExport>,
    /// Push metrics over OTLP (they are always served at `/metrics`).
    pub metrics_otlp: Option<bool>,
    /// Base URL of an OTLP/HTTP endpoint, e.g. `http://127.0.0.1:4318`.
    pub endpoint: Option<String>,
    pub service_name: Option<String>,
    /// Fraction of new traces to sample, 0.0 to 1.0 (a message whose parent
    /// was sampled is always sampled).
    pub sample_ratio: Option<f64>,
    pub metrics_interval: Option<Duration>,
}
