//! The RabbitMQ transport (AMQP 0-9-1, with lapin).
//!
//! Topology, declared by the host from the pipeline (idempotently, every
//! time it connects):
//!
//! - one durable topic exchange per pipeline (`switchyard.<pipeline>` unless
//!   set); every message is published to it with its type as routing key;
//! - one durable queue per route, `<exchange>.<route>`, bound to each type
//!   the route subscribes to: an event's queues are all its consumers', a
//!   command's is its one handler's;
//! - per route and delayed-retry level `n`, a queue `<exchange>.<route>.retry.<n>`
//!   whose messages expire (per-message TTL) back into the route's queue.
//!   One queue per level keeps a short wait from queuing behind a long one.
//!
//! Every publish (outputs, retries, replies, enqueues) waits for the
//! broker's confirm, and a delivery is acknowledged only after everything
//! its outcome published is confirmed. Deliveries are acknowledged on the
//! channel they came from: if that channel dies, the broker redelivers them
//! and their stale outcomes are dropped, never acked on a new channel.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::Acker;
use lapin::PublisherConfirm;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use super::{
    Delivery, Outcome, Refused, ReplyInbox, RouteTable, Settlement, Subscription, Topology,
    Transport, cloudevents,
};
use crate::config::{AmqpConfig, Pipeline, UrlSource, redact};
use crate::envelope::{Envelope, Kind, Reply, now_ms};

/// How long [`Transport::is_idle`] watches for deliveries before it
/// believes the queues are empty.
const IDLE_SETTLE: Duration = Duration::from_millis(100);
/// How often a route waiting for deliveries checks that its connection is
/// still up: a connection reset without a close frame does not always end
/// the consumer's stream.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);
/// How long a publish may wait for the broker's confirm before its batch
/// is given back.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an acknowledgement may take to be written before the channel
/// is taken for dead.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The CloudEvents AMQP binding's prefix for event attributes.
pub const CE_PREFIX: &str = "cloudEvents:";

/// The queues of one route.
#[derive(Clone, Debug)]
struct RouteQueues {
    route: String,
    queue: String,
    /// Routing keys (message types) bound to the queue.
    types: Vec<String>,
    /// Delayed-retry levels, one queue each.
    retry_levels: u32,
}

impl RouteQueues {
    /// Where copies of the route's dead letters go (`[dead_letters] broker`).
    fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    fn retry_queue(&self, level: u32) -> String {
        format!(
            "{}.retry.{}",
            self.queue,
            level.clamp(1, self.retry_levels.max(1))
        )
    }
}

struct Shared {
    url: String,
    config: AmqpConfig,
    /// Who receives what, and each route's queues; replaced when a running
    /// host's pipeline changes.
    routing: RouteTable<RouteQueues>,
    /// For messages created outside a route: CLI sends, replays.
    publisher: tokio::sync::Mutex<Option<Link>>,
    /// A connection of its own for [`Transport::ping`], apart from the
    /// publisher's and the routes'.
    probe: tokio::sync::Mutex<Option<Connection>>,
    /// Deliveries received and not yet settled, across routes.
    in_flight: AtomicI64,
    /// Deliveries received since start, across routes.
    received: AtomicU64,
    /// The routes' subscriptions, and how many of them wait for a delivery
    /// with none in hand: a route that has not asked yet may have
    /// deliveries prefetched to it, which the broker does not count.
    subscriptions: AtomicUsize,
    waiting: AtomicUsize,
    source: String,
    /// Declare `<queue>.dlq` per route and copy dead letters there.
    dead_letter_queues: bool,
}

/// A connection with a publisher-confirm channel.
struct Link {
    _connection: Connection,
    channel: Channel,
}

/// The RabbitMQ transport of one pipeline.
#[derive(Clone)]
pub struct AmqpTransport {
    shared: Arc<Shared>,
}

/// Makes an AMQP short string (at most 255 bytes) without panicking.
fn short(s: &str) -> Result<ShortString> {
    ShortString::try_new(s.to_owned()).map_err(|_| {
        anyhow!(
            "`{}` is longer than 255 bytes, the AMQP limit",
            crate::text::clip(s, 64)
        )
    })
}

impl AmqpTransport {
    /// The transport of a pipeline whose `[transport]` is `amqp`. Connects
    /// lazily, on first use.
    pub fn new(pipeline: &Pipeline, config: &AmqpConfig) -> Result<Self> {
        let url = match &config.url {
            UrlSource::Literal(u) => u.clone(),
            UrlSource::Env(name) => std::env::var(name)
                .map_err(|_| anyhow!("the broker URL is read from ${name}, which is not set"))?,
        };
        let routes = route_queues(pipeline, config);
        Ok(AmqpTransport {
            shared: Arc::new(Shared {
                source: format!("switchyard/{}", pipeline.name),
                url,
                config: config.clone(),
                routing: RouteTable::new(Topology::of(pipeline), routes),
                publisher: tokio::sync::Mutex::new(None),
                probe: tokio::sync::Mutex::new(None),
                in_flight: AtomicI64::new(0),
                received: AtomicU64::new(0),
                subscriptions: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                dead_letter_queues: pipeline.dead_letters.broker,
            }),
        })
    }

