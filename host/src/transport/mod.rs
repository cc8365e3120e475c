//! Brokers behind one contract: consume a route's messages, settle each one
//! with its final outcome, and enqueue new messages.
//!
//! A transport knows routes and message types, never plugins. Settling is
//! the at-least-once boundary: a delivery is removed (acked) only together
//! with, or after, the durable record of its outcome.

pub mod amqp;
pub mod cloudevents;
pub mod embedded;
pub mod kafka;

use std::collections::BTreeMap;

use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;

use crate::config::Pipeline;
use crate::envelope::{Envelope, Kind, Reply};

/// Who receives each message type: every route of an event, the one route of
/// a command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    routes: BTreeMap<String, (Kind, Vec<String>)>,
}

impl Topology {
    /// The routing of a pipeline: one route per plugin, named after it.
    pub fn of(pipeline: &Pipeline) -> Self {
        let mut routes: BTreeMap<String, (Kind, Vec<String>)> = BTreeMap::new();
        for p in &pipeline.plugins {
            for (t, kind) in p.subscriptions() {
                routes
                    .entry(t.to_string())
                    .or_insert_with(|| (kind, Vec::new()))
                    .1
                    .push(p.name.to_string());
            }
        }
        Topology { routes }
    }

    /// The routes a message of this type goes to.
    pub fn destinations(&self, message_type: &str) -> &[String] {
        self.routes
            .get(message_type)
            .map_or(&[], |(_, r)| r.as_slice())
    }

    /// Whether a message type is a command or an event, if anything subscribes to it.
    pub fn kind(&self, message_type: &str) -> Option<Kind> {
        self.routes.get(message_type).map(|(k, _)| *k)
    }

