//! The Kafka transport (librdkafka, through rdkafka).
//!
//! Topics, created by the host when missing:
//!
//! - one per message type, `<prefix><Type>`: an event's consumers each read
//!   it in their own consumer group; a command's one handler reads its topic;
//! - one per route for delayed retries and replays, `<prefix>switchyard.retry.<route>`,
//!   read by that route only;
//! - one for replies to the CLI, `<prefix>switchyard.replies`.
//!
//! Each route consumes in the group `<group_prefix>.<route>` with automatic
//! offset storing off: an offset is stored only after the outcome of its
//! message is durable (outputs, replies and retries acknowledged by the
//! brokers with `acks=all` from an idempotent producer; a dead letter
//! written), and never past a message of the same partition that is still
//! unfinished. Stored offsets are committed after every batch and when
//! partitions are revoked. A delayed retry waits in the host's memory, not
//! in the partition, so the partition it came from keeps moving.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use futures_util::{FutureExt as _, StreamExt as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{
    Delivery, Origin, Outcome, Refused, ReplyInbox, RouteTable, Settlement, Subscription, Topology,
    Transport, cloudevents,
};
use crate::config::{KafkaConfig, Pipeline};
use crate::envelope::{Envelope, Kind, Reply, now_ms};

/// The Kafka binding's prefix for CloudEvents attributes.
pub const CE_PREFIX: &str = "ce_";
/// What a route's retry topic is named, after the pipeline's prefix.
const RETRY_TOPIC_PREFIX: &str = "switchyard.retry.";
/// The Kafka binding's header for the payload's media type.
pub const CONTENT_TYPE_HEADER: &str = "content-type";
/// Delayed retries one route holds in memory before it pauses its retry
/// topic.
const MAX_HELD: usize = 10_000;

/// The topics and group of one route.
#[derive(Clone, Debug)]
struct RouteTopics {
    route: String,
    group: String,
    /// Topics of the message types the route subscribes to.
    topics: Vec<String>,
    retry_topic: String,
}

impl RouteTopics {
    fn all_topics(&self) -> Vec<String> {
        let mut t = self.topics.clone();
        t.push(self.retry_topic.clone());
        t
    }
}

struct Shared {
    config: KafkaConfig,
    source: String,
    /// Who receives what, and each route's topics and group; replaced when
    /// a running host's pipeline gains or loses routes.
    routing: RouteTable<RouteTopics>,
    replies_topic: String,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist.
    known_topics: Mutex<HashSet<String>>,
    /// Deliveries handed to routes and not yet settled, across routes.
    in_flight: AtomicI64,
    /// Delayed retries waiting in memory, across routes.
    held: AtomicI64,
    /// Deliveries received since start.
    received: AtomicU64,
    /// `received` when [`Transport::is_idle`] last looked.
    received_at_last_look: AtomicU64,
    /// Per group, a consumer that never joins it, to read its commits.
    offset_readers: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    /// Topics found missing, and when: a reply address naming a topic that
    /// does not exist costs one look at the cluster a minute, not one per
    /// message.
    missing_topics: Mutex<HashMap<String, std::time::Instant>>,
    /// The largest record the producer sends (librdkafka's
    /// `message.max.bytes`): larger outcomes are refused before anything of
    /// them is written.
    max_record_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;
/// How long a topic found missing is believed missing.
const MISSING_TOPIC_TTL: Duration = Duration::from_secs(60);

/// The Kafka transport of one pipeline.
#[derive(Clone)]
pub struct KafkaTransport {
    shared: Arc<Shared>,
}

fn env_secret(name: &Option<String>, what: &str) -> Result<Option<String>> {
    match name {
        None => Ok(None),
        Some(n) => std::env::var(n)
            .map(Some)
            .map_err(|_| anyhow!("the {what} is read from ${n}, which is not set")),
    }
}

/// The client settings every connection of this pipeline shares:
/// `defaults` first (`[transport.properties]` may change them), then the
/// pipeline's properties, then `fixed` (the transport's guarantees).
fn client_config(
    config: &KafkaConfig,
    client_id: &str,
    defaults: &[(&str, &str)],
    fixed: &[(&str, &str)],
) -> Result<ClientConfig> {
    let mut c = ClientConfig::new();
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    c.set("bootstrap.servers", &config.bootstrap_servers)
        .set("client.id", client_id)
        .set("security.protocol", &config.security_protocol);
    if let Some(m) = &config.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = env_secret(&config.sasl_username_env, "SASL user name")? {
        c.set("sasl.username", u);
    }
    if let Some(p) = env_secret(&config.sasl_password_env, "SASL password")? {
        c.set("sasl.password", p);
    }
    if let Some(ca) = &config.ssl_ca_location {
        c.set("ssl.ca.location", ca.display().to_string());
    }
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    for (k, v) in fixed {
        c.set(*k, *v);
    }
    Ok(c)
}

/// The topics and group of each route of a pipeline.
fn route_topics(pipeline: &Pipeline, config: &KafkaConfig) -> Vec<RouteTopics> {
    let prefix = &config.topic_prefix;
    pipeline
        .plugins
        .iter()
        .map(|p| RouteTopics {
            route: p.name.to_string(),
            group: format!("{}.{}", config.group_prefix, p.name),
            topics: p
                .subscriptions()
                .map(|(t, _)| format!("{prefix}{t}"))
                .collect(),
            retry_topic: format!("{prefix}{RETRY_TOPIC_PREFIX}{}", p.name),
        })
        .collect()
}

fn is_already_exists(code: RDKafkaErrorCode) -> bool {
    code == RDKafkaErrorCode::TopicAlreadyExists
}

impl KafkaTransport {
    /// The transport of a pipeline whose `[transport]` is `kafka`. Clients
    /// connect in the background; nothing blocks here.
    pub fn new(pipeline: &Pipeline, config: &KafkaConfig) -> Result<Self> {
        let prefix = &config.topic_prefix;
        let routes = route_topics(pipeline, config);
        let client_id = format!("switchyard-{}", pipeline.name);
        let producer: FutureProducer = client_config(
            config,
            &client_id,
            &[("message.timeout.ms", "60000"), ("linger.ms", "2")],
            &[("enable.idempotence", "true"), ("acks", "all")],
        )?
        .create()
        .context("cannot create the Kafka producer")?;
        let admin: AdminClient<DefaultClientContext> = client_config(config, &client_id, &[], &[])?
            .create()
            .context("cannot create the Kafka admin client")?;
        Ok(KafkaTransport {
            shared: Arc::new(Shared {
                config: config.clone(),
                source: format!("switchyard/{}", pipeline.name),
                routing: RouteTable::new(Topology::of(pipeline), routes),
                replies_topic: format!("{prefix}switchyard.replies"),
                producer,
                admin,
                known_topics: Mutex::new(HashSet::new()),
                in_flight: AtomicI64::new(0),
                held: AtomicI64::new(0),
                received: AtomicU64::new(0),
                received_at_last_look: AtomicU64::new(0),
                offset_readers: Mutex::new(HashMap::new()),
                missing_topics: Mutex::new(HashMap::new()),
                max_record_bytes: config
                    .properties
                    .iter()
                    .find(|(k, _)| k == "message.max.bytes")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(DEFAULT_MAX_RECORD_BYTES),
            }),
        })
    }

