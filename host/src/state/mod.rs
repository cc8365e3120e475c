//! Plugin state: key-value pairs the host keeps for each plugin, written
//! only together with the outcome of the message whose handler wrote them.
//!
//! A plugin call reads through a [`Scope`]: the store as last committed,
//! then what the messages handled before it in the same batch wrote (not
//! committed yet: the batch settles as one), then what the call itself
//! wrote. The call's writes leave it as [`Changes`], one per handled
//! message, carried by the message's outcome to the transaction that
//! settles it: the embedded transport's own (same file, same commit), or,
//! on a broker, a commit of the state store made before the broker ack.

pub mod done;
pub mod postgres;
pub mod sqlite;

pub use done::Done;

use crate::saga::{Instance, Step};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Context as _, Result};
use async_trait::async_trait;

use crate::config::{StateConfig, StoreConfig};

/// Times a host on a broker sends a due saga timeout that is not handled
/// (each send waits twice as long as the one before for its handling);
/// after that it stays, listed by `switchyard sagas show`, until its
/// instance completes.
pub const MAX_TIMEOUT_SENDS: i64 = 5;

/// Keys are at most this long, in bytes.
pub const MAX_KEY: usize = 1024;
/// Keys one `list-keys` call returns at most, whatever limit it asks for.
pub const MAX_LIST: usize = 1000;

/// What one handled message wrote: the final value of each key it set, or
/// `None` for a key it deleted, in key order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Adds the changes of a later message: its write of a key replaces
    /// this one's. A batch commits as one transaction, so its messages'
    /// changes folded into one give the same state with fewer writes.
    pub fn then(&mut self, later: &Changes) {
        for (k, v) in &later.writes {
            self.writes.insert(k.clone(), v.clone());
        }
    }

    /// Bytes of keys and values, for memory accounting.
    pub fn size(&self) -> usize {
        self.writes
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

/// Committed state, as plugin calls read it. Reads happen on the blocking
/// thread a plugin runs on.
pub trait Reader: Send + Sync {
    /// The value of `key` in `plugin`'s state.
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>>;

    /// Keys of `plugin`'s state that start with `prefix`, in byte order,
    /// after `after` when given, at most `limit`.
    fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>>;

    /// The saga instance `id` of `plugin`. A stored instance that cannot
    /// be read is a [`crate::saga::Corrupt`] error.
    fn instance(&self, plugin: &str, id: &str) -> Result<Option<Instance>>;

    /// Saga instances that match `query`, the most recently changed first.
    fn instances(&self, query: &crate::saga::Query) -> Result<Vec<crate::saga::Listed>>;

    /// The steps of a saga instance, oldest first.
    fn steps(&self, plugin: &str, id: &str) -> Result<Vec<Step>>;

    /// How many saga instances of `plugin` are active: not completed
    /// (running or failed).
    fn active(&self, plugin: &str) -> Result<u64>;

    /// The instance of timeout `id` of `plugin`, while it is still waiting
    /// to be handled.
    fn timeout_instance(&self, plugin: &str, id: &str) -> Result<Option<String>>;

    /// The pending timeouts of a saga instance, the first due first.
    fn timeouts(&self, plugin: &str, instance: &str) -> Result<Vec<crate::saga::Pending>>;
}

/// Every key and value of a saga instance's state, in key order.
pub fn instance_state(r: &dyn Reader, plugin: &str, id: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let prefix = crate::saga::stored_prefix(id);
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let keys = r.keys(plugin, &prefix, after.as_deref(), MAX_LIST)?;
        let last_page = keys.len() < MAX_LIST;
        for stored in keys {
            if let (Some(key), Some(value)) = (
                crate::saga::instance_key(id, &stored),
                r.get(plugin, &stored)?,
            ) {
                out.push((key.to_owned(), value));
            }
            after = Some(stored);
        }
        if last_page {
            return Ok(out);
        }
    }
}

/// A state store that commits apart from the transport: the one hosts on
/// RabbitMQ or Kafka use. (The embedded transport commits state in its own
/// settle transaction instead.)
#[async_trait]
pub trait Store: Reader {
    /// Answers when the store does: one round trip, for `/readyz`.
    async fn ping(&self) -> Result<()>;