    fn route(&self, route: &str) -> Result<RouteQueues> {
        self.shared
            .routing
            .routes()
            .into_iter()
            .find(|r| r.route == route)
            .with_context(|| format!("route {route} is not part of this pipeline"))
    }

    /// The queue a route consumes, for tests and tools.
    pub fn queue_of(&self, route: &str) -> Result<String> {
        Ok(self.route(route)?.queue)
    }

    pub fn exchange(&self) -> &str {
        &self.shared.config.exchange
    }

    /// Nothing in flight, every route waiting for a delivery, and no
    /// message ready in any queue of the pipeline.
    async fn looks_idle(&self) -> Result<bool> {
        if self.shared.in_flight.load(Ordering::SeqCst) > 0
            || self.shared.waiting.load(Ordering::SeqCst)
                < self.shared.subscriptions.load(Ordering::SeqCst)
        {
            return Ok(false);
        }
        let routes = self.shared.routing.routes();
        self.with_publisher(async move |channel| {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            for r in &routes {
                let mut queues = vec![r.queue.clone()];
                queues.extend((1..=r.retry_levels).map(|l| r.retry_queue(l)));
                for q in queues {
                    let declared = channel
                        .queue_declare(short(&q)?, passive, FieldTable::default())
                        .await
                        .with_context(|| format!("cannot look at queue {q}"))?;
                    if declared.message_count() > 0 {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        })
        .await
    }

    /// Runs `f` with the shared publisher channel, connecting if needed. A
    /// failure drops the connection so the next call starts afresh.
    async fn with_publisher<T>(&self, f: impl AsyncFnOnce(&Channel) -> Result<T>) -> Result<T> {
        let mut guard = self.shared.publisher.lock().await;
        if guard
            .as_ref()
            .is_none_or(|l| !l.channel.status().connected())
        {
            let connection = connect(&self.shared).await?;
            let channel = confirm_channel(&connection).await?;
            declare_topology(&channel, &self.shared, &self.shared.routing.routes()).await?;
            *guard = Some(Link {
                _connection: connection,
                channel,
            });
        }
        let link = guard.as_ref().context("no broker connection")?;
        let result = f(&link.channel).await;
        if result.is_err() {
            *guard = None;
        }
        result
    }
}

/// The queues of each route of a pipeline.
fn route_queues(pipeline: &Pipeline, config: &AmqpConfig) -> Vec<RouteQueues> {
    pipeline
        .plugins
        .iter()
        .map(|p| RouteQueues {
            route: p.name.to_string(),
            queue: format!("{}.{}", config.exchange, p.name),
            types: p.subscriptions().map(|(t, _)| t.to_string()).collect(),
            retry_levels: p.retry.delayed,
        })
        .collect()
}

async fn connect(shared: &Shared) -> Result<Connection> {
    let shown = redact(&shared.url);
    // lapin can wait for ever on a broker that accepts the TCP connection
    // but not the session (a refused vhost, say).
    tokio::time::timeout(
        shared.config.connect_timeout,
        Connection::connect(&shared.url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "no answer from the broker {shown} within {:?}",
            shared.config.connect_timeout
        )
    })?
    .with_context(|| format!("cannot connect to the broker {shown}"))
}

async fn confirm_channel(connection: &Connection) -> Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Declares the exchange, and the queues, bindings and retry queues of
/// `routes`. Idempotent.
async fn declare_topology(
    channel: &Channel,
    shared: &Shared,
    routes: &[RouteQueues],
) -> Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short(&shared.config.exchange)?,
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot declare exchange {}", shared.config.exchange))?;
    for r in routes {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(short(&r.queue)?, durable, FieldTable::default())
            .await
            .with_context(|| format!("cannot declare queue {}", r.queue))?;
        for t in &r.types {
            channel
                .queue_bind(
                    short(&r.queue)?,
                    short(&shared.config.exchange)?,
                    short(t)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot bind {} to {t}", r.queue))?;
        }
        for level in 1..=r.retry_levels {
            let mut args = FieldTable::default();
            args.insert(
                short("x-dead-letter-exchange")?,
                AMQPValue::LongString(LongString::from("")),
            );
            args.insert(
                short("x-dead-letter-routing-key")?,
                AMQPValue::LongString(LongString::from(r.queue.as_str())),
            );
            channel
                .queue_declare(short(&r.retry_queue(level))?, durable, args)
                .await
                .with_context(|| format!("cannot declare retry queue {}", r.retry_queue(level)))?;
        }
        if shared.dead_letter_queues {
            let queue = r.dead_letter_queue();
            channel
                .queue_declare(short(&queue)?, durable, FieldTable::default())
                .await
                .with_context(|| format!("cannot declare dead-letter queue {queue}"))?;
        }
    }
    Ok(())
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        AMQPValue::ShortShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortShortUInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortUInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::Timestamp(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The AMQP properties of a message: CloudEvents binary mode, its
/// attributes as `cloudEvents:*` application properties, and every header
/// as an application property.
///
/// Never fails: a value longer than AMQP's short strings allow (an id, a
/// type, a reply address) is left out of the basic properties and travels
/// only as its `cloudEvents:*` attribute, which has no such limit. A message
/// that got this far has an outcome that must be published; a property must
/// never be the reason it is not.
pub fn properties(e: &Envelope, source: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    for (name, value) in cloudevents::attributes(e, source) {
        // The attribute names are the binding's own, all short.
        if let Ok(k) = short(&format!("{CE_PREFIX}{name}")) {
            h.insert(
                k,
                AMQPValue::LongString(LongString::from(value.into_owned())),
            );
        }
    }
    for (name, value) in &e.headers {
        if name.starts_with(CE_PREFIX) {
            tracing::warn!(message.id = %e.id, header = %crate::text::clip(name, 64), "Header name is reserved for CloudEvents attributes; not sent");
            continue;
        }
        match short(name) {
            Ok(k) => {
                h.insert(k, AMQPValue::LongString(LongString::from(value.as_str())));
            }
            Err(_) => {
                tracing::warn!(message.id = %e.id, header = %crate::text::clip(name, 64), "Header name is longer than AMQP allows; not sent");
            }
        }
    }
    let mut p = BasicProperties::default()
        .with_headers(h)
        .with_delivery_mode(2)
        .with_timestamp(e.created_at_ms / 1000);
    if let Ok(id) = short(&e.id) {
        p = p.with_message_id(id);
    }
    if let Ok(t) = short(&e.message_type) {
        p = p.with_type(t);
    }
    if let Ok(ct) = short(&e.content_type) {
        p = p.with_content_type(ct);
    }
    if let Some(c) = e.correlation_id.as_deref().and_then(|c| short(c).ok()) {
        p = p.with_correlation_id(c);
    }
    if let Some(r) = e.reply_to.as_deref().and_then(|r| short(r).ok()) {
        p = p.with_reply_to(r);
    }
    p
}

/// Where a reply may be sent: a queue name AMQP can carry, and not one of
/// the pipeline's own queues (`<exchange>.…`): a command must not make the
/// host write into a route's queue, its retry queues or its dead letters.
/// Clients wait for replies on queues of their own: server-named
/// (`amq.gen-…`), direct reply-to (`amq.rabbitmq.reply-to…`) or named.
fn check_reply_to(address: &str, exchange: &str) -> Result<(), String> {
    if ShortString::try_new(address.to_owned()).is_err() {
        return Err(format!(
            "its reply-to address is {} bytes, more than the 255 a queue name may have",
            address.len()
        ));
    }
    if address == exchange
        || address
            .strip_prefix(exchange)
            .is_some_and(|rest| rest.starts_with('.'))
    {
        return Err(format!(
            "its reply-to address `{}` names one of this pipeline's own queues",
            crate::limits::quote(address)
        ));
    }
    Ok(())
}

/// A message from its AMQP form. `kind_of` gives the kind of a type when
/// the message does not say. An error names what is missing or wrong; the
/// payload is never touched.
pub fn envelope(
    d: &AmqpDelivery,
    kind_of: impl Fn(&str) -> Option<Kind>,
) -> Result<Envelope, String> {
    decode(
        &d.properties,
        d.exchange.as_str(),
        d.routing_key.as_str(),
        &d.data,
        kind_of,
    )
}

/// A delivery as a route takes it: decoded, with its reply-to checked
/// against `pipeline_exchange`, or, when either fails, what can be said of
/// it (the payload untouched) with the reason it is malformed.
pub fn receive(
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    data: &[u8],
    delivery_tag: u64,
    kind_of: impl Fn(&str) -> Option<Kind>,
    pipeline_exchange: &str,
) -> (Envelope, Option<String>) {
    let decoded = decode(props, exchange, routing_key, data, kind_of).and_then(|e| {
        match e.reply_to.as_deref() {
            Some(r) => check_reply_to(r, pipeline_exchange).map(|()| e),
            None => Ok(e),
        }
    });
    match decoded {
        Ok(e) => (e, None),
        Err(reason) => {
            let id = props
                .message_id()
                .as_ref()
                .map_or_else(|| format!("amqp-{delivery_tag}"), |m| m.as_str().to_owned());
            let salvaged = cloudevents::salvage(id, routing_key.to_owned(), data.to_vec());
            (salvaged, Some(reason))
        }
    }
}

/// [`envelope`] from the parts of a delivery.
pub fn decode(
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    data: &[u8],
    kind_of: impl Fn(&str) -> Option<Kind>,
) -> Result<Envelope, String> {
    // The CloudEvents attributes, by name without the prefix, and the
    // headers: one pass over the table, and no key built per look-up (a
    // delivery looks up ten attributes).
    let mut attributes: Vec<(&str, &AMQPValue)> = Vec::new();
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(table) = props.headers() {
        for (key, value) in table.inner() {
            let key = key.as_str();
            if let Some(name) = key.strip_prefix(CE_PREFIX) {
                attributes.push((name, value));
            } else if !cloudevents::is_broker_header(key)
                && let Some(value) = text(value)
            {
                headers.push((key.to_owned(), value));
            }
        }
    }
    let attr = |name: &str| {
        attributes
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| text(v))
            .map(std::borrow::Cow::Owned)
    };
    let text_of = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    headers.sort();
    let fallbacks = cloudevents::Fallbacks {
        id: text_of(props.message_id()),
        message_type: text_of(props.kind()).or_else(|| Some(routing_key.to_owned())),
        created_at_ms: props.timestamp().map(|s| s.saturating_mul(1000)),
        correlation_id: text_of(props.correlation_id()),
        reply_to: text_of(props.reply_to()),
        partition_key: None,
        content_type: text_of(props.content_type()),
    };
    // Only the host's retry queues (which dead-letter back through the
    // default exchange) and its replays publish there.
    let retry_state = exchange.is_empty();
    cloudevents::decode(
        attr,
        fallbacks,
        kind_of,
        data.to_vec(),
        headers,
        retry_state,
    )
}

/// Publishes (commands and named-queue publishes with the mandatory flag)
/// and returns the confirm to wait for.
async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    e: &Envelope,
    props: BasicProperties,
) -> Result<PublisherConfirm> {
    // An event nobody consumes is normal; everything else (a command, and
    // whatever goes to one queue by name) must reach a queue, and comes back
    // when it cannot.
    let options = BasicPublishOptions {
        mandatory: e.kind == Kind::Command || exchange.is_empty(),
        ..BasicPublishOptions::default()
    };
    channel
        .basic_publish(
            short(exchange)?,
            short(routing_key)?,
            options,
            &e.payload,
            props,
        )
        .await
        .with_context(|| format!("cannot publish {} {}", e.message_type, e.id))
}

/// What a publish must achieve to count.
#[derive(Clone, Copy)]
enum Expect {
    /// Routed somewhere (a command: its handler's queue must exist).
    Routed,
    /// Confirmed; unroutable is fine (an event nobody consumes).
    Confirmed,
    /// A reply: unroutable means the requester stopped waiting, which is
    /// worth a warning but not a failure of the command.
    Reply,
    /// A dead letter's broker copy: the record is in the store, so a copy
    /// the broker will not take is only worth a warning.
    Copy,
}

/// One message a settlement publishes, built before anything is sent.
struct Publish<'a> {
    exchange: &'a str,
    routing_key: String,
    message: Cow<'a, Envelope>,
    props: BasicProperties,
    expect: Expect,
    /// What it is, for errors: "OrderPlaced 0193…".
    what: String,
}

/// The most a message's properties may take: they travel in one content
/// header frame, and RabbitMQ's frames are 128 KiB by default. What is
/// larger would close the channel, and the batch would come back for ever.
const MAX_PROPERTIES_BYTES: usize = 120 << 10;

/// About what a message's properties take on the wire.
fn properties_size(p: &BasicProperties) -> usize {
    let headers: usize = p.headers().as_ref().map_or(0, |t| {
        t.inner()
            .iter()
            .map(|(k, v)| k.as_str().len() + 8 + text(v).map_or(16, |s| s.len()))
            .sum()
    });
    headers + 1024
}

/// Everything a settlement publishes. An error refuses the settlement:
/// something of its outcome cannot be carried by AMQP (nothing is sent).
fn publishes<'a>(
    shared: &'a Shared,
    queues: &RouteQueues,
    s: &'a Settlement,
) -> Result<Vec<Publish<'a>>, String> {
    let source = shared.source.as_str();
    let mut out = Vec::new();
    match &s.outcome {
        Outcome::Handled { outputs, reply, .. } => {
            for o in outputs {
                let expect = if o.kind == Kind::Command {
                    Expect::Routed
                } else {
                    Expect::Confirmed
                };
                out.push(Publish::checked(
                    &shared.config.exchange,
                    o.message_type.clone(),
                    Cow::Borrowed(o),
                    properties(o, source),
                    expect,
                    format!("{} {}", o.message_type, o.id),
                )?);
            }
            if let Some(r) = reply {
                let e = r.envelope(&s.delivery.envelope.message_type);
                let props = properties(&e, source);
                out.push(Publish::checked(
                    "",
                    r.address.clone(),
                    Cow::Owned(e),
                    props,
                    Expect::Reply,
                    format!("the reply to {}", r.in_reply_to),
                )?);
            }
        }
        Outcome::Retry {
            message,
            not_before_ms,
        } => {
            let delay = not_before_ms.saturating_sub(now_ms()).max(1);
            let mut props = properties(message, source);
            if let Ok(expiration) = short(&delay.to_string()) {
                props = props.with_expiration(expiration);
            }
            out.push(Publish::checked(
                "",
                queues.retry_queue(message.delayed_retries()),
                Cow::Borrowed(message),
                props,
                Expect::Routed,
                format!("the retry of {}", message.id),
            )?);
        }
        Outcome::DeadLettered { copy, fault, .. } => {
            if let Some(f) = fault {
                out.push(Publish::checked(
                    &shared.config.exchange,
                    f.message_type.clone(),
                    Cow::Borrowed(f),
                    properties(f, source),
                    Expect::Confirmed,
                    format!("the fault {}", f.id),
                )?);
            }
            let Some(copy) = copy else {
                return Ok(out);
            };
            let copy = Publish::checked(
                "",
                queues.dead_letter_queue(),
                Cow::Borrowed(copy),
                properties(copy, source),
                Expect::Copy,
                format!("the dead-letter copy of {}", copy.id),
            );
            match copy {
                Ok(p) => out.push(p),
                Err(e) => {
                    tracing::warn!(error = %e, "Dead-letter copy not sent; the record is in the store");
                }
            }
        }
    }
    Ok(out)
}