    /// The topic of a message type.
    pub fn topic_of(&self, message_type: &str) -> String {
        format!("{}{message_type}", self.shared.config.topic_prefix)
    }

    fn route(&self, route: &str) -> Result<RouteTopics> {
        self.shared
            .routing
            .routes()
            .into_iter()
            .find(|r| r.route == route)
            .with_context(|| format!("route {route} is not part of this pipeline"))
    }

    /// Creates the topics that do not exist yet.
    async fn ensure_topics(&self, topics: &[String]) -> Result<()> {
        ensure_topics(&self.shared, topics).await
    }
}

async fn ensure_topics(shared: &Shared, topics: &[String]) -> Result<()> {
    let missing: Vec<&String> = {
        let known = shared
            .known_topics
            .lock()
            .map_err(|_| anyhow!("topic cache poisoned"))?;
        // A topic named twice in one CreateTopics request fails the request.
        let unique: BTreeSet<&String> = topics.iter().filter(|t| !known.contains(*t)).collect();
        unique.into_iter().collect()
    };
    if missing.is_empty() {
        return Ok(());
    }
    if !shared.config.create_topics {
        for t in missing {
            if !topic_exists(shared, t, 10).await {
                bail!(
                    "topic {t} does not exist on the Kafka cluster {}; create it, or let the host create topics (`create_topics = true`)",
                    shared.config.bootstrap_servers
                );
            }
        }
        return Ok(());
    }
    let specs: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            NewTopic::new(
                t.as_str(),
                shared.config.partitions,
                TopicReplication::Fixed(shared.config.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(shared.config.timeout));
    let results = tokio::time::timeout(
        shared.config.timeout,
        shared.admin.create_topics(specs.iter(), &options),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "no answer from the Kafka cluster {} within {:?}",
            shared.config.bootstrap_servers,
            shared.config.timeout
        )
    })?
    .with_context(|| {
        format!(
            "cannot create topics on the Kafka cluster {}",
            shared.config.bootstrap_servers
        )
    })?;
    let mut known = shared
        .known_topics
        .lock()
        .map_err(|_| anyhow!("topic cache poisoned"))?;
    for r in results {
        match r {
            Ok(t) => {
                known.insert(t);
            }
            Err((t, code)) if is_already_exists(code) => {
                known.insert(t);
            }
            Err((t, code)) => bail!("cannot create topic {t}: {code}"),
        }
    }
    Ok(())
}

/// A message's Kafka headers: CloudEvents attributes as `ce_*`, the media
/// type as `content-type`, then the message's own headers.
fn headers(e: &Envelope, source: &str, not_before_ms: Option<u64>) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(12 + e.headers.len());
    // One buffer for every `ce_*` name; librdkafka copies what it is given.
    let mut key = String::with_capacity(32);
    let mut ce = |h: OwnedHeaders, name: &str, value: &str| {
        key.clear();
        key.push_str(CE_PREFIX);
        key.push_str(name);
        h.insert(Header {
            key: &key,
            value: Some(value.as_bytes()),
        })
    };
    for (name, value) in cloudevents::attributes(e, source) {
        h = ce(h, name, &value);
    }
    if let Some(due) = not_before_ms {
        h = ce(h, cloudevents::NOT_BEFORE, &due.to_string());
    }
    h = h.insert(Header {
        key: CONTENT_TYPE_HEADER,
        value: Some(e.content_type.as_bytes()),
    });
    for (name, value) in &e.headers {
        if name.starts_with(CE_PREFIX) || name == CONTENT_TYPE_HEADER {
            tracing::warn!(message.id = %e.id, header = %crate::text::clip(name, 64), "Header name is reserved by the Kafka binding; not sent");
            continue;
        }
        h = h.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    h
}

/// A message from its Kafka form, with the due time of a delayed retry.
/// The type falls back to the topic's name without the prefix.
///
/// Works on the record as librdkafka holds it: only the payload and the
/// attributes the envelope keeps are copied.
pub fn envelope<M: rdkafka::Message>(
    m: &M,
    prefix: &str,
    kind_of: impl Fn(&str) -> Option<Kind>,
) -> (Result<Envelope, String>, Option<u64>) {
    // CloudEvents attributes by name, without the prefix; a later header of
    // the same name wins.
    let mut attrs: Vec<(&str, &str)> = Vec::new();
    let mut own: Vec<(String, String)> = Vec::new();
    let mut content_type = None;
    if let Some(hs) = m.headers() {
        attrs.reserve(hs.count());
        for h in hs.iter() {
            let Some(value) = h.value.and_then(|v| std::str::from_utf8(v).ok()) else {
                continue;
            };
            if let Some(name) = h.key.strip_prefix(CE_PREFIX) {
                attrs.push((name, value));
            } else if h.key == CONTENT_TYPE_HEADER {
                content_type = Some(value.to_owned());
            } else {
                own.push((h.key.to_owned(), value.to_owned()));
            }
        }
    }
    let attr = |name: &str| {
        attrs
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| Cow::Borrowed(*v))
    };
    let not_before = attr(cloudevents::NOT_BEFORE).and_then(|v| v.parse::<u64>().ok());
    // The record's own properties, worked out only where an attribute is
    // missing.
    let fallbacks = cloudevents::Fallbacks {
        // A record without an id is still one record: its place names it.
        id: attr("id").is_none().then(|| record_id(m)),
        message_type: match attr("type") {
            Some(_) => None,
            None => m.topic().strip_prefix(prefix).map(str::to_owned),
        },
        created_at_ms: m
            .timestamp()
            .to_millis()
            .and_then(|t| u64::try_from(t).ok()),
        correlation_id: None,
        reply_to: None,
        // The CloudEvents Kafka binding: the record key is the partition key.
        partition_key: match attr("partitionkey") {
            Some(_) => None,
            None => m
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_owned),
        },
        content_type,
    };
    let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
    // Only the host writes a route's retry topic (delayed retries, replays).
    let retry_state = m
        .topic()
        .strip_prefix(prefix)
        .is_some_and(|t| t.starts_with(RETRY_TOPIC_PREFIX));
    let result = cloudevents::decode(attr, fallbacks, kind_of, payload, own, retry_state);
    (result, not_before)
}