    /// Applies the state changes of a batch of `plugin`'s messages (folded
    /// into one, see [`Changes::then`]) and its saga steps, and records the
    /// `done` messages of an exactly-once plugin, in one transaction: all
    /// or nothing. A message already recorded as done fails the whole
    /// commit (another host got there first).
    ///
    /// The saga `steps` are applied in order; one whose instance is not at
    /// the version the step read fails the commit with a
    /// [`crate::saga::Conflict`].
    async fn commit(
        &self,
        plugin: &str,
        changes: Changes,
        steps: Vec<Step>,
        done: Vec<Done>,
    ) -> Result<()>;

    /// Marks instances of saga `plugin` failed: a step of each, which read
    /// it at the version given, was dead-lettered. Only an instance still
    /// running at that version changes.
    async fn mark_failed(&self, plugin: &str, instances: Vec<(String, u64)>) -> Result<()>;

    /// The records of `plugin`'s messages among `ids` that are done. A
    /// record that cannot be read comes back without outputs, with an
    /// error logged: the message is not handled again.
    async fn done(&self, plugin: &str, ids: &[String]) -> Result<Vec<Done>>;

    /// Takes up to `limit` saga timeouts that are due at `now_ms` and not
    /// sent within the last `lease_ms`, and marks them sent now: plugin,
    /// instance and timeout of each. A timeout stays until the step that
    /// handles it (or its instance's completion) deletes it, so one whose
    /// message was lost is sent again after the lease.
    async fn claim_timeouts(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, String, crate::saga::Timeout)>>;

    /// Forgets timeouts of `plugin` whose messages were settled for good
    /// (handled without a step, or dead-lettered): they are not sent again.
    async fn forget_timeouts(&self, plugin: &str, ids: Vec<String>) -> Result<()>;

    /// Forgets the done records older than `before_ms`; returns how many.
    async fn prune(&self, before_ms: u64) -> Result<u64>;

    /// Where the state is kept, without secrets.
    fn location(&self) -> String;
}

/// Opens the state store of a host on a broker: the SQLite file or the
/// PostgreSQL schema of `[state]`.
pub async fn open(config: &StateConfig, pipeline: &str) -> Result<Arc<dyn Store>> {
    match &config.store {
        StoreConfig::Embedded { path } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || sqlite::SqliteState::open(&path))
                .await
                .context("the state store task failed")??;
            Ok(Arc::new(store))
        }
        StoreConfig::Postgres { url, schema } => {
            let url = url.resolve("state store")?;
            Ok(Arc::new(
                postgres::PostgresState::connect(&url, schema, pipeline).await?,
            ))
        }
    }
}

/// An instance read from a store (`Err`: why its row cannot be read) as
/// the reader returns it: a row that cannot be read is [`crate::saga::Corrupt`].
fn found_instance(
    plugin: &str,
    id: &str,
    row: Option<std::result::Result<Instance, String>>,
) -> Result<Option<Instance>> {
    match row {
        None => Ok(None),
        Some(Ok(i)) => Ok(Some(i)),
        Some(Err(why)) => Err(crate::saga::Corrupt {
            plugin: plugin.to_owned(),
            instance: id.to_owned(),
            why,
        }
        .into()),
    }
}

/// Adds a listed instance to `out`, or logs why its row cannot be read.
fn push_listed(
    out: &mut Vec<crate::saga::Listed>,
    plugin: String,
    id: String,
    row: std::result::Result<Instance, String>,
) {
    match row {
        Ok(instance) => out.push(crate::saga::Listed {
            plugin,
            id,
            instance,
        }),
        Err(why) => tracing::warn!(plugin, instance = id, why, "A saga instance cannot be read"),
    }
}

/// A done record read back, or, when it is corrupt, one without outputs.
fn read_done(plugin: &str, message_id: String, bytes: &[u8]) -> Done {
    Done::decode(&message_id, bytes).unwrap_or_else(|e| {
        tracing::error!(
            plugin,
            message.id = %message_id,
            error = %format!("{e:#}"),
            "A done record cannot be read; the message is not handled again and its outputs are not sent again"
        );
        Done {
            message_id,
            outputs: Vec::new(),
            reply: None,
        }
    })
}

/// A host's state: where calls read it, and the store that commits it when
/// the transport does not (`None`: the transport's settle writes it).
#[derive(Clone)]
pub struct Access {
    pub reader: Arc<dyn Reader>,
    pub store: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("store", &self.store.as_ref().map(|s| s.location()))
            .finish_non_exhaustive()
    }
}