impl<'a> Publish<'a> {
    /// A publish, or why AMQP cannot carry it: a routing key over 255
    /// bytes, or properties that do not fit one header frame.
    fn checked(
        exchange: &'a str,
        routing_key: String,
        message: Cow<'a, Envelope>,
        props: BasicProperties,
        expect: Expect,
        what: String,
    ) -> Result<Self, String> {
        if short(&routing_key).is_err() {
            return Err(format!(
                "{what} cannot be published: its routing key is longer than AMQP's 255 bytes"
            ));
        }
        let size = properties_size(&props);
        if size > MAX_PROPERTIES_BYTES {
            return Err(format!(
                "{what} cannot be published: its properties (headers and attributes, its attempt history included) take about {size} bytes, more than the {MAX_PROPERTIES_BYTES} one AMQP header frame carries"
            ));
        }
        Ok(Publish {
            exchange,
            routing_key,
            message,
            props,
            expect,
            what,
        })
    }
}

/// Publishes the outcomes of a batch and waits for their confirms. Returns,
/// per settlement, why it is refused (what AMQP cannot carry, or what the
/// broker would not take), or `None`; an error means the channel is in
/// doubt and nothing of the batch may be acknowledged.
///
/// Everything each settlement will publish is built before anything is
/// published, so a refused settlement has nothing of it sent. Replies go
/// out once the rest of their outcome is confirmed: a command whose
/// outcome the broker refuses is dead-lettered, and its requester must not
/// hear that it succeeded.
async fn publish_outcomes(
    publisher: &Channel,
    shared: &Shared,
    queues: &RouteQueues,
    batch: &[Settlement],
) -> Result<Vec<Option<String>>> {
    let mut refused: Vec<Option<String>> = vec![None; batch.len()];
    let mut planned: Vec<(usize, Publish<'_>)> = Vec::new();
    for (i, s) in batch.iter().enumerate() {
        match publishes(shared, queues, s) {
            Ok(p) => planned.extend(p.into_iter().map(|p| (i, p))),
            Err(reason) => refused[i] = Some(reason),
        }
    }
    let (replies, rest): (Vec<_>, Vec<_>) = planned
        .into_iter()
        .partition(|(_, p)| matches!(p.expect, Expect::Reply));
    for round in [rest, replies] {
        let mut pending = Vec::with_capacity(round.len());
        for (i, p) in round {
            if refused[i].is_some() {
                continue;
            }
            let confirm =
                publish(publisher, p.exchange, &p.routing_key, &p.message, p.props).await?;
            pending.push((i, confirm, p.expect, p.what));
        }
        for (i, confirm, expect, what) in pending {
            if let Some(problem) = confirmed(confirm, expect, &what).await? {
                refused[i].get_or_insert(problem);
            }
        }
    }
    Ok(refused)
}

/// Waits for one publish's confirm. `Ok(Some(problem))`: the broker refused
/// it for good (a nack, or a publish that had to be routed and was not).
/// An error means no answer came: the channel is in doubt.
async fn confirmed(
    confirm: PublisherConfirm,
    expect: Expect,
    what: &str,
) -> Result<Option<String>> {
    let c = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| anyhow!("no confirm for {what} within {CONFIRM_TIMEOUT:?}"))?
        .with_context(|| format!("no confirm for {what}"))?;
    let problem = if c.is_nack() {
        format!("the broker refused {what}")
    } else {
        match c.take_message() {
            Some(returned) if !matches!(expect, Expect::Confirmed) => format!(
                "the broker could not route {what}: {}",
                returned.reply_text.as_str()
            ),
            _ => return Ok(None),
        }
    };
    match expect {
        Expect::Routed | Expect::Confirmed => Ok(Some(problem)),
        Expect::Reply => {
            tracing::warn!(
                "Nobody waits for {what} any more (its requester timed out or left, or the broker refused it); the reply is dropped: {problem}"
            );
            Ok(None)
        }
        Expect::Copy => {
            tracing::warn!("{problem}; the dead letter is in the store");
            Ok(None)
        }
    }
}