/// A record as a route takes it: decoded, with its reply-to checked against
/// the pipeline's namespace, or, when either fails, what can be said of it
/// (the value untouched) with the reason it is malformed; and the due time
/// of a delayed retry.
pub fn receive<M: rdkafka::Message>(
    m: &M,
    prefix: &str,
    kind_of: impl Fn(&str) -> Option<Kind>,
) -> (Envelope, Option<String>, Option<u64>) {
    let (result, not_before) = envelope(m, prefix, &kind_of);
    let result = result.and_then(|e| match e.reply_to.as_deref() {
        Some(r) => check_reply_to(r, prefix, |t| kind_of(t).is_some()).map(|()| e),
        None => Ok(e),
    });
    match result {
        Ok(e) => (e, None, not_before),
        Err(reason) => {
            let message_type = m
                .topic()
                .strip_prefix(prefix)
                .unwrap_or(m.topic())
                .to_owned();
            let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
            (
                cloudevents::salvage(record_id(m), message_type, payload),
                Some(reason),
                not_before,
            )
        }
    }
}

/// The id of a record that carries none: its place in the cluster.
fn record_id<M: rdkafka::Message>(m: &M) -> String {
    format!("kafka-{}-{}-{}", m.topic(), m.partition(), m.offset())
}

/// What a batch's outcomes write, per [`KafkaSubscription::outcome_records`].
struct OutcomeRecords {
    /// Records tagged with their settlement's index in the batch.
    records: Vec<Record<usize>>,
    replies: Vec<Record<usize>>,
    /// The topics `records` go to, each once.
    topics: Vec<String>,
    /// Per settlement: why the cluster will not take its outcome.
    refused: Vec<Option<String>>,
}

/// A record to write: its topic, key, message and headers, and a tag the
/// caller knows it by.
struct Record<T> {
    tag: T,
    topic: String,
    key: Option<String>,
    message: Envelope,
    headers: OwnedHeaders,
}

impl<T> Record<T> {
    fn new(tag: T, topic: String, message: Envelope, headers: OwnedHeaders) -> Self {
        Record {
            tag,
            topic,
            key: message.partition_key.clone(),
            message,
            headers,
        }
    }

    /// What librdkafka counts against `message.max.bytes`, with room for
    /// its framing: payload, key and headers.
    fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 16)
            .sum();
        self.message.payload.len() + self.key.as_ref().map_or(0, String::len) + headers + 128
    }
}

/// Why a record was not written.
struct ProduceError {
    text: String,
    /// Writing it again cannot succeed: the cluster refuses this record
    /// (too large, not allowed, invalid), not the moment.
    permanent: bool,
}

/// Errors a record gets for what it is, not for the state of the cluster.
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidArgument
    )
}