/// Where a route's plugin calls read their state, shared by the route's
/// worker and every instance it makes.
pub struct Scope {
    plugin: String,
    reader: Arc<dyn Reader>,
    /// What the messages handled so far in this batch wrote.
    batch: Mutex<BTreeMap<String, Option<Vec<u8>>>>,
    /// Saga instances as the steps handled so far in this batch left them.
    instances: Mutex<BTreeMap<String, Instance>>,
    /// Timeouts the steps handled so far in this batch handled.
    fired: Mutex<std::collections::BTreeSet<String>>,
    /// What the message in hand read, while reads are recorded (`None`:
    /// they are not).
    reads: Mutex<Option<Reads>>,
}

/// What one message read through its route's [`Scope`]: enough to tell
/// whether it read something a message handled beside it (on another lane
/// of a route with `concurrency` above 1) wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// State keys read (as stored: a saga's keys carry their instance).
    pub keys: Vec<String>,
    /// Key ranges listed: prefix, and the key the page started after.
    pub ranges: Vec<(String, Option<String>)>,
    /// Saga instances read.
    pub instances: Vec<String>,
    /// Saga timeouts whose owner was read.
    pub timeouts: Vec<String>,
}

impl Reads {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.ranges.is_empty()
            && self.instances.is_empty()
            && self.timeouts.is_empty()
    }
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("plugin", &self.plugin)
            .finish_non_exhaustive()
    }
}

impl Scope {
    pub fn new(plugin: &str, reader: Arc<dyn Reader>) -> Arc<Self> {
        Arc::new(Scope {
            plugin: plugin.to_owned(),
            reader,
            batch: Mutex::new(BTreeMap::new()),
            instances: Mutex::new(BTreeMap::new()),
            fired: Mutex::new(std::collections::BTreeSet::new()),
            reads: Mutex::new(None),
        })
    }

    /// Starts (or stops) recording what each message reads; see
    /// [`Scope::take_reads`].
    pub fn record_reads(&self, on: bool) {
        *self.reads.lock().unwrap_or_else(PoisonError::into_inner) = on.then(Reads::default);
    }

    /// What was read since the last call (empty when reads are not
    /// recorded).
    pub fn take_reads(&self) -> Reads {
        self.reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Records a read, when reads are recorded.
    fn read(&self, add: impl FnOnce(&mut Reads)) {
        if let Some(r) = self
            .reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            add(r);
        }
    }

    fn batch(&self) -> MutexGuard<'_, BTreeMap<String, Option<Vec<u8>>>> {
        // Only whole inserts and clears happen under the lock.
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what the last batch wrote: it is committed, or it was not
    /// and its messages come again.
    pub fn begin_batch(&self) {
        self.batch().clear();
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The instance of timeout `id` while it is pending, as the next
    /// message sees it.
    pub fn timeout_instance(&self, id: &str) -> Result<Option<String>> {
        self.read(|r| r.timeouts.push(id.to_owned()));
        if self
            .fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
        {
            return Ok(None);
        }
        self.reader.timeout_instance(&self.plugin, id)
    }

    /// The saga instance `id` as the next message sees it: as the batch's
    /// steps left it, or as stored.
    pub fn instance(&self, id: &str) -> Result<Option<Instance>> {
        self.read(|r| r.instances.push(id.to_owned()));
        if let Some(i) = self
            .instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            return Ok(Some(i.clone()));
        }
        self.reader.instance(&self.plugin, id)
    }

    /// Makes a handled message's saga step visible to the rest of the
    /// batch.
    pub fn stepped(&self, step: &Step) {
        if let Some(fired) = &step.fired {
            self.fired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(fired.clone());
        }
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(step.instance.clone(), step.instance());
    }

    /// Makes a handled message's writes visible to the rest of the batch.
    pub fn handled(&self, changes: &Changes) {
        let mut batch = self.batch();
        for (k, v) in &changes.writes {
            batch.insert(k.clone(), v.clone());
        }
    }

    /// The value of `key` as a call sees it, under `call`'s own writes.
    pub fn get(&self, call: &Changes, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(v) = call.writes.get(key) {
            return Ok(v.clone());
        }
        self.read(|r| r.keys.push(key.to_owned()));
        if let Some(v) = self.batch().get(key) {
            return Ok(v.clone());
        }
        self.reader.get(&self.plugin, key)
    }