/// Waits for every confirm of messages created outside a route (sends,
/// replays): any refusal fails the whole call, which the caller reports.
async fn confirm_all(pending: Vec<(PublisherConfirm, Expect, String)>) -> Result<()> {
    for (confirm, expect, what) in pending {
        if let Some(problem) = confirmed(confirm, expect, &what).await? {
            bail!(problem);
        }
    }
    Ok(())
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn ping(&self) -> Result<()> {
        let mut probe = self.shared.probe.lock().await;
        if probe.as_ref().is_none_or(|c| !c.status().connected()) {
            *probe = Some(connect(&self.shared).await?);
        }
        let connection = probe.as_ref().context("no broker connection")?;
        // Opening and closing a channel is a round trip the broker answers.
        let answered = async {
            let channel = connection.create_channel().await?;
            channel.close(200, short("ping")?).await?;
            anyhow::Ok(())
        }
        .await;
        if answered.is_err() {
            *probe = None;
        }
        answered
    }

    async fn subscribe(&self, route: &str) -> Result<Box<dyn Subscription>> {
        let queues = self.route(route)?.clone();
        self.shared.subscriptions.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(AmqpSubscription {
            shared: self.shared.clone(),
            queues,
            live: None,
            generation: 0,
            ackers: HashMap::new(),
            next_receipt: 0,
        }))
    }

    async fn enqueue(&self, messages: Vec<Envelope>) -> Result<usize> {
        let shared = self.shared.clone();
        self.with_publisher(async move |channel| {
            let mut pending = Vec::new();
            let mut deliveries = 0;
            for e in &messages {
                let routes = shared.routing.destinations(&e.message_type);
                if routes == 0 && e.kind == Kind::Command {
                    bail!(
                        "no plugin in this pipeline handles command {}",
                        e.message_type
                    );
                }
                deliveries += routes;
                let confirm = publish(
                    channel,
                    &shared.config.exchange,
                    &e.message_type,
                    e,
                    properties(e, &shared.source),
                )
                .await?;
                let expect = if e.kind == Kind::Command {
                    Expect::Routed
                } else {
                    Expect::Confirmed
                };
                pending.push((confirm, expect, format!("{} {}", e.message_type, e.id)));
            }
            confirm_all(pending).await?;
            Ok(deliveries)
        })
        .await
    }

    async fn enqueue_to(&self, route: &str, messages: Vec<Envelope>) -> Result<()> {
        let queue = self.route(route)?.queue.clone();
        let source = self.shared.source.clone();
        self.with_publisher(async move |channel| {
            let mut pending = Vec::new();
            for e in &messages {
                let confirm = publish(channel, "", &queue, e, properties(e, &source)).await?;
                pending.push((
                    confirm,
                    Expect::Routed,
                    format!("{} {}", e.message_type, e.id),
                ));
            }
            confirm_all(pending).await
        })
        .await
    }

    async fn is_idle(&self) -> Result<bool> {
        // The broker counts only messages ready in a queue, not the ones
        // prefetched to a consumer: idle means nothing in flight, nothing
        // ready, and nothing received across two looks a moment apart.
        let before = self.shared.received.load(Ordering::SeqCst);
        if !self.looks_idle().await? {
            return Ok(false);
        }
        tokio::time::sleep(IDLE_SETTLE).await;
        Ok(self.looks_idle().await? && self.shared.received.load(Ordering::SeqCst) == before)
    }

    fn kind(&self) -> &'static str {
        "amqp"
    }

    fn queue(&self, route: &str) -> String {
        format!("{}.{route}", self.shared.config.exchange)
    }

    fn location(&self) -> String {
        format!(
            "{} exchange {}",
            redact(&self.shared.url),
            self.shared.config.exchange
        )
    }

    /// New routes get their queues and bindings, routes that take fewer
    /// types lose those bindings, and routes that left are unbound from the
    /// exchange (their queues and what is in them stay, as on a restart).
    async fn set_routing(&self, pipeline: &Pipeline) -> Result<()> {
        let new = route_queues(pipeline, &self.shared.config);
        let old = self.shared.routing.routes();
        let mut unbind: Vec<(String, String)> = Vec::new();
        for o in &old {
            let kept = new.iter().find(|n| n.route == o.route);
            for t in &o.types {
                if kept.is_none_or(|n| !n.types.contains(t)) {
                    unbind.push((o.queue.clone(), t.clone()));
                }
            }
        }
        let shared = self.shared.clone();
        let declare = new.clone();
        self.with_publisher(async move |channel| {
            declare_topology(channel, &shared, &declare).await?;
            for (queue, t) in &unbind {
                channel
                    .queue_unbind(
                        short(queue)?,
                        short(&shared.config.exchange)?,
                        short(t)?,
                        FieldTable::default(),
                    )
                    .await
                    .with_context(|| format!("cannot unbind {queue} from {t}"))?;
            }
            Ok(())
        })
        .await?;
        self.shared.routing.replace(Topology::of(pipeline), new);
        Ok(())
    }

    async fn start_consuming(&self) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        // Declares the topology, so commands sent before the first delivery
        // find their queues.
        self.with_publisher(async |_| Ok(())).await?;
        Ok(Box::new(()))
    }

    async fn reply_inbox(&self) -> Result<Box<dyn ReplyInbox>> {
        let connection = connect(&self.shared).await?;
        let channel = connection.create_channel().await?;
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare(short("")?, exclusive, FieldTable::default())
            .await?;
        let address = queue.name().as_str().to_owned();
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                short("switchyard-reply")?,
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Box::new(AmqpInbox {
            _connection: connection,
            _channel: channel,
            consumer,
            address,
        }))
    }
}