/// Sends every record and waits for all acknowledgements.
async fn produce_all<T>(
    producer: &FutureProducer,
    records: Vec<Record<T>>,
    timeout: Duration,
) -> Vec<(T, Envelope, Result<(), ProduceError>)> {
    let sends = records.iter().map(|r| {
        let mut record = FutureRecord::to(&r.topic)
            .payload(&r.message.payload)
            .headers(r.headers.clone())
            .timestamp(i64::try_from(r.message.created_at_ms).unwrap_or(i64::MAX));
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        producer.send(record, timeout)
    });
    let results = futures_util::future::join_all(sends).await;
    records
        .into_iter()
        .zip(results)
        .map(|(r, result)| {
            let e = r.message;
            let result = result.map(|_| ()).map_err(|(err, _)| ProduceError {
                text: format!(
                    "cannot write {} {} to {}: {err}",
                    e.message_type, e.id, r.topic
                ),
                permanent: err.rdkafka_error_code().is_some_and(is_permanent),
            });
            (r.tag, e, result)
        })
        .collect()
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn ping(&self) -> Result<()> {
        // The metadata of one topic of the host's own: a request the
        // cluster answers, on the producer's client, beside the consumers.
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared
                .producer
                .client()
                .fetch_metadata(
                    Some(&shared.replies_topic),
                    shared.config.timeout.min(Duration::from_secs(2)),
                )
                .map(|_| ())
                .map_err(|e| anyhow!("the cluster did not answer: {e}"))
        })
        .await
        .map_err(|e| anyhow!("the metadata request stopped: {e}"))?
    }

    async fn subscribe(&self, route: &str) -> Result<Box<dyn Subscription>> {
        let r = self.route(route)?.clone();
        self.ensure_topics(&r.all_topics()).await?;
        let context = RebalanceContext {
            route: r.route.clone(),
            revoked: Arc::new(Mutex::new(Vec::new())),
        };
        let revoked = context.revoked.clone();
        let consumer: StreamConsumer<RebalanceContext> = client_config(
            &self.shared.config,
            &format!("switchyard-{}", r.group),
            &[
                ("auto.offset.reset", "earliest"),
                ("auto.commit.interval.ms", "1000"),
                // A route reads its (mostly empty) retry topic beside its
                // message topics; a broker that holds a fetch for its whole
                // wait when some partitions are empty (tansu) would
                // otherwise delay messages by up to librdkafka's 500 ms.
                ("fetch.wait.max.ms", "100"),
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "1000"),
            ],
            &[
                ("group.id", r.group.as_str()),
                ("enable.auto.commit", "true"),
                ("enable.auto.offset.store", "false"),
                ("isolation.level", "read_committed"),
                ("enable.partition.eof", "false"),
            ],
        )?
        .create_with_context(context)
        .with_context(|| format!("cannot create the Kafka consumer of route {route}"))?;
        let topics: Vec<&str> = r
            .topics
            .iter()
            .map(String::as_str)
            .chain([r.retry_topic.as_str()])
            .collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("cannot subscribe route {route} to {topics:?}"))?;
        Ok(Box::new(KafkaSubscription {
            shared: self.shared.clone(),
            topics: r,
            consumer: Arc::new(consumer),
            revoked,
            pending: HashMap::new(),
            open: HashMap::new(),
            done: HashMap::new(),
            finished: HashMap::new(),
            held: BTreeMap::new(),
            next_receipt: 0,
            paused: false,
        }))
    }

    async fn enqueue(&self, messages: Vec<Envelope>) -> Result<usize> {
        let mut deliveries = 0;
        let mut records = Vec::with_capacity(messages.len());
        let mut topics = Vec::new();
        for e in messages {
            let routes = self.shared.routing.destinations(&e.message_type);
            if routes == 0 && e.kind == Kind::Command {
                bail!(
                    "no plugin in this pipeline handles command {}",
                    e.message_type
                );
            }
            deliveries += routes;
            let topic = self.topic_of(&e.message_type);
            topics.push(topic.clone());
            let h = headers(&e, &self.shared.source, None);
            records.push(Record::new((), topic, e, h));
        }
        topics.sort_unstable();
        topics.dedup();
        self.ensure_topics(&topics).await?;
        for (_, _, r) in
            produce_all(&self.shared.producer, records, self.shared.config.timeout).await
        {
            r.map_err(|e| anyhow!(e.text))?;
        }
        Ok(deliveries)
    }

    async fn enqueue_to(&self, route: &str, messages: Vec<Envelope>) -> Result<()> {
        // The retry topic is the route's own: a replay goes there, due now.
        let topic = self.route(route)?.retry_topic.clone();
        self.ensure_topics(std::slice::from_ref(&topic)).await?;
        let now = now_ms();
        let records = messages
            .into_iter()
            .map(|e| {
                let h = headers(&e, &self.shared.source, Some(now));
                Record::new((), topic.clone(), e, h)
            })
            .collect();
        for (_, _, r) in
            produce_all(&self.shared.producer, records, self.shared.config.timeout).await
        {
            r.map_err(|e| anyhow!(e.text))?;
        }
        Ok(())
    }

    async fn is_idle(&self) -> Result<bool> {
        let before = self.shared.received.load(Ordering::SeqCst);
        // Deliveries since the last look: busy, without asking the cluster
        // (a drain polls often; the cluster's answers cost round trips).
        if self
            .shared
            .received_at_last_look
            .swap(before, Ordering::SeqCst)
            != before
        {
            return Ok(false);
        }
        // `looks_idle` starts with nothing in flight or held (a due retry
        // counts as one or the other while it moves). If nothing was
        // received while it asked the cluster either, nothing came into
        // hand, so no route of this host settled anything meanwhile (a
        // settle needs a delivery in hand), and the ends and commits it read
        // are one consistent picture.
        Ok(self.looks_idle().await? && self.shared.received.load(Ordering::SeqCst) == before)
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn location(&self) -> String {
        self.shared.config.bootstrap_servers.clone()
    }

    fn queue(&self, route: &str) -> String {
        self.route(route)
            .map(|r| r.topics.join(","))
            .unwrap_or_else(|_| route.to_owned())
    }

    fn consumer_group(&self, route: &str) -> Option<String> {
        self.route(route).ok().map(|r| r.group.clone())
    }

    /// New routes get their topics (and their consumer group when they
    /// subscribe); routes that left stop reading, their group's offsets
    /// kept. A route that stays must keep its topics: its group's
    /// subscription is fixed while it runs.
    async fn set_routing(&self, pipeline: &Pipeline) -> Result<()> {
        let new = route_topics(pipeline, &self.shared.config);
        let old = self.shared.routing.routes();
        let changed: Vec<&str> = new
            .iter()
            .filter(|n| {
                old.iter()
                    .any(|o| o.route == n.route && o.topics != n.topics)
            })
            .map(|n| n.route.as_str())
            .collect();
        if !changed.is_empty() {
            bail!(
                "on Kafka the message types a running route reads cannot change (route {}); restart the host to apply this change",
                changed.join(", ")
            );
        }
        let topics: Vec<String> = new
            .iter()
            .filter(|n| !old.iter().any(|o| o.route == n.route))
            .flat_map(RouteTopics::all_topics)
            .collect();
        self.ensure_topics(&topics).await?;
        self.shared.routing.replace(Topology::of(pipeline), new);
        Ok(())
    }

    async fn start_consuming(&self) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        let mut topics: Vec<String> = self
            .shared
            .routing
            .routes()
            .iter()
            .flat_map(RouteTopics::all_topics)
            .collect();
        topics.push(self.shared.replies_topic.clone());
        self.ensure_topics(&topics).await?;
        Ok(Box::new(()))
    }

    async fn reply_inbox(&self) -> Result<Box<dyn ReplyInbox>> {
        let topic = self.shared.replies_topic.clone();
        self.ensure_topics(std::slice::from_ref(&topic)).await?;
        let group = format!("switchyard-cli-{}", crate::envelope::new_id());
        let consumer: StreamConsumer = client_config(
            &self.shared.config,
            "switchyard-cli",
            &[],
            &[
                ("group.id", group.as_str()),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
            ],
        )?
        .create()
        .context("cannot create the reply consumer")?;
        // Start at the current end of every partition, found before the
        // command goes out, so the reply cannot slip past.
        let timeout = self.shared.config.timeout;
        let meta = consumer
            .fetch_metadata(Some(&topic), timeout)
            .with_context(|| format!("cannot read the partitions of {topic}"))?;
        let mut tpl = TopicPartitionList::new();
        for t in meta.topics() {
            for p in t.partitions() {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p.id(), timeout)
                    .with_context(|| format!("cannot read the end of {topic}/{}", p.id()))?;
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(high))
                    .map_err(|e| anyhow!("cannot assign {topic}/{}: {e}", p.id()))?;
            }
        }
        consumer
            .assign(&tpl)
            .with_context(|| format!("cannot read {topic}"))?;
        Ok(Box::new(KafkaInbox {
            consumer,
            address: topic,
            prefix: self.shared.config.topic_prefix.clone(),
        }))
    }
}