    /// Keys as a call sees them: the store's, with what the batch and the
    /// call set added and what they deleted taken away.
    pub fn keys(
        &self,
        call: &Changes,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let limit = limit.min(MAX_LIST);
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(|r| {
            r.ranges.push((prefix.to_owned(), after.map(str::to_owned)));
        });
        let in_range = |k: &str| k.starts_with(prefix) && after.is_none_or(|a| k > a);
        // Which keys of the range the batch and the call set (`true`) or
        // deleted (`false`); the values stay where they are.
        let mut overlay: BTreeMap<String, bool> = self
            .batch()
            .iter()
            .filter(|(k, _)| in_range(k))
            .map(|(k, v)| (k.clone(), v.is_some()))
            .collect();
        for (k, v) in call.writes.iter().filter(|(k, _)| in_range(k)) {
            overlay.insert(k.clone(), v.is_some());
        }
        // Deleted keys may hide stored ones: ask for enough to still fill
        // the page.
        let hidden = overlay.values().filter(|set| !**set).count();
        let stored = self
            .reader
            .keys(&self.plugin, prefix, after, limit.saturating_add(hidden))?;
        let mut keys: std::collections::BTreeSet<String> = stored
            .into_iter()
            .filter(|k| overlay.get(k) != Some(&false))
            .collect();
        keys.extend(
            overlay
                .iter()
                .filter(|(_, set)| **set)
                .map(|(k, _)| k.clone()),
        );
        Ok(keys.into_iter().take(limit).collect())
    }
}

/// Saga instances by plugin and id, each with its steps.
type Sagas = BTreeMap<(String, String), (Instance, Vec<Step>)>;

/// State held in memory: for `switchyard test` and
/// [`crate::testing`], where cases set state before and check it after.
#[derive(Debug, Default)]
pub struct Memory {
    values: Mutex<BTreeMap<(String, String), Vec<u8>>>,
    /// Saga instances by plugin and id, with their steps.
    sagas: Mutex<Sagas>,
    /// Pending saga timeouts by plugin and id, with their instance.
    timeouts: Mutex<BTreeMap<(String, String), (String, crate::saga::Timeout)>>,
}

impl Memory {
    fn values(&self) -> MutexGuard<'_, BTreeMap<(String, String), Vec<u8>>> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a value, as a case's given state.
    pub fn put(&self, plugin: &str, key: &str, value: Vec<u8>) {
        self.values()
            .insert((plugin.to_owned(), key.to_owned()), value);
    }

    /// Applies a handled message's changes.
    pub fn apply(&self, plugin: &str, changes: &Changes) {
        let mut values = self.values();
        for (k, v) in &changes.writes {
            let key = (plugin.to_owned(), k.clone());
            match v {
                Some(v) => values.insert(key, v.clone()),
                None => values.remove(&key),
            };
        }
    }

    fn sagas(&self) -> MutexGuard<'_, Sagas> {
        self.sagas.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a saga instance, as a case's given instance.
    pub fn put_instance(&self, plugin: &str, id: &str, instance: Instance) {
        self.sagas()
            .insert((plugin.to_owned(), id.to_owned()), (instance, Vec::new()));
    }