/// An exclusive, auto-deleted queue for one reply.
struct AmqpInbox {
    _connection: Connection,
    _channel: Channel,
    consumer: lapin::Consumer,
    address: String,
}

#[async_trait]
impl ReplyInbox for AmqpInbox {
    fn address(&self) -> &str {
        &self.address
    }

    async fn next_reply(&mut self, deadline: tokio::time::Instant) -> Result<Option<Reply>> {
        let next = tokio::time::timeout_at(deadline, self.consumer.next()).await;
        let Ok(Some(delivery)) = next else {
            return Ok(None);
        };
        let d = delivery.context("the reply queue failed")?;
        let e = envelope(&d, |_| Some(Kind::Event))
            .map_err(|e| anyhow!("the reply is malformed: {e}"))?;
        Ok(Some(Reply::received(&self.address, e)))
    }
}

/// A live consumer of one route's queue.
struct Live {
    connection: Connection,
    consumer: lapin::Consumer,
    /// Confirm-mode channel for the outcomes' publishes.
    publisher: Channel,
}

/// The consuming side of one route.
pub struct AmqpSubscription {
    shared: Arc<Shared>,
    queues: RouteQueues,
    live: Option<Live>,
    /// Bumped on every reconnect; a receipt from an older generation belongs
    /// to a dead channel.
    generation: u64,
    /// Deliveries in hand: receipt → generation, delivery tag, acker.
    ackers: HashMap<u64, InHand>,
    next_receipt: u64,
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        self.shared.subscriptions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A route waiting for a delivery with none in hand, counted in
/// `Shared::waiting` while it lives.
struct Waiting(Arc<Shared>);

impl Waiting {
    fn start(shared: Arc<Shared>) -> Waiting {
        shared.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(shared)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A delivery the route holds: the channel generation it came on, its
/// delivery tag there, and its acker.
struct InHand {
    generation: u64,
    tag: u64,
    acker: Acker,
}

impl AmqpSubscription {
    /// Acknowledges each settlement whose outcome was published; the
    /// refused ones (`refused[i]` says why) are given back, still in hand,
    /// for the route to dead-letter and settle again. After a failed
    /// acknowledgement the connection is dropped and the rest of the batch
    /// is redelivered.
    async fn acknowledge(
        &mut self,
        batch: Vec<Settlement>,
        refused: Vec<Option<String>>,
    ) -> Vec<Refused> {
        let mut out = Vec::new();
        // (delivery tag, acker, message id) of each delivery to acknowledge.
        let mut to_ack = Vec::with_capacity(batch.len());
        for (s, refusal) in batch.into_iter().zip(refused) {
            if let Some(reason) = refusal {
                out.push(Refused {
                    settlement: s,
                    reason,
                });
                continue;
            }
            if let Some((tag, acker)) = self.take_acker(s.delivery.receipt) {
                to_ack.push((tag, acker, s.delivery.envelope.id));
            }
        }
        to_ack.sort_by_key(|(tag, _, _)| *tag);
        // One `multiple` acknowledgement covers every delivery up to its
        // tag that is still unacknowledged on the channel: it may stand for
        // the run of this batch's tags below the lowest one still in hand
        // (given back, refused, or not settled yet), never past it.
        let held_from = self
            .ackers
            .values()
            .filter(|h| h.generation == self.generation)
            .map(|h| h.tag)
            .min()
            .unwrap_or(u64::MAX);
        let (run, rest) = to_ack.split_at(
            to_ack
                .iter()
                .take_while(|(tag, _, _)| *tag < held_from)
                .count(),
        );
        let acks = run
            .last()
            .map(|(_, acker, id)| (acker, run.len() > 1, id))
            .into_iter()
            .chain(rest.iter().map(|(_, acker, id)| (acker, false, id)));
        for (acker, multiple, id) in acks {
            let acked =
                tokio::time::timeout(ACK_TIMEOUT, acker.ack(BasicAckOptions { multiple })).await;
            let error = match acked {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {ACK_TIMEOUT:?}"),
            };
            // The outcome is published; the broker will redeliver, and the
            // message is handled again.
            tracing::warn!(message.id = %id, error = %error, "Cannot acknowledge; the rest of the batch will be redelivered");
            self.drop_live();
            break;
        }
        out
    }

    async fn ensure_live(&mut self) -> Result<&mut Live> {
        if self
            .live
            .as_ref()
            .is_some_and(|l| !l.publisher.status().connected())
        {
            self.drop_live();
        }
        if self.live.is_none() {
            // What the route takes may have changed while it ran.
            if let Some(now) = self
                .shared
                .routing
                .routes()
                .into_iter()
                .find(|r| r.route == self.queues.route)
            {
                self.queues = now;
            }
            let connection = connect(&self.shared).await?;
            let channel = connection.create_channel().await?;
            declare_topology(&channel, &self.shared, std::slice::from_ref(&self.queues)).await?;
            channel
                .basic_qos(self.shared.config.prefetch, BasicQosOptions::default())
                .await?;
            let tag = format!(
                "switchyard-{}-{}",
                self.queues.route,
                crate::envelope::new_id()
            );
            let consumer = channel
                .basic_consume(
                    short(&self.queues.queue)?,
                    short(&tag)?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot consume {}", self.queues.queue))?;
            let publisher = confirm_channel(&connection).await?;
            self.generation += 1;
            tracing::info!(route = %self.queues.route, queue = %self.queues.queue, "Consuming from RabbitMQ");
            self.live = Some(Live {
                connection,
                consumer,
                publisher,
            });
        }
        self.live.as_mut().context("no broker connection")
    }

    /// Forgets a dead connection: its deliveries are redelivered by the
    /// broker, so their ackers are dropped, never used on a new channel.
    fn drop_live(&mut self) {
        let stale = i64::try_from(self.ackers.len()).unwrap_or(i64::MAX);
        self.shared.in_flight.fetch_sub(stale, Ordering::SeqCst);
        self.ackers.clear();
        self.live = None;
    }

    fn accept(&mut self, d: AmqpDelivery) -> Delivery {
        let shared = &self.shared;
        let (envelope, malformed) = receive(
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            &d.data,
            d.delivery_tag,
            |t| shared.routing.kind(t),
            &shared.config.exchange,
        );
        self.next_receipt += 1;
        let receipt = self.next_receipt;
        self.ackers.insert(
            receipt,
            InHand {
                generation: self.generation,
                tag: d.delivery_tag,
                acker: d.acker,
            },
        );
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        self.shared.received.fetch_add(1, Ordering::SeqCst);
        Delivery {
            envelope,
            receipt,
            malformed,
            origin: None,
        }
    }

    /// Removes a delivery's acker, with its delivery tag, if it belongs to
    /// the live channel.
    fn take_acker(&mut self, receipt: u64) -> Option<(u64, Acker)> {
        let held = self.ackers.remove(&receipt)?;
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        (held.generation == self.generation && self.live.is_some())
            .then_some((held.tag, held.acker))
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let first = {
            let shared = self.shared.clone();
            let live = self.ensure_live().await?;
            let _waiting = Waiting::start(shared);
            loop {
                match tokio::time::timeout(LIVENESS_CHECK, live.consumer.next()).await {
                    Ok(next) => break Some(next),
                    Err(_) if live.connection.status().connected() => {}
                    Err(_) => break None,
                }
            }
        };
        let first = match first {
            None => {
                self.drop_live();
                bail!(
                    "lost the connection to the broker while waiting on {}",
                    self.queues.queue
                );
            }
            Some(Some(Ok(d))) => d,
            Some(Some(Err(e))) => {
                self.drop_live();
                return Err(anyhow::Error::from(e)
                    .context(format!("the consumer of {} failed", self.queues.queue)));
            }
            Some(None) => {
                self.drop_live();
                bail!("the broker cancelled the consumer of {}", self.queues.queue);
            }
        };
        let mut batch = vec![self.accept(first)];
        while batch.len() < max {
            let next = match self.live.as_mut() {
                Some(live) => live.consumer.next().now_or_never(),
                None => None,
            };
            match next {
                Some(Some(Ok(d))) => batch.push(self.accept(d)),
                _ => break,
            }
        }
        Ok(batch)
    }

    async fn settle(&mut self, batch: Vec<Settlement>) -> Result<Vec<Refused>> {
        let current = self.generation;
        let (live_batch, stale): (Vec<_>, Vec<_>) = batch.into_iter().partition(|s| {
            self.ackers
                .get(&s.delivery.receipt)
                .is_some_and(|h| h.generation == current && self.live.is_some())
        });
        for s in &stale {
            // The channel died: the broker redelivers these; their outcome
            // is recomputed then.
            self.take_acker(s.delivery.receipt);
        }
        if live_batch.is_empty() {
            return Ok(Vec::new());
        }
        let publisher = match &self.live {
            Some(l) => l.publisher.clone(),
            None => bail!("no broker connection"),
        };
        let shared = self.shared.clone();
        let result = publish_outcomes(&publisher, &shared, &self.queues, &live_batch).await;
        let refused = match result {
            Ok(refused) => refused,
            Err(e) => {
                let deliveries: Vec<Delivery> =
                    live_batch.into_iter().map(|s| s.delivery).collect();
                self.release(deliveries).await?;
                return Err(e.context(format!(
                    "cannot settle a batch of route {}",
                    self.queues.route
                )));
            }
        };
        Ok(self.acknowledge(live_batch, refused).await)
    }

    async fn release(&mut self, unsettled: Vec<Delivery>) -> Result<()> {
        let mut broken = false;
        for d in unsettled {
            let Some((_, acker)) = self.take_acker(d.receipt) else {
                continue;
            };
            if broken {
                continue;
            }
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            let error = match tokio::time::timeout(ACK_TIMEOUT, acker.nack(requeue)).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {ACK_TIMEOUT:?}"),
            };
            tracing::warn!(message.id = %d.envelope.id, error = %error, "Cannot give a delivery back; the broker redelivers it when the channel closes");
            broken = true;
        }
        if broken {
            // Closing the connection is what makes the broker redeliver.
            self.drop_live();
        }
        Ok(())
    }
}