impl KafkaTransport {
    /// Nothing in flight or held, and every group has committed up to the
    /// end of every partition it reads.
    async fn looks_idle(&self) -> Result<bool> {
        // Held before in flight: see `take_due`.
        if self.shared.held.load(Ordering::SeqCst) > 0
            || self.shared.in_flight.load(Ordering::SeqCst) > 0
        {
            return Ok(false);
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || -> Result<bool> {
            for r in &shared.routing.routes() {
                let reader = offset_reader(&shared, &r.group)?;
                let timeout = shared.config.timeout;
                let mut tpl = TopicPartitionList::new();
                let mut ends = HashMap::new();
                for topic in r.all_topics() {
                    let meta = reader
                        .fetch_metadata(Some(&topic), timeout)
                        .with_context(|| format!("cannot read the partitions of {topic}"))?;
                    for t in meta.topics() {
                        for p in t.partitions() {
                            let (low, high) = reader
                                .fetch_watermarks(&topic, p.id(), timeout)
                                .with_context(|| {
                                    format!("cannot read the end of {topic}/{}", p.id())
                                })?;
                            ends.insert((topic.clone(), p.id()), (low, high));
                            tpl.add_partition(&topic, p.id());
                        }
                    }
                }
                let committed = reader
                    .committed_offsets(tpl, timeout)
                    .with_context(|| format!("cannot read the commits of group {}", r.group))?;
                for e in committed.elements() {
                    let Some((low, high)) = ends.get(&(e.topic().to_owned(), e.partition())) else {
                        continue;
                    };
                    let done = match e.offset() {
                        Offset::Offset(o) => o >= *high,
                        _ => low >= high,
                    };
                    if !done {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        })
        .await
        .context("idle check task failed")?
    }
}

/// Whether a topic exists, asking the cluster up to `looks` times 100 ms
/// apart when it is not known yet (a cluster that creates topics on first
/// use creates it then). A topic found missing is not asked about again for
/// a minute.
async fn topic_exists(shared: &Shared, topic: &str, looks: u32) -> bool {
    if shared.known_topics.lock().is_ok_and(|k| k.contains(topic)) {
        return true;
    }
    // Only a single look (a reply address) trusts an earlier miss: a topic
    // an operator creates for outputs is found on the next look.
    if looks == 1
        && shared.missing_topics.lock().is_ok_and(|m| {
            m.get(topic)
                .is_some_and(|t| t.elapsed() < MISSING_TOPIC_TTL)
        })
    {
        return false;
    }
    for look in 0..looks {
        if look > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let producer = shared.producer.clone();
        let (t, timeout) = (topic.to_owned(), shared.config.timeout);
        let found = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&t), timeout)
                .is_ok_and(|m| {
                    m.topics().iter().any(|mt| {
                        mt.name() == t && mt.error().is_none() && !mt.partitions().is_empty()
                    })
                })
        })
        .await
        .unwrap_or(false);
        if found {
            if let Ok(mut k) = shared.known_topics.lock() {
                k.insert(topic.to_owned());
            }
            return true;
        }
    }
    if let Ok(mut m) = shared.missing_topics.lock() {
        m.retain(|_, t| t.elapsed() < MISSING_TOPIC_TTL);
        m.insert(topic.to_owned(), std::time::Instant::now());
    }
    false
}

/// Where a reply may be written: a replies topic in the pipeline's own
/// namespace, `<prefix>switchyard.replies` or any `<prefix><name>.replies`
/// a requester reads, and never a topic of a message type this pipeline
/// routes. A command can thus never make the host write into a type's
/// topic, a route's retry topic, or another system's topics. The name must
/// be one Kafka accepts (letters, digits, `.`, `_` and `-`, at most 249).
fn check_reply_to(
    address: &str,
    prefix: &str,
    routes_type: impl Fn(&str) -> bool,
) -> Result<(), String> {
    let valid_name = address.len() <= 249
        && address
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let in_namespace = address.strip_prefix(prefix).is_some_and(|name| {
        (name == "switchyard.replies"
            || name.ends_with(".replies")
            || name.starts_with("switchyard.replies."))
            && !name.starts_with(RETRY_TOPIC_PREFIX)
            && !routes_type(name)
    });
    if valid_name && in_namespace {
        Ok(())
    } else {
        Err(format!(
            "its reply-to address `{}` is not a replies topic of this pipeline ({prefix}switchyard.replies or {prefix}<name>.replies)",
            crate::limits::quote(address)
        ))
    }
}

fn offset_reader(shared: &Shared, group: &str) -> Result<Arc<BaseConsumer>> {
    let mut readers = shared
        .offset_readers
        .lock()
        .map_err(|_| anyhow!("offset reader cache poisoned"))?;
    if let Some(r) = readers.get(group) {
        return Ok(r.clone());
    }
    let reader: Arc<BaseConsumer> = Arc::new(
        client_config(
            &shared.config,
            "switchyard-idle-check",
            &[],
            &[("group.id", group), ("enable.auto.commit", "false")],
        )?
        .create()
        .context("cannot create an offset reader")?,
    );
    readers.insert(group.to_owned(), reader.clone());
    Ok(reader)
}

/// Reads replies from the replies topic, from where it ended when the
/// inbox was made, and keeps the one for the command it waits for.
struct KafkaInbox {
    consumer: StreamConsumer,
    address: String,
    prefix: String,
}

#[async_trait]
impl ReplyInbox for KafkaInbox {
    fn address(&self) -> &str {
        &self.address
    }

    async fn next_reply(&mut self, deadline: tokio::time::Instant) -> Result<Option<Reply>> {
        loop {
            let m = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => return Ok(None),
                Ok(m) => m.context("cannot read replies")?.detach(),
            };
            // The replies topic is shared: what is not a reply is not ours.
            if let (Ok(e), _) = envelope(&m, &self.prefix, |_| Some(Kind::Event)) {
                return Ok(Some(Reply::received(&self.address, e)));
            }
        }
    }
}