    /// Applies a handled message's saga step, checking its version as a
    /// store does.
    pub fn apply_step(&self, plugin: &str, step: &Step) -> Result<()> {
        let mut sagas = self.sagas();
        let key = (plugin.to_owned(), step.instance.clone());
        let before = sagas.get(&key);
        if before.map_or(0, |(i, _)| i.version) != step.read_version {
            return Err(crate::saga::Conflict {
                plugin: plugin.to_owned(),
                instance: step.instance.clone(),
                expected: step.read_version,
            }
            .into());
        }
        let after = step.instance();
        let mut steps = before.map(|(_, s)| s.clone()).unwrap_or_default();
        steps.push(step.clone());
        sagas.insert(key, (after, steps));
        let mut timeouts = self.timeouts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fired) = &step.fired {
            timeouts.remove(&(plugin.to_owned(), fired.clone()));
        }
        if step.completed {
            timeouts.retain(|(p, _), (i, _)| !(p == plugin && *i == step.instance));
        } else {
            for t in &step.timeouts {
                timeouts.insert(
                    (plugin.to_owned(), t.id.clone()),
                    (step.instance.clone(), t.clone()),
                );
            }
        }
        Ok(())
    }

    /// Stores a pending timeout, as a case's given one.
    pub fn put_timeout(&self, plugin: &str, instance: &str, timeout: crate::saga::Timeout) {
        self.timeouts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                (plugin.to_owned(), timeout.id.clone()),
                (instance.to_owned(), timeout),
            );
    }

    /// The pending timeouts of `plugin`, with their instances.
    pub fn all_timeouts(&self, plugin: &str) -> Vec<(String, crate::saga::Timeout)> {
        self.timeouts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|((p, _), _)| p == plugin)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every key and value of `plugin`'s state.
    pub fn all(&self, plugin: &str) -> BTreeMap<String, Vec<u8>> {
        self.values()
            .iter()
            .filter(|((p, _), _)| p == plugin)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Reader for Memory {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .values()
            .get(&(plugin.to_owned(), key.to_owned()))
            .cloned())
    }

    fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        Ok(self
            .values()
            .keys()
            .filter(|(p, k)| {
                p == plugin && k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a)
            })
            .map(|(_, k)| k.clone())
            .take(limit)
            .collect())
    }

    fn instance(&self, plugin: &str, id: &str) -> Result<Option<Instance>> {
        Ok(self
            .sagas()
            .get(&(plugin.to_owned(), id.to_owned()))
            .map(|(i, _)| i.clone()))
    }

    fn instances(&self, query: &crate::saga::Query) -> Result<Vec<crate::saga::Listed>> {
        let mut found: Vec<crate::saga::Listed> = self
            .sagas()
            .iter()
            .filter(|((p, _), (i, _))| crate::saga::matches(query, p, i))
            .map(|((p, id), (i, _))| crate::saga::Listed {
                plugin: p.clone(),
                id: id.clone(),
                instance: i.clone(),
            })
            .collect();
        found.sort_by_key(|l| std::cmp::Reverse(l.instance.updated_at_ms));
        found.truncate(query.limit);
        Ok(found)
    }

    fn active(&self, plugin: &str) -> Result<u64> {
        Ok(self
            .sagas()
            .iter()
            .filter(|((p, _), (i, _))| p == plugin && i.status.is_open())
            .count() as u64)
    }

    fn steps(&self, plugin: &str, id: &str) -> Result<Vec<Step>> {
        Ok(self
            .sagas()
            .get(&(plugin.to_owned(), id.to_owned()))
            .map(|(_, s)| s.clone())
            .unwrap_or_default())
    }

    fn timeout_instance(&self, plugin: &str, id: &str) -> Result<Option<String>> {
        Ok(self
            .timeouts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(plugin.to_owned(), id.to_owned()))
            .map(|(instance, _)| instance.clone()))
    }

    fn timeouts(&self, plugin: &str, instance: &str) -> Result<Vec<crate::saga::Pending>> {
        let mut pending: Vec<crate::saga::Pending> = self
            .all_timeouts(plugin)
            .into_iter()
            .filter(|(i, _)| i == instance)
            .map(|(_, t)| crate::saga::Pending {
                id: t.id,
                due_ms: t.due_ms,
                message_type: t.message_type,
                fired_at_ms: None,
                sends: 0,
            })
            .collect();
        pending.sort_by_key(|p| p.due_ms);
        Ok(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(writes: &[(&str, Option<&str>)]) -> Changes {
        Changes {
            writes: writes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.map(|v| v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn a_call_reads_its_writes_over_the_batch_over_the_store() {
        let store = Arc::new(Memory::default());
        store.put("p", "a", b"stored".to_vec());
        store.put("p", "b", b"stored".to_vec());
        store.put("other", "c", b"theirs".to_vec());
        let scope = Scope::new("p", store);
        scope.handled(&changes(&[("b", Some("batch")), ("c", Some("mine"))]));
        let call = changes(&[("a", None)]);
        assert_eq!(scope.get(&call, "a").unwrap(), None);
        assert_eq!(scope.get(&call, "b").unwrap(), Some(b"batch".to_vec()));
        assert_eq!(scope.get(&call, "c").unwrap(), Some(b"mine".to_vec()));
        assert_eq!(scope.keys(&call, "", None, 10).unwrap(), ["b", "c"]);
        assert_eq!(scope.keys(&call, "", Some("b"), 10).unwrap(), ["c"]);
        scope.begin_batch();
        assert_eq!(
            scope.get(&Changes::default(), "b").unwrap(),
            Some(b"stored".to_vec())
        );
        assert_eq!(scope.get(&Changes::default(), "c").unwrap(), None);
    }

    #[test]
    fn deleted_keys_do_not_shorten_a_page() {
        let store = Arc::new(Memory::default());
        for k in ["k1", "k2", "k3", "k4"] {
            store.put("p", k, b"1".to_vec());
        }
        let scope = Scope::new("p", store);
        let call = changes(&[("k1", None), ("k2", None)]);
        assert_eq!(scope.keys(&call, "k", None, 2).unwrap(), ["k3", "k4"]);
    }
}