    /// Every route name.
    pub fn route_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .routes
            .values()
            .flat_map(|(_, r)| r.iter().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// A broker transport's routing: the topology and each route's names on
/// the broker (`R`), replaced whole when a running host's pipeline changes.
pub(crate) struct RouteTable<R> {
    inner: std::sync::RwLock<(Topology, Vec<R>)>,
}

impl<R: Clone> RouteTable<R> {
    pub(crate) fn new(topology: Topology, routes: Vec<R>) -> Self {
        RouteTable {
            inner: std::sync::RwLock::new((topology, routes)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (Topology, Vec<R>)> {
        // Replaced whole under the lock: a panic cannot leave it half-set.
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn routes(&self) -> Vec<R> {
        self.read().1.clone()
    }

    /// How many routes receive a message of this type.
    pub(crate) fn destinations(&self, message_type: &str) -> usize {
        self.read().0.destinations(message_type).len()
    }

    pub(crate) fn kind(&self, message_type: &str) -> Option<Kind> {
        self.read().0.kind(message_type)
    }

    pub(crate) fn replace(&self, topology: Topology, routes: Vec<R>) {
        *self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (topology, routes);
    }
}

/// A message handed to a route, with the transport's handle to settle it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub envelope: Envelope,
    /// The transport's handle on the delivery, unique among what a
    /// subscription has in hand: the embedded queue's sequence number; on
    /// RabbitMQ and Kafka a counter of the subscription's own, which maps
    /// to the delivery tag or the record's offset.
    pub receipt: u64,
    /// Set when the stored message could not be decoded: the envelope holds
    /// what could be read (the payload untouched), and this says what is
    /// wrong. No plugin is called; the message is dead-lettered.
    pub malformed: Option<String>,
    /// Where on the broker it was read, when the broker has places (a
    /// Kafka record's topic, partition and offset); kept in dead letters.
    pub origin: Option<Origin>,
}

/// A record's place in a partitioned log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What happened to a delivery, to be made durable by [`Subscription::settle`].
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Handled: the outputs go out and the delivery is removed, atomically
    /// where the broker allows.
    Handled {
        outputs: Vec<Envelope>,
        reply: Option<Reply>,
        /// What the handler wrote to its plugin's state (the route's
        /// plugin): the embedded transport commits it with the settlement;
        /// for a broker the route has committed it to the state store
        /// before settling.
        state: crate::state::Changes,
        /// The saga step the message made, when the route's plugin is a
        /// saga: committed with `state`, where `state` is.
        saga: Option<crate::saga::Step>,
    },
    /// Failed, to be tried again: the message (with its attempt count and
    /// history) is scheduled durably, and only then the delivery removed.
    Retry {
        message: Envelope,
        not_before_ms: u64,
    },
    /// Failed for good: its dead letter is already durable; the delivery is
    /// removed. With `copy`, the transport first publishes it to the
    /// route's dead-letter destination on the broker (`[dead_letters]
    /// broker = true`).
    ///
    /// With `fault`, the message was a command a saga sent: the fault is
    /// published like an output (to the saga that handles its type).
    ///
    /// With `saga_failed`, the message was a step of that instance of the
    /// route's saga, which read that version of it: the instance is marked
    /// failed (`saga::Status::Failed`) if it is still running at that
    /// version, with the settlement where state commits with it (the
    /// embedded transport), just before it otherwise.
    DeadLettered {
        copy: Option<Envelope>,
        fault: Option<Envelope>,
        saga_failed: Option<(String, u64)>,
    },
}

/// One settled delivery.
#[derive(Clone, Debug)]
pub struct Settlement {
    pub delivery: Delivery,
    pub outcome: Outcome,
    /// The journal record of this handling, when the route keeps a journal
    /// and the transport writes it with the settlement (the embedded
    /// transport, in its settle transaction); a broker's settle ignores it.
    pub journal: Option<Box<crate::journal::Record>>,
}

/// A settlement the transport did not apply because the broker refuses
/// part of its outcome for good: a record over the broker's size limit, a
/// command no queue takes, a publish the broker rejects. Handling the
/// message again would be refused again, so the route dead-letters it
/// (`undeliverable`) instead. Outputs of the same message written before
/// the refusal stay written; `reason` says so.
#[derive(Debug)]
pub struct Refused {
    pub settlement: Settlement,
    pub reason: String,
}

/// A broker as the host sees it.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Starts consuming one route.
    async fn subscribe(&self, route: &str) -> Result<Box<dyn Subscription>>;

    /// Enqueues messages created outside any handler, routed by type.
    /// Returns how many deliveries were stored (one per destination route).
    async fn enqueue(&self, messages: Vec<Envelope>) -> Result<usize>;

    /// Enqueues messages for one route only, whatever their type's other
    /// consumers (replays go back to the route that failed them).
    async fn enqueue_to(&self, route: &str, messages: Vec<Envelope>) -> Result<()>;

    /// Answers when the broker or store does: one cheap round trip that
    /// does not stand in the way of the routes' own traffic (`/readyz`).
    async fn ping(&self) -> Result<()>;

    /// True when no message is waiting, scheduled for a retry, or in flight
    /// on any route of the pipeline. A saga timeout that is not due yet
    /// does not count: it is kept, and fires when it is due.
    async fn is_idle(&self) -> Result<bool>;

    /// Routes messages as `pipeline` says from now on, for a running host
    /// whose pipeline gained or lost routes or changed what they take. A
    /// new route must still be subscribed.
    async fn set_routing(&self, _pipeline: &Pipeline) -> Result<()> {
        anyhow::bail!(
            "the {} transport cannot change its routes while running; restart the host to apply this change",
            self.kind()
        )
    }

    /// Makes everything scheduled (delayed retries, saga timeouts) come
    /// due `by` sooner, as if that much time had passed: for tests that
    /// must reach a timeout without waiting for it.
    async fn advance_time(&self, _by: std::time::Duration) -> Result<()> {
        anyhow::bail!(
            "the {} transport cannot advance time; only the embedded transport can",
            self.kind()
        )
    }

    /// `embedded` or `amqp`, for logs and dead-letter records.
    fn kind(&self) -> &'static str;

    /// The plugin state this transport keeps in its own store and commits
    /// in its settle transaction (`Outcome::Handled::state`), if it does;
    /// `None`: the host keeps state in a store of its own.
    fn state(&self) -> Option<std::sync::Arc<dyn crate::state::Reader>> {
        None
    }

    /// Where the messages are (a store file, a broker), without secrets.
    fn location(&self) -> String;

    /// The name of a route's queue on this transport, for dead-letter
    /// records and logs.
    fn queue(&self, route: &str) -> String {
        route.to_owned()
    }

    /// The consumer group a route reads in, where the transport has them.
    fn consumer_group(&self, _route: &str) -> Option<String> {
        None
    }

    /// Gets ready for a host to consume: the embedded store takes its
    /// consumer lock, a broker gets its topology declared. The returned
    /// guard is held while the host runs.
    async fn start_consuming(&self) -> Result<Box<dyn std::any::Any + Send + Sync>>;

    /// Things worth a warning when a host starts (messages for routes the
    /// pipeline no longer has, say).
    async fn startup_warnings(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// A private address a command's reply can be sent to, and a way to
    /// wait for it.
    async fn reply_inbox(&self) -> Result<Box<dyn ReplyInbox>>;
}

/// Where a requester waits for the reply to a command.
#[async_trait]
pub trait ReplyInbox: Send {
    /// The `reply-to` to send with the command.
    fn address(&self) -> &str;

    /// The next reply that reaches this address, or `None` once `deadline`
    /// has passed. What a transport cannot read as a reply is its own
    /// business: skipped, or an error.
    async fn next_reply(&mut self, deadline: tokio::time::Instant) -> Result<Option<Reply>>;

    /// The reply to the command `command_id`, or `None` if none came
    /// within `timeout`. Replies to other commands sent from the same
    /// address are passed over.
    async fn wait(&mut self, command_id: &str, timeout: Duration) -> Result<Option<Reply>> {
        let deadline = tokio::time::Instant::now() + timeout;
        while let Some(reply) = self.next_reply(deadline).await? {
            if reply.in_reply_to == command_id {
                return Ok(Some(reply));
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Ok(None)
    }
}

/// The consuming side of one route.
#[async_trait]
pub trait Subscription: Send {
    /// Waits for at least one message and returns up to `max`, in order.
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>>;

    /// Up to `max` messages that are already at hand, without waiting (none
    /// when the transport cannot tell). A route calls it while its plugin
    /// works on the batch before, so that taking in the next batch overlaps
    /// with handling; what it returns comes after every delivery received
    /// before, and is settled or released like any other delivery.
    fn take_ready(&mut self, _max: usize) -> Vec<Delivery> {
        Vec::new()
    }

    /// Makes the outcomes of received deliveries durable. On error nothing of
    /// the batch was applied and its deliveries will be received again.
    /// Settlements the broker refuses for good are given back as
    /// [`Refused`], unsettled; everything else of the batch is applied. A
    /// dead letter's broker copy is never refused: a copy the broker will
    /// not take is dropped with a warning (the record is in the store).
    async fn settle(&mut self, batch: Vec<Settlement>) -> Result<Vec<Refused>>;

    /// Gives back deliveries that were received but will not be settled now
    /// (shutdown, a plugin that cannot start): they are received again.
    async fn release(&mut self, unsettled: Vec<Delivery>) -> Result<()>;
}