/// Commits on revocation and tells the route which partitions it lost.
struct RebalanceContext {
    route: String,
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // What is stored is final: commit it before another host takes
            // over. Work still in hand for these partitions will be done
            // again by the new owner.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(route = %self.route, error = %e, "Nothing committed on revoke");
            }
            if let Ok(mut r) = self.revoked.lock() {
                r.extend(
                    tpl.elements()
                        .iter()
                        .map(|e| (e.topic().to_owned(), e.partition())),
                );
            }
            tracing::info!(route = %self.route, partitions = tpl.count(), "Partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(route = %self.route, partitions = tpl.count(), "Partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(route = %self.route, error = %e, "Rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

type Partition = (String, i32);

/// A set of offsets kept as ranges: finished offsets come in long runs.
#[derive(Debug, Default)]
struct OffsetRanges {
    /// First offset of each run → its last offset.
    runs: BTreeMap<i64, i64>,
}

impl OffsetRanges {
    fn contains(&self, offset: i64) -> bool {
        self.runs
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, last)| *last >= offset)
    }

    fn insert(&mut self, offset: i64) {
        if self.contains(offset) {
            return;
        }
        let before = self
            .runs
            .range(..offset)
            .next_back()
            .filter(|(_, last)| **last == offset - 1)
            .map(|(first, _)| *first);
        let after = self.runs.remove(&(offset + 1));
        let first = before.unwrap_or(offset);
        self.runs.insert(first, after.unwrap_or(offset));
    }

    /// Forgets every offset below `offset`.
    fn remove_below(&mut self, offset: i64) {
        let kept = self.runs.split_off(&offset);
        if let Some((_, last)) = self.runs.last_key_value()
            && *last >= offset
        {
            let last = *last;
            self.runs = kept;
            self.runs.insert(offset, last);
            return;
        }
        self.runs = kept;
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// A received delivery's place in its partition.
#[derive(Clone, Debug)]
struct Position {
    partition: Partition,
    offset: i64,
}

/// The consuming side of one route.
pub struct KafkaSubscription {
    shared: Arc<Shared>,
    topics: RouteTopics,
    /// Shared with [`Subscription::receive`], which reads records in place
    /// while it updates the books.
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    revoked: Arc<Mutex<Vec<Partition>>>,
    /// Receipt → position, for deliveries handed to the route.
    pending: HashMap<u64, Position>,
    /// Offsets received and not finished, per partition.
    open: HashMap<Partition, BTreeSet<i64>>,
    /// The highest finished offset, per partition.
    done: HashMap<Partition, i64>,
    /// Offsets finished above one still open, per partition (empty when
    /// everything finished in order). A partition given back is read again
    /// from its lowest open offset; what was finished after it is skipped,
    /// not handled again.
    finished: HashMap<Partition, OffsetRanges>,
    /// Delayed retries waiting for their time: (due, receipt) → delivery.
    held: BTreeMap<(u64, u64), (Delivery, Position)>,
    next_receipt: u64,
    /// Whether the retry topic is paused because too much is held.
    paused: bool,
}

impl KafkaSubscription {
    /// The records a batch's outcomes write, its replies apart, and the
    /// settlements refused before anything is written (a record larger
    /// than the producer may send).
    fn outcome_records(&self, batch: &[Settlement]) -> OutcomeRecords {
        let max_bytes = self.shared.max_record_bytes;
        let mut planned = OutcomeRecords {
            records: Vec::new(),
            replies: Vec::new(),
            topics: Vec::new(),
            refused: vec![None; batch.len()],
        };
        for (i, s) in batch.iter().enumerate() {
            let (own, reply) = self.records_of(i, s);
            planned.replies.extend(reply);
            // Checked before anything of the settlement is written.
            if let Some(big) = own.iter().find(|r| r.size() > max_bytes) {
                let reason = format!(
                    "{} {} would be a record of about {} bytes, more than the {max_bytes} the producer may send (message.max.bytes)",
                    big.message.message_type,
                    big.message.id,
                    big.size()
                );
                if matches!(s.outcome, Outcome::DeadLettered { .. }) {
                    tracing::warn!(error = %reason, "Dead-letter copy not sent; the record is in the store");
                } else {
                    planned.refused[i] = Some(reason);
                }
                continue;
            }
            planned.topics.extend(own.iter().map(|r| r.topic.clone()));
            planned.records.extend(own);
        }
        planned.topics.sort_unstable();
        planned.topics.dedup();
        planned
    }

    /// The records settlement `i` writes, and its reply.
    fn records_of(&self, i: usize, s: &Settlement) -> (Vec<Record<usize>>, Option<Record<usize>>) {
        let source = &self.shared.source;
        let prefix = &self.shared.config.topic_prefix;
        let mut own = Vec::new();
        let mut reply_record = None;
        match &s.outcome {
            Outcome::Handled { outputs, reply, .. } => {
                for o in outputs {
                    let topic = format!("{prefix}{}", o.message_type);
                    let h = headers(o, source, None);
                    own.push(Record::new(i, topic, o.clone(), h));
                }
                if let Some(r) = reply {
                    let e = r.envelope(&s.delivery.envelope.message_type);
                    let h = headers(&e, source, None);
                    let mut record = Record::new(i, r.address.clone(), e, h);
                    record.key = Some(r.correlation_id.clone());
                    reply_record = Some(record);
                }
            }
            Outcome::Retry {
                message,
                not_before_ms,
            } => {
                let topic = self.topics.retry_topic.clone();
                let h = headers(message, source, Some(*not_before_ms));
                own.push(Record::new(i, topic, message.clone(), h));
            }
            Outcome::DeadLettered { copy, fault, .. } => {
                if let Some(f) = fault {
                    let topic = format!("{prefix}{}", f.message_type);
                    let h = headers(f, source, None);
                    own.push(Record::new(i, topic, f.clone(), h));
                }
                if let Some(c) = copy {
                    let topic = format!("{prefix}{}.dlq", c.message_type);
                    let h = headers(c, source, None);
                    own.push(Record::new(i, topic, c.clone(), h));
                }
            }
        }
        (own, reply_record)
    }

    /// Writes the records of a batch. A record the cluster refuses for good
    /// refuses its settlement (a dead-letter copy is only dropped); any
    /// other failure fails the whole batch.
    async fn write(
        &self,
        batch: &[Settlement],
        records: Vec<Record<usize>>,
        topics: &[String],
        refused: &mut [Option<String>],
    ) -> Result<()> {
        ensure_topics(&self.shared, topics).await?;
        let mut transient = None;
        for (i, e, r) in
            produce_all(&self.shared.producer, records, self.shared.config.timeout).await
        {
            let Err(err) = r else { continue };
            if !err.permanent {
                transient.get_or_insert(err.text);
                continue;
            }
            if matches!(batch[i].outcome, Outcome::DeadLettered { .. }) {
                tracing::warn!(message.id = %e.id, error = %err.text, "Dead-letter copy not written; the record is in the store");
            } else {
                refused[i].get_or_insert(format!(
                    "{} (the cluster refuses this record; other records of the same outcome may have been written)",
                    err.text
                ));
            }
        }
        match transient {
            Some(t) => Err(anyhow!(t)),
            None => Ok(()),
        }
    }

    /// Sends the replies of commands whose outcomes were written. A reply
    /// that cannot be written fails the reply, not the command; a command
    /// whose outcome was refused gets no reply (it is dead-lettered, not
    /// done).
    async fn send_replies(&self, replies: Vec<Record<usize>>, refused: &[Option<String>]) {
        let mut deliverable = Vec::with_capacity(replies.len());
        for reply in replies {
            if refused[reply.tag].is_some() {
                continue;
            }
            if topic_exists(&self.shared, &reply.topic, 1).await {
                deliverable.push(reply);
            } else {
                tracing::warn!(reply.to = %reply.topic, in_reply_to = ?reply.message.causation_id, "The reply-to topic does not exist; the reply is dropped");
            }
        }
        for (_, e, r) in produce_all(
            &self.shared.producer,
            deliverable,
            self.shared.config.timeout,
        )
        .await
        {
            if let Err(err) = r {
                tracing::warn!(in_reply_to = ?e.causation_id, error = %err.text, "The reply is dropped");
            }
        }
    }

    /// Forgets what belongs to partitions this host no longer owns.
    fn apply_revocations(&mut self) {
        let revoked: Vec<Partition> = match self.revoked.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => return,
        };
        if revoked.is_empty() {
            return;
        }
        let gone: HashSet<Partition> = revoked.into_iter().collect();
        let before = self.held.len();
        self.held.retain(|_, (_, p)| !gone.contains(&p.partition));
        self.shared
            .held
            .fetch_sub((before - self.held.len()) as i64, Ordering::SeqCst);
        for p in &gone {
            self.open.remove(p);
            self.done.remove(p);
            self.finished.remove(p);
        }
    }

    fn delivery_of<M: rdkafka::Message>(&mut self, m: &M) -> (Delivery, Position, Option<u64>) {
        let shared = &self.shared;
        let (envelope, malformed, not_before) =
            receive(m, &shared.config.topic_prefix, |t| shared.routing.kind(t));
        self.next_receipt += 1;
        let position = Position {
            partition: (m.topic().to_owned(), m.partition()),
            offset: m.offset(),
        };
        // Per record: look the partition up before paying for its key.
        match self.open.get_mut(&position.partition) {
            Some(open) => {
                open.insert(position.offset);
            }
            None => {
                self.open.insert(
                    position.partition.clone(),
                    BTreeSet::from([position.offset]),
                );
            }
        }
        self.shared.received.fetch_add(1, Ordering::SeqCst);
        (
            Delivery {
                envelope,
                receipt: self.next_receipt,
                malformed,
                origin: Some(Origin {
                    topic: position.partition.0.clone(),
                    partition: position.partition.1,
                    offset: position.offset,
                }),
            },
            position,
            not_before,
        )
    }

    /// Hands a delivery to the route, or holds it until its time. A record
    /// read again after a rewind whose outcome is already settled is
    /// skipped.
    fn accept<M: rdkafka::Message>(&mut self, m: &M, batch: &mut Vec<Delivery>) {
        if !self.finished.is_empty()
            && self
                .finished
                .iter()
                .any(|((t, p), f)| *p == m.partition() && t == m.topic() && f.contains(m.offset()))
        {
            return;
        }
        let (d, position, not_before) = self.delivery_of(m);
        let from_retry = position.partition.0 == self.topics.retry_topic;
        match not_before {
            Some(due) if from_retry && due > now_ms() => {
                self.shared.held.fetch_add(1, Ordering::SeqCst);
                self.held.insert((due, d.receipt), (d, position));
            }
            _ => {
                self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
                self.pending.insert(d.receipt, position);
                batch.push(d);
            }
        }
    }

    /// Accepts the records librdkafka already holds, up to `max` in the
    /// batch, without waiting. An error ends the batch; the consumer reports
    /// lasting trouble again on the next wait.
    fn accept_ready(
        &mut self,
        consumer: &StreamConsumer<RebalanceContext>,
        batch: &mut Vec<Delivery>,
        max: usize,
    ) {
        // One stream for the whole batch: each stream registers (and on
        // drop unregisters) a waker slot under a lock.
        let mut records = consumer.stream();
        while batch.len() < max {
            match records.next().now_or_never() {
                Some(Some(Ok(m))) => self.accept(&m, batch),
                _ => break,
            }
        }
    }

    /// Moves due held retries into the batch.
    fn take_due(&mut self, batch: &mut Vec<Delivery>, max: usize) {
        let now = now_ms();
        while batch.len() < max {
            let Some(entry) = self.held.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let (d, position) = entry.remove();
            // In flight before no longer held: `looks_idle`, which reads
            // them the other way round, never sees it in neither.
            self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
            self.shared.held.fetch_sub(1, Ordering::SeqCst);
            self.pending.insert(d.receipt, position);
            batch.push(d);
        }
    }

    /// Pauses the retry topic while too much is held, resumes it after.
    fn throttle(&mut self) {
        let want_pause = !self.paused && self.held.len() >= MAX_HELD;
        let want_resume = self.paused && self.held.len() < MAX_HELD / 2;
        if !want_pause && !want_resume {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for e in assignment.elements_for_topic(&self.topics.retry_topic) {
            tpl.add_partition(e.topic(), e.partition());
        }
        if tpl.count() == 0 {
            return;
        }
        let result = if want_resume {
            self.consumer.resume(&tpl)
        } else {
            self.consumer.pause(&tpl)
        };
        match result {
            Ok(()) => self.paused = !want_resume,
            Err(e) => {
                tracing::warn!(route = %self.topics.route, error = %e, "Cannot pause or resume the retry topic")
            }
        }
    }

    /// Marks deliveries finished and stores, per partition, the offset up
    /// to which everything is finished.
    fn finish(&mut self, receipts: impl IntoIterator<Item = u64>) {
        let mut touched = HashSet::new();
        for r in receipts {
            let Some(p) = self.pending.remove(&r) else {
                continue;
            };
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Some(open) = self.open.get_mut(&p.partition) {
                open.remove(&p.offset);
            }
            let done = self.done.entry(p.partition.clone()).or_insert(p.offset);
            *done = (*done).max(p.offset);
            let lowest_open = self.open.get(&p.partition).and_then(|o| o.first());
            if lowest_open.is_some_and(|l| *l < p.offset) {
                self.finished
                    .entry(p.partition.clone())
                    .or_default()
                    .insert(p.offset);
            }
            touched.insert(p.partition);
        }
        let mut tpl = TopicPartitionList::new();
        for partition in touched {
            let next = match self.open.get(&partition).and_then(|o| o.first()) {
                Some(lowest_open) => *lowest_open,
                None => match self.done.get(&partition) {
                    Some(d) => d + 1,
                    None => continue,
                },
            };
            // Below the stored offset nothing is read again.
            if let Some(f) = self.finished.get_mut(&partition) {
                f.remove_below(next);
                if f.is_empty() {
                    self.finished.remove(&partition);
                }
            }
            if tpl
                .add_partition_offset(&partition.0, partition.1, Offset::Offset(next))
                .is_err()
            {
                continue;
            }
        }
        if tpl.count() == 0 {
            return;
        }
        // A partition revoked meanwhile cannot be stored: its new owner
        // handles those messages again.
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            tracing::debug!(route = %self.topics.route, error = %e, "Offsets not stored (partition revoked?)");
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Async) {
            tracing::debug!(route = %self.topics.route, error = %e, "Commit not started");
        }
    }

    /// Gives deliveries back: each partition is read again from the lowest
    /// given-back offset.
    fn rewind(&mut self, receipts: impl IntoIterator<Item = u64>) -> Result<()> {
        let mut lowest: HashMap<Partition, i64> = HashMap::new();
        for r in receipts {
            let Some(p) = self.pending.remove(&r) else {
                continue;
            };
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            let l = lowest.entry(p.partition).or_insert(p.offset);
            *l = (*l).min(p.offset);
        }
        for (partition, offset) in lowest {
            // Everything from there on is read again: forget it here.
            if let Some(open) = self.open.get_mut(&partition) {
                open.retain(|o| *o < offset);
            }
            let before = self.held.len();
            self.held
                .retain(|_, (_, p)| !(p.partition == partition && p.offset >= offset));
            self.shared
                .held
                .fetch_sub((before - self.held.len()) as i64, Ordering::SeqCst);
            // Deliveries received after these (taken ahead for the next
            // batch) are read again too: they are no longer in flight here.
            let before = self.pending.len();
            self.pending
                .retain(|_, p| !(p.partition == partition && p.offset >= offset));
            self.shared
                .in_flight
                .fetch_sub((before - self.pending.len()) as i64, Ordering::SeqCst);
            if let Err(e) = self.consumer.seek(
                &partition.0,
                partition.1,
                Offset::Offset(offset),
                self.shared.config.timeout,
            ) {
                tracing::warn!(route = %self.topics.route, topic = %partition.0, partition = partition.1, error = %e, "Cannot rewind; the messages come back after a restart or rebalance");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let mut batch = Vec::new();
        let consumer = self.consumer.clone();
        loop {
            self.apply_revocations();
            self.take_due(&mut batch, max);
            if !batch.is_empty() {
                break;
            }
            self.throttle();
            let wait = self
                .held
                .first_key_value()
                .map(|((due, _), _)| Duration::from_millis(due.saturating_sub(now_ms()).max(1)));
            let next = match wait {
                Some(w) => tokio::time::timeout(w, consumer.recv()).await.ok(),
                None => Some(consumer.recv().await),
            };
            let Some(next) = next else { continue };
            let m = next
                .with_context(|| format!("the consumer of route {} failed", self.topics.route))?;
            self.accept(&m, &mut batch);
            self.accept_ready(&consumer, &mut batch, max);
        }
        Ok(batch)
    }

    fn take_ready(&mut self, max: usize) -> Vec<Delivery> {
        let mut batch = Vec::new();
        self.apply_revocations();
        self.take_due(&mut batch, max);
        let consumer = self.consumer.clone();
        self.accept_ready(&consumer, &mut batch, max);
        // A busy route may not call `receive` for a long time.
        self.throttle();
        batch
    }

    async fn settle(&mut self, batch: Vec<Settlement>) -> Result<Vec<Refused>> {
        let OutcomeRecords {
            records,
            replies,
            topics,
            mut refused,
        } = self.outcome_records(&batch);
        if let Err(e) = self.write(&batch, records, &topics, &mut refused).await {
            self.rewind(batch.iter().map(|s| s.delivery.receipt))?;
            return Err(e.context(format!(
                "cannot settle a batch of route {}",
                self.topics.route
            )));
        }
        self.send_replies(replies, &refused).await;
        let mut out = Vec::new();
        let mut finished = Vec::with_capacity(batch.len());
        for (s, refusal) in batch.into_iter().zip(refused) {
            match refusal {
                // Still in hand: the route dead-letters it and settles it
                // again.
                Some(reason) => out.push(Refused {
                    settlement: s,
                    reason,
                }),
                None => finished.push(s.delivery.receipt),
            }
        }
        self.finish(finished);
        Ok(out)
    }

    async fn release(&mut self, unsettled: Vec<Delivery>) -> Result<()> {
        self.rewind(unsettled.into_iter().map(|d| d.receipt))
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.shared
            .held
            .fetch_sub(self.held.len() as i64, Ordering::SeqCst);
        self.shared
            .in_flight
            .fetch_sub(self.pending.len() as i64, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;

    use super::*;

    fn record(key: Option<&str>, headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{\"n\":1}".to_vec()),
            key.map(|k| k.as_bytes().to_vec()),
            "shop.Tick".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            2,
            41,
            headers,
        )
    }

    #[test]
    fn a_plain_record_is_named_by_its_topic_place_key_and_timestamp() {
        let (e, due) = envelope(&record(Some("A-1"), None), "shop.", |_| Some(Kind::Command));
        let e = e.unwrap();
        assert_eq!(due, None);
        assert_eq!(e.id, "kafka-shop.Tick-2-41");
        assert_eq!(e.message_type, "Tick");
        assert_eq!(e.kind, Kind::Command);
        assert_eq!(e.partition_key.as_deref(), Some("A-1"));
        assert_eq!(e.created_at_ms, 1_700_000_000_000);
        assert_eq!(e.content_type, crate::config::DEFAULT_CONTENT_TYPE);
    }

    #[test]
    fn headers_round_trip_and_reserved_names_are_not_sent() {
        let mut e = Envelope::new("Tick", Kind::Event, b"{}".to_vec(), "text/plain");
        e.partition_key = Some("p-7".into());
        e.correlation_id = Some("c-1".into());
        e.headers = vec![
            ("tenant".into(), "acme".into()),
            ("ce_id".into(), "forged".into()),
            ("content-type".into(), "forged".into()),
        ];
        let h = headers(&e, "switchyard/shop", Some(99));
        let (back, due) = envelope(&record(Some("other"), Some(h)), "shop.", |_| None);
        let back = back.unwrap();
        assert_eq!(due, Some(99));
        assert_eq!(back.id, e.id);
        assert_eq!(back.content_type, "text/plain");
        assert_eq!(back.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(
            back.partition_key.as_deref(),
            Some("p-7"),
            "the attribute wins over the record key"
        );
        assert_eq!(back.headers, vec![("tenant".to_owned(), "acme".to_owned())]);
    }

    #[test]
    fn offset_ranges_merge_runs_and_forget_below_a_point() {
        let mut r = OffsetRanges::default();
        for o in [5, 7, 6, 10, 9, 1] {
            r.insert(o);
        }
        assert_eq!(
            r.runs.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(1, 1), (5, 7), (9, 10)]
        );
        assert!(r.contains(6) && r.contains(10) && !r.contains(8) && !r.contains(2));
        r.remove_below(6);
        assert_eq!(
            r.runs.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(6, 7), (9, 10)]
        );
        r.remove_below(11);
        assert!(r.is_empty());
    }

    #[test]
    fn replies_go_only_to_replies_topics_of_the_pipeline() {
        let types = |t: &str| t == "PlaceOrder" || t == "audit.replies";
        for ok in [
            "shop.switchyard.replies",
            "shop.kcat.replies",
            "shop.switchyard.replies.cli-7",
        ] {
            assert!(check_reply_to(ok, "shop.", types).is_ok(), "{ok}");
        }
        for refused in [
            "shop.PlaceOrder",
            "shop.audit.replies",
            "shop.switchyard.retry.orders",
            "billing.replies",
            "payments.ChargeCard",
            "shop.bad name.replies",
        ] {
            assert!(
                check_reply_to(refused, "shop.", types).is_err(),
                "{refused}"
            );
        }
    }
}
