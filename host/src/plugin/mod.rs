//! Loading and running plugin components with wasmtime.
//!
//! [`PluginEngine`] owns the wasmtime engine, the linker (WASI plus the
//! Switchyard host imports), the compiled-component cache and the epoch
//! ticker that enforces CPU deadlines. [`PluginEngine::load`] turns a `.wasm`
//! file into a [`LoadedPlugin`]: compiled, linked, and described. An
//! [`Instance`] is one warm store of a loaded plugin; it handles messages
//! until it traps or has handled `recycle_after` of them.

mod cache;
mod clock;
pub mod contract;
mod http;
mod saga_host;
mod sandbox;
mod state_host;
mod waits;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use wasmtime::component::{HasSelf, Linker, ResourceTable, types::ComponentItem};
use wasmtime::{Config, Engine, Store, Trap, WasmBacktrace};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

pub use crate::recover::FailureKind;
use crate::text::clip;
pub use cache::{CacheOutcome, ComponentCache};
pub use contract::{Contract, PluginInfo};
pub use http::{HttpSimulation, Stub as HttpStub};
pub use sandbox::{MemoryLimiter, OutputTail, Simulation};

use crate::config::{Grants, Limits, PluginName};
use crate::envelope::{Envelope, Kind};

/// Bindings generated from `wit/`, the only source of truth for the contract.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        anyhow: true,
        // State reads can fail (the store is down): the call is abandoned.
        imports: {
            "switchyard:plugin/state.get": trappable,
            "switchyard:plugin/state.list-keys": trappable,
            "switchyard:plugin/state.increment": trappable,
        },
    });
}

use bindings::switchyard::plugin::types as wit;

/// The WIT text of the contract, as `switchyard plugins wit` prints it.
pub const WIT: &str = include_str!("../../../wit/plugin.wit");

/// The version of the contract (the WIT package) this host speaks.
pub const CONTRACT_VERSION: &str = "switchyard:plugin@0.2.2";

/// The interface every plugin must export.
pub const HANDLER_INTERFACE: &str = "switchyard:plugin/handler@0.2.2";

/// The versions of the handler export this host loads: every 0.2.x, which
/// the component model treats as one API.
fn speaks(export: &str) -> bool {
    export
        .strip_prefix("switchyard:plugin/handler@0.2.")
        .is_some_and(|patch| !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit()))
}

/// How often the engine's epoch advances; CPU deadlines are rounded up to it.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Log lines longer than this are cut: a plugin must not flood the host log.
const MAX_LOG_LINE: usize = 8 * 1024;
/// A handler's error text is kept up to this length with the failed message.
const MAX_ERROR_TEXT: usize = 16 * 1024;
/// Codes, detail names and type names quoted in errors are cut to this.
const MAX_NAME: usize = 256;
/// Type names a plugin emits are quoted in errors up to this length (valid
/// names are at most 128 characters).
const MAX_TYPE_IN_ERRORS: usize = 160;
/// Structured error details kept per failure.
const MAX_ERROR_DETAILS: usize = 64;
/// Log lines per `handle` call beyond which lines are dropped (and counted).
const MAX_LOG_LINES_PER_CALL: u32 = 256;
/// Span attributes plus span events (log lines included) a plugin may add
/// per call; below the span's event limit, so the host's own events fit.
pub const MAX_PLUGIN_SPAN_EVENTS: u32 = 128;
/// Total bytes (payloads, headers, names) one call may emit; the host holds
/// them in memory until the batch settles.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// The wasmtime engine shared by every plugin of a host.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<State>,
    cache: ComponentCache,
    ticker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.ticker.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

/// Why a plugin could not be loaded. The message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {:#}", .path.display(), .error)]
pub struct LoadError {
    pub path: PathBuf,
    pub error: anyhow::Error,
}

impl PluginEngine {
    /// Creates the engine. `cache_dir` holds compiled components; `None`
    /// compiles every time.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Handlers are synchronous; the concurrency machinery costs ~0.6 µs
        // per call when enabled.
        config.concurrency_support(false);
        let engine = Engine::new(&config).map_err(anyhow::Error::from)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(anyhow::Error::from)?;
        // Outbound HTTP, refused unless granted (see `http`).
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)?;
        // Replace WASI's monotonic clock with one whose waits end at the
        // call's deadline (see `clock`).
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::add_to_linker::<
            State,
            clock::CappedClock,
        >(&mut linker, |s| clock::ClockView {
            table: &mut s.table,
            real: s.real_clock,
            deadline: s.call.deadline,
        })
        .map_err(anyhow::Error::from)?;
        linker.allow_shadowing(false);
        // Waits in WASI host calls end at the call's deadline (see `waits`).
        waits::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
        bindings::Plugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("switchyard-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .context("cannot start the epoch ticker thread")?
        };
        Ok(PluginEngine {
            engine,
            linker,
            cache: ComponentCache::new(cache_dir),
            ticker: Some((stop, ticker)),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Reads, compiles (or fetches from cache), links and describes a plugin.
    pub fn load(&self, path: &Path, sandbox: Sandbox) -> Result<LoadedPlugin, LoadError> {
        self.load_inner(path, sandbox).map_err(|error| LoadError {
            path: path.to_owned(),
            error,
        })
    }

    fn load_inner(&self, path: &Path, sandbox: Sandbox) -> Result<LoadedPlugin> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("no such file (build the plugin first?)"),
            _ => anyhow!("cannot read: {e}"),
        })?;
        self.load_bytes_inner(path, &bytes, sandbox)
    }

    /// [`PluginEngine::load`] from bytes already in memory (a deployed
    /// version); `path` says where they are kept, for messages.
    pub fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        sandbox: Sandbox,
    ) -> Result<LoadedPlugin, LoadError> {
        self.load_bytes_inner(path, bytes, sandbox)
            .map_err(|error| LoadError {
                path: path.to_owned(),
                error,
            })
    }

    fn load_bytes_inner(
        &self,
        path: &Path,
        bytes: &[u8],
        sandbox: Sandbox,
    ) -> Result<LoadedPlugin> {
        check_header(bytes)?;
        let digest = cache::digest(bytes);
        let started = Instant::now();
        let (component, cached) = self
            .cache
            .load_or_compile(&self.engine, bytes, &digest)
            .context("not a valid WebAssembly component")?;
        tracing::debug!(
            path = %path.display(),
            cached = matches!(cached, CacheOutcome::Hit),
            took = ?started.elapsed(),
            "Compiled component"
        );

        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let exports_handler = ty
            .exports(&self.engine)
            .any(|(n, item)| speaks(n) && matches!(item.ty, ComponentItem::ComponentInstance(_)));
        if !exports_handler {
            // The handler of another contract version (the handler of this
            // one, exported as something other than an instance, is not).
            if let Some(other) = exports
                .iter()
                .filter(|n| !speaks(n))
                .find_map(|n| n.strip_prefix("switchyard:plugin/handler@"))
            {
                bail!(
                    "built against contract switchyard:plugin@{other}, but this host speaks {}: rebuild the plugin against the WIT in wit/ (docs/plugin-contract.md says what changed)",
                    CONTRACT_VERSION
                );
            }
            bail!(
                "not a Switchyard plugin: it does not export `{HANDLER_INTERFACE}` (it exports {}); build it against the WIT in wit/",
                if exports.is_empty() {
                    "nothing".to_owned()
                } else {
                    exports.join(", ")
                }
            );
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context("it imports something the Switchyard host does not provide")?;
        let pre = bindings::PluginPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!("its `{HANDLER_INTERFACE}` export does not match the contract")
            })?;

        let mut plugin = LoadedPlugin {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                digest: format!("sha256:{}", hex::encode(digest)),
                size: bytes.len(),
                pre,
                engine: self.engine.clone(),
                http: Arc::new(http::Outbound::new(&sandbox)?),
                sandbox,
                contract: Contract::default(),
            }),
        };
        let info = plugin.describe()?;
        let inner = Arc::get_mut(&mut plugin.inner).context("plugin shared during load")?;
        inner.contract = Contract::new(info, inner.sandbox.name.clone());
        Ok(plugin)
    }
}

/// `sha256:<hex>` of a component's bytes: how versions are told apart.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(cache::digest(bytes)))
}

/// `sha256:0123456789ab` — enough to tell versions apart in logs.
pub fn short_digest(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

/// Refuses files that are not components with a message that says what they are.
fn check_header(bytes: &[u8]) -> Result<()> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        bail!("not a WebAssembly file (it does not start with the `\\0asm` magic)");
    }
    match bytes[4..8] {
        [1, 0, 0, 0] => bail!(
            "this is a core WebAssembly module, not a component; build it for the wasm32-wasip2 target or wrap it with `wasm-tools component new`"
        ),
        _ => Ok(()),
    }
}

/// What a plugin instance may use; from the plugin's pipeline entry.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// The plugin's name in the pipeline (for logs and errors).
    pub name: PluginName,
    pub limits: Limits,
    pub grants: Grants,
}

/// A compiled, linked plugin whose `describe()` has been read. Cheap to clone.
#[derive(Clone)]
pub struct LoadedPlugin {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    digest: String,
    size: usize,
    pre: bindings::PluginPre<State>,
    engine: Engine,
    sandbox: Sandbox,
    contract: Contract,
    /// The `http` grant, ready for requests.
    http: Arc<http::Outbound>,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.inner.sandbox.name)
            .field("path", &self.inner.path)
            .field("digest", &self.inner.digest)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    pub fn name(&self) -> &PluginName {
        &self.inner.sandbox.name
    }

    pub fn info(&self) -> &PluginInfo {
        &self.inner.contract.info
    }

    /// `sha256:<hex>` of the `.wasm` file.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn size(&self) -> usize {
        self.inner.size
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.sandbox.limits
    }

    /// The interfaces the component imports: the capabilities it asks for.
    pub fn imports(&self, engine: &Engine) -> Vec<String> {
        self.inner
            .pre
            .instance_pre()
            .component()
            .component_type()
            .imports(engine)
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// Whether the plugin imports the `state` interface.
    pub fn uses_state(&self) -> bool {
        self.inner
            .pre
            .instance_pre()
            .component()
            .component_type()
            .imports(&self.inner.engine)
            .any(|(name, _)| name.starts_with("switchyard:plugin/state@"))
    }

    /// A fresh, warm instance.
    pub fn instantiate(&self) -> Result<Instance> {
        self.instantiate_simulated(&Simulation::default())
    }

    /// A fresh instance that sees the host behave as `simulation` says (a
    /// fixed clock, extra environment, the network down): for contract
    /// tests.
    pub fn instantiate_simulated(&self, simulation: &Simulation) -> Result<Instance> {
        let inner = &self.inner;
        let output = OutputTail::default();
        let state = State {
            wasi: sandbox::wasi_ctx(&inner.sandbox.grants, simulation, &output)
                .with_context(|| format!("plugin {}", inner.sandbox.name))?,
            real_clock: inner.sandbox.grants.clock && simulation.clock.is_none(),
            output,
            table: ResourceTable::new(),
            http_ctx: WasiHttpCtx::new(),
            http_hooks: http::Hooks::new(
                inner.http.clone(),
                simulation.network_down,
                simulation.http.clone(),
            ),
            limiter: MemoryLimiter::new(inner.sandbox.limits.memory),
            // A start function's waits end too.
            call: Call {
                deadline: wait_deadline(Instant::now(), inner.sandbox.limits.timeout),
                ..Call::default()
            },
            plugin: self.inner.clone(),
            scope: None,
            saga: None,
        };
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(inner.sandbox.limits.timeout));
        let bindings = inner
            .pre
            .instantiate(&mut store)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot instantiate plugin {}", inner.sandbox.name))?;
        Ok(Instance {
            store,
            bindings,
            handled: 0,
            broken: false,
        })
    }

    fn describe(&self) -> Result<PluginInfo> {
        let mut instance = self.instantiate()?;
        let timeout = self.inner.sandbox.limits.timeout;
        instance.store.data_mut().call.deadline = wait_deadline(Instant::now(), timeout);
        instance.store.set_epoch_deadline(deadline_ticks(timeout));
        let raw = instance
            .bindings
            .switchyard_plugin_handler()
            .call_describe(&mut instance.store);
        match raw {
            Ok(info) => Ok(PluginInfo::from_wit(info)),
            Err(e) => {
                let failure = classify_trap(&instance.store, e, self.inner.sandbox.limits.timeout);
                bail!("describe() failed: {}", failure.message)
            }
        }
    }
}

/// When host-side waits of a call must end: just past its CPU deadline, so
/// that the epoch check (or the overrun check after the call) catches it.
fn wait_deadline(started: std::time::Instant, timeout: Duration) -> Option<tokio::time::Instant> {
    tokio::time::Instant::from_std(started).checked_add(timeout + 2 * EPOCH_TICK)
}

fn timeout_failure(timeout: Duration) -> Failure {
    Failure::new(
        FailureKind::Timeout,
        format!(
            "the handler ran past its {} deadline and was stopped",
            humantime::format_duration(timeout)
        ),
    )
}

fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_micros().max(1);
    u64::try_from(timeout.as_micros().div_ceil(tick))
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// One warm store and instance of a plugin.
pub struct Instance {
    store: Store<State>,
    bindings: bindings::Plugin,
    handled: u64,
    /// Set after a trap: the instance's state can no longer be trusted.
    broken: bool,
}

/// Store data of an instance.
pub struct State {
    wasi: WasiCtx,
    /// The end of what the plugin wrote to stdout/stderr this call.
    output: OutputTail,
    table: ResourceTable,
    http_ctx: WasiHttpCtx,
    http_hooks: http::Hooks,
    limiter: MemoryLimiter,
    /// What the current `handle` call has emitted so far.
    call: Call,
    plugin: Arc<Inner>,
    /// Whether the monotonic clock moves (the `clock` grant, and no
    /// simulated clock).
    real_clock: bool,
    /// Where the plugin's state is read; `None`: this host keeps none.
    scope: Option<Arc<crate::state::Scope>>,
    /// The saga instance of the message being handled, set by the route
    /// before each call of a saga plugin.
    saga: Option<SagaCall>,
}

/// The saga instance a call works on.
#[derive(Clone, Debug)]
pub struct SagaCall {
    pub id: String,
    /// Steps committed before this one (0: this message starts it).
    pub version: u64,
    pub started_at_ms: u64,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        // A request made now must end by the current call's deadline.
        self.http_hooks.deadline = self.call.deadline;
        WasiHttpCtxView {
            hooks: &mut self.http_hooks,
            table: &mut self.table,
            ctx: &mut self.http_ctx,
        }
    }
}

/// Per-call state: the outputs buffered until the call returns `ok` (the
/// outbox), the first contract violation, log accounting.
#[derive(Default)]
struct Call {
    message_id: String,
    message_type: String,
    kind: Option<Kind>,
    /// The rest of the envelope, lent for the call and handed to the plugin
    /// only if it asks (`host.metadata`).
    metadata: Metadata,
    /// When the CPU budget of this call runs out; waits end here.
    deadline: Option<tokio::time::Instant>,
    outputs: Vec<Output>,
    output_bytes: usize,
    /// What the call wrote to its state (read back by its own reads).
    state: crate::state::Changes,
    /// Why a state read failed: the call is abandoned and retried.
    state_error: Option<String>,
    /// The plugin marked its saga instance complete.
    saga_completed: bool,
    /// Timeouts the saga asked for.
    timeouts: Vec<crate::saga::Timeout>,
    violation: Option<String>,
    log_lines: u32,
    /// The message's trace span, when tracing is on.
    span: Option<opentelemetry::Context>,
    /// Span attributes and events (log lines included) the plugin may still
    /// add to the span: shared by every attempt of a delivery.
    span_budget: u32,
    /// The span attributes the call set, kept (tracing on or off) for the
    /// journal, where they find the message (`order.id = A-1001`).
    attributes: Vec<(String, String)>,
}

/// The most span attributes a call leaves for the journal.
pub const MAX_JOURNAL_ATTRIBUTES: usize = 8;
/// The longest attribute value the journal keeps.
pub const MAX_JOURNAL_ATTRIBUTE: usize = 200;

impl Call {
    /// Keeps a span attribute for the journal: one value per name (the
    /// last), at most [`MAX_JOURNAL_ATTRIBUTES`], control characters
    /// (line ends among them) as spaces.
    fn keep_attribute(&mut self, key: &str, value: &str) {
        let one_line = |s: &str, max: usize| {
            clip(s, max)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
        };
        let (key, value) = (
            one_line(key, MAX_NAME),
            one_line(value, MAX_JOURNAL_ATTRIBUTE),
        );
        if let Some(kept) = self.attributes.iter_mut().find(|(k, _)| *k == key) {
            kept.1 = value;
        } else if self.attributes.len() < MAX_JOURNAL_ATTRIBUTES {
            self.attributes.push((key, value));
        }
    }

    /// Readies the call's state for `envelope`. Its buffers are reused: no
    /// allocation per message for them.
    fn begin(
        &mut self,
        envelope: &Envelope,
        deadline: Option<tokio::time::Instant>,
        span: Option<&opentelemetry::Context>,
        span_budget: u32,
    ) {
        self.message_id.clone_from(&envelope.id);
        self.message_type.clone_from(&envelope.message_type);
        self.kind = Some(envelope.kind);
        self.deadline = deadline;
        self.span = span.cloned();
        self.span_budget = span_budget;
        self.outputs.clear();
        self.output_bytes = 0;
        self.state.writes.clear();
        self.state_error = None;
        self.saga_completed = false;
        self.timeouts.clear();
        self.violation = None;
        self.log_lines = 0;
        self.attributes.clear();
    }
}

/// The envelope fields a plugin reads on demand (`host.metadata`).
#[derive(Default)]
struct Metadata {
    headers: Vec<(String, String)>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    reply_to: Option<String>,
}

/// Something a handler emitted, held until the call returns `ok`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Event(Outgoing),
    Command(Outgoing),
    Reply(Response),
    /// What the call wrote to the plugin's state; at most one, after the
    /// messages.
    State(crate::state::Changes),
    /// The saga step a saga plugin's call made; added by the route, last.
    Saga(crate::saga::Step),
}

/// A published event or sent command as the plugin gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub message_type: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub partition_key: Option<String>,
}

/// A command handler's reply as the plugin gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub payload: Vec<u8>,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
}

/// Why a message was not handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub code: Option<String>,
    pub details: Vec<(String, String)>,
    /// The wasm backtrace of a trap, one frame per line.
    pub backtrace: Option<String>,
    /// The end of what the plugin wrote to stdout/stderr during the call.
    pub output: Option<String>,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
            code: None,
            details: Vec::new(),
            backtrace: None,
            output: None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        Ok(())
    }
}

impl Instance {
    /// Reads and writes the plugin's state through `scope` (without one,
    /// a plugin that uses state fails its messages).
    pub fn set_state(&mut self, scope: Arc<crate::state::Scope>) {
        self.store.data_mut().scope = Some(scope);
    }

    /// Runs the next calls on saga instance `saga` (`None`: not a saga
    /// call).
    pub fn set_saga(&mut self, saga: Option<SagaCall>) {
        self.store.data_mut().saga = saga;
    }

    /// Whether the last call marked its saga instance complete.
    pub fn saga_completed(&self) -> bool {
        self.store.data().call.saga_completed
    }

    /// The timeouts the last call asked for (taken: a second call gets
    /// none).
    pub fn take_timeouts(&mut self) -> Vec<crate::saga::Timeout> {
        std::mem::take(&mut self.store.data_mut().call.timeouts)
    }

    /// The span attributes the last call set, for the journal.
    pub fn take_attributes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.store.data_mut().call.attributes)
    }

    /// Messages this instance has handled.
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// Bytes of linear memory the instance holds (what its memory cap is
    /// measured against). Linear memory never shrinks.
    pub fn memory_used(&self) -> u64 {
        self.store.data().limiter.used()
    }

    /// Whether the instance must be replaced before the next message: it
    /// trapped, or it reached its recycle count.
    pub fn is_spent(&self) -> bool {
        self.broken || self.handled >= self.store.data().plugin.sandbox.limits.recycle_after
    }

    /// Handles one message. On `Ok`, returns what the handler emitted; on
    /// `Err`, nothing it emitted survives.
    ///
    /// The envelope's fields are moved into the call and back, not copied:
    /// it is unchanged when this returns.
    pub fn handle(&mut self, envelope: &mut Envelope) -> Result<Vec<Output>, Failure> {
        self.handle_traced(envelope, None, &mut 0)
    }

    /// [`Instance::handle`], with the message's trace span: the plugin's log
    /// lines become span events, and its span attributes and events land
    /// there, at most `span_budget` of them (the budget left is returned
    /// through it).
    pub fn handle_traced(
        &mut self,
        envelope: &mut Envelope,
        span: Option<&opentelemetry::Context>,
        span_budget: &mut u32,
    ) -> Result<Vec<Output>, Failure> {
        let timeout = self.store.data().plugin.sandbox.limits.timeout;
        // One clock read serves the waits' deadline and the overrun check.
        let started = std::time::Instant::now();
        let call = &mut self.store.data_mut().call;
        call.begin(
            envelope,
            wait_deadline(started, timeout),
            span,
            *span_budget,
        );
        let message = lend(envelope, &mut call.metadata);
        self.store.set_epoch_deadline(deadline_ticks(timeout));
        self.store.data().output.clear();
        self.handled += 1;
        let result = self
            .bindings
            .switchyard_plugin_handler()
            .call_handle(&mut self.store, &message);
        let overran = started.elapsed() > timeout + EPOCH_TICK;
        give_back(envelope, message, &mut self.store.data_mut().call.metadata);
        let state = self.store.data_mut();
        let call = &mut state.call;
        let mut outputs = std::mem::take(&mut call.outputs);
        if !call.state.is_empty() {
            outputs.push(Output::State(std::mem::take(&mut call.state)));
        }
        let state_error = call.state_error.take();
        let violation = call.violation.take();
        let log_lines = call.log_lines;
        call.span = None;
        *span_budget = call.span_budget;
        if log_lines > MAX_LOG_LINES_PER_CALL {
            tracing::warn!(
                plugin = %state.plugin.sandbox.name,
                message.id = %envelope.id,
                dropped = log_lines - MAX_LOG_LINES_PER_CALL,
                "Plugin log lines dropped"
            );
        }
        let mut outcome = match result {
            // The store failed the plugin, not the other way round.
            _ if state_error.is_some() => {
                if result.is_err() {
                    self.broken = true;
                }
                Err(Failure::new(
                    FailureKind::Transient,
                    state_error.unwrap_or_default(),
                ))
            }
            // The call returned, but only after a wait cut at its deadline:
            // it is as late as if it had been interrupted.
            Ok(_) if overran => Err(timeout_failure(timeout)),
            // A broken contract is a bug in the plugin, whatever it returned.
            Ok(_) if violation.is_some() => Err(Failure::new(
                FailureKind::ContractViolation,
                violation.unwrap_or_default(),
            )),
            Ok(Ok(())) => Ok(outputs),
            Ok(Err(e)) => Err(guest_failure(e)),
            Err(e) => {
                self.broken = true;
                Err(classify_trap(&self.store, e, timeout))
            }
        };
        let output = self.store.data().output.take();
        if let Err(f) = &mut outcome {
            f.output = output;
        }
        outcome
    }
}

/// A handler's own error, its texts clipped.
fn guest_failure(e: wit::HandlerError) -> Failure {
    let (kind, d) = match e {
        wit::HandlerError::Transient(d) => (FailureKind::Transient, d),
        wit::HandlerError::Permanent(d) => (FailureKind::Permanent, d),
    };
    Failure {
        kind,
        message: clip(&d.message, MAX_ERROR_TEXT),
        code: d.code.map(|c| clip(&c, MAX_NAME)),
        details: d
            .details
            .into_iter()
            .take(MAX_ERROR_DETAILS)
            .map(|(k, v)| (clip(&k, MAX_NAME), clip(&v, MAX_ERROR_TEXT)))
            .collect(),
        backtrace: None,
        output: None,
    }
}

/// Turns a wasmtime error from a call into a classified failure.
fn classify_trap(store: &Store<State>, error: wasmtime::Error, timeout: Duration) -> Failure {
    let backtrace = error.downcast_ref::<WasmBacktrace>().map(|bt| {
        bt.frames()
            .iter()
            .map(|f| {
                let name = f.func_name().unwrap_or("<unnamed>");
                format!("{:>4}: {name}", f.func_index())
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut failure = if let Some(wanted) = store.data().limiter.exceeded {
        Failure::new(
            FailureKind::OutOfMemory,
            format!(
                "memory limit of {} exceeded: the plugin asked for {}",
                crate::config::format_size(store.data().plugin.sandbox.limits.memory),
                crate::config::format_size(wanted)
            ),
        )
    } else if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        timeout_failure(timeout)
    } else {
        let what = match error.downcast_ref::<Trap>() {
            // Its text starts with "wasm trap:".
            Some(trap) => trap.to_string(),
            None => format!("{error:#}"),
        };
        Failure::new(FailureKind::Trap, what)
    };
    failure.backtrace = backtrace;
    failure
}

/// Moves the envelope's fields into the WIT message for the duration of a
/// call; [`give_back`] restores them.
fn lend(e: &mut Envelope, metadata: &mut Metadata) -> wit::Message {
    use std::mem::take;
    metadata.headers = take(&mut e.headers);
    metadata.correlation_id = e.correlation_id.take();
    metadata.causation_id = e.causation_id.take();
    metadata.reply_to = e.reply_to.take();
    wit::Message {
        id: take(&mut e.id),
        message_type: take(&mut e.message_type),
        kind: match e.kind {
            Kind::Command => wit::Kind::Command,
            Kind::Event => wit::Kind::Event,
        },
        payload: take(&mut e.payload),
        content_type: take(&mut e.content_type),
        created_at_ms: e.created_at_ms,
        attempt: e.attempt,
    }
}

fn give_back(e: &mut Envelope, m: wit::Message, metadata: &mut Metadata) {
    use std::mem::take;
    e.id = m.id;
    e.message_type = m.message_type;
    e.payload = m.payload;
    e.content_type = m.content_type;
    e.headers = take(&mut metadata.headers);
    e.correlation_id = metadata.correlation_id.take();
    e.causation_id = metadata.causation_id.take();
    e.reply_to = metadata.reply_to.take();
}

impl State {
    fn violate(&mut self, text: String) {
        if self.call.violation.is_none() {
            self.call.violation = Some(text);
        }
    }

    /// Buffers an output unless it would exceed the per-call limits.
    fn push_output(&mut self, output: Output, bytes: usize) {
        let max = self.plugin.sandbox.limits.max_outputs;
        if self.call.outputs.len() as u64 >= max {
            let name = self.plugin.sandbox.name.clone();
            self.violate(format!(
                "plugin {name} emitted more than {max} messages for one message (max_outputs)"
            ));
            return;
        }
        if self.call.output_bytes.saturating_add(bytes) > MAX_OUTPUT_BYTES {
            let name = self.plugin.sandbox.name.clone();
            self.violate(format!(
                "plugin {name} emitted more than {} of payload for one message",
                crate::config::format_size(MAX_OUTPUT_BYTES as u64)
            ));
            return;
        }
        self.call.output_bytes += bytes;
        self.call.outputs.push(output);
    }
}

/// What the host holds per header besides its text: two strings.
const HEADER_COST: usize = std::mem::size_of::<(String, String)>();
/// What the host holds per output besides its bytes: the output, the
/// envelope made from it, and their bookkeeping.
const OUTPUT_COST: usize = 256;

fn headers_size(headers: &[(String, String)]) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + HEADER_COST)
        .sum()
}

/// Bytes the host holds for an output. An empty header or an empty
/// message still costs what the host allocates for it, so a flood of
/// empty things is counted too.
fn outgoing_size(o: &wit::Outgoing) -> usize {
    OUTPUT_COST
        + o.message_type.len()
        + o.payload.len()
        + o.content_type.len()
        + headers_size(&o.headers)
        + o.partition_key.as_ref().map_or(0, String::len)
}

/// The limits a consumer applies to an arriving message, applied to what a
/// plugin emits: what one plugin publishes, the next one must be able to
/// take. The host's own headers (trace context) are added later, so a
/// plugin gets a little less than the whole header allowance.
fn check_outgoing(
    headers: &[(String, String)],
    content_type: &str,
    partition_key: Option<&str>,
) -> Result<(), String> {
    use crate::limits::{self, MAX_CONTENT_TYPE, MAX_PARTITION_KEY};
    limits::check_headers_within(
        headers,
        limits::MAX_PLUGIN_HEADERS,
        limits::MAX_PLUGIN_HEADER_BYTES,
    )?;
    limits::check_text("content type", content_type, MAX_CONTENT_TYPE)?;
    if let Some(k) = partition_key {
        limits::check_text("partition key", k, MAX_PARTITION_KEY)?;
    }
    Ok(())
}

/// An output as the host keeps it. Headers naming a saga, an instance or
/// a timeout are the host's to set: a plugin's own are dropped, so it can
/// neither pass them through by accident nor aim a fault or a timeout at
/// another saga's instance.
fn outgoing(mut o: wit::Outgoing) -> Outgoing {
    o.headers
        .retain(|(name, _)| !name.starts_with(crate::saga::SAGA_HEADER));
    Outgoing {
        message_type: o.message_type,
        payload: o.payload,
        content_type: o.content_type,
        headers: o.headers,
        partition_key: o.partition_key,
    }
}

impl bindings::switchyard::plugin::types::Host for State {}

impl bindings::switchyard::plugin::host::Host for State {
    fn metadata(&mut self) -> wit::MessageMetadata {
        let m = &self.call.metadata;
        wit::MessageMetadata {
            headers: m.headers.clone(),
            correlation_id: m.correlation_id.clone(),
            causation_id: m.causation_id.clone(),
            reply_to: m.reply_to.clone(),
        }
    }

    fn publish(&mut self, event: wit::Outgoing) {
        if let Err(v) = self.plugin.contract.check_publish(&event.message_type) {
            self.violate(v);
            return;
        }
        if let Err(e) = check_outgoing(
            &event.headers,
            &event.content_type,
            event.partition_key.as_deref(),
        ) {
            let (name, t) = (
                self.plugin.sandbox.name.clone(),
                clip(&event.message_type, MAX_TYPE_IN_ERRORS),
            );
            self.violate(format!("plugin {name} published {t}, but {e}"));
            return;
        }
        let bytes = outgoing_size(&event);
        self.push_output(Output::Event(outgoing(event)), bytes);
    }

    fn send(&mut self, command: wit::Outgoing) {
        if let Err(v) = self.plugin.contract.check_send(&command.message_type) {
            self.violate(v);
            return;
        }
        if let Err(e) = check_outgoing(
            &command.headers,
            &command.content_type,
            command.partition_key.as_deref(),
        ) {
            let (name, t) = (
                self.plugin.sandbox.name.clone(),
                clip(&command.message_type, MAX_TYPE_IN_ERRORS),
            );
            self.violate(format!("plugin {name} sent {t}, but {e}"));
            return;
        }
        let bytes = outgoing_size(&command);
        self.push_output(Output::Command(outgoing(command)), bytes);
    }

    fn reply(&mut self, answer: wit::Response) {
        let already = self
            .call
            .outputs
            .iter()
            .any(|o| matches!(o, Output::Reply(_)));
        if let Err(v) =
            self.plugin
                .contract
                .check_reply(self.call.kind, &self.call.message_type, already)
        {
            self.violate(v);
            return;
        }
        if let Err(e) = check_outgoing(&answer.headers, &answer.content_type, None) {
            let name = self.plugin.sandbox.name.clone();
            self.violate(format!("plugin {name} replied, but {e}"));
            return;
        }
        let bytes = OUTPUT_COST
            + answer.payload.len()
            + answer.content_type.len()
            + headers_size(&answer.headers);
        self.push_output(
            Output::Reply(Response {
                payload: answer.payload,
                content_type: answer.content_type,
                headers: answer.headers,
            }),
            bytes,
        );
    }

    fn log(&mut self, level: wit::LogLevel, text: String) {
        self.call.log_lines += 1;
        if self.call.log_lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let text = clip(&text, MAX_LOG_LINE);
        if let Some(cx) = self
            .call
            .span
            .as_ref()
            .filter(|_| self.call.span_budget > 0)
        {
            self.call.span_budget -= 1;
            use opentelemetry::trace::TraceContextExt as _;
            let severity = match level {
                wit::LogLevel::Trace => "trace",
                wit::LogLevel::Debug => "debug",
                wit::LogLevel::Info => "info",
                wit::LogLevel::Warn => "warn",
                wit::LogLevel::Error => "error",
            };
            cx.span().add_event(
                "log",
                vec![
                    opentelemetry::KeyValue::new("log.severity", severity),
                    opentelemetry::KeyValue::new("log.message", text.clone()),
                ],
            );
        }
        let plugin = self.plugin.sandbox.name.as_str();
        let id = self.call.message_id.as_str();
        // Tracing is off when there is no span: the line then carries no
        // trace fields.
        let ids = self.call.span.as_ref().and_then(crate::telemetry::ids);
        let trace_id = ids.as_ref().map(|(t, _)| tracing::field::display(t));
        let span_id = ids.as_ref().map(|(_, s)| tracing::field::display(s));
        macro_rules! log_at {
            ($level:ident) => {
                tracing::$level!(
                    target: "plugin",
                    plugin = %plugin,
                    message.id = %id,
                    trace_id,
                    span_id,
                    "{text}"
                )
            };
        }
        match level {
            wit::LogLevel::Trace => log_at!(trace),
            wit::LogLevel::Debug => log_at!(debug),
            wit::LogLevel::Info => log_at!(info),
            wit::LogLevel::Warn => log_at!(warn),
            wit::LogLevel::Error => log_at!(error),
        }
    }

    fn span_attribute(&mut self, key: String, value: String) {
        // The host's own attributes are not the plugin's to change.
        if key.starts_with("messaging.") || key.starts_with("switchyard.") {
            return;
        }
        self.call.keep_attribute(&key, &value);
        let Some(cx) = &self.call.span else { return };
        if self.call.span_budget == 0 {
            return;
        }
        self.call.span_budget -= 1;
        use opentelemetry::trace::TraceContextExt as _;
        cx.span().set_attribute(opentelemetry::KeyValue::new(
            clip(&key, MAX_NAME),
            clip(&value, MAX_LOG_LINE),
        ));
    }

    fn span_event(&mut self, name: String, attributes: Vec<(String, String)>) {
        let Some(cx) = &self.call.span else { return };
        if self.call.span_budget == 0 {
            return;
        }
        self.call.span_budget -= 1;
        use opentelemetry::trace::TraceContextExt as _;
        let attributes = attributes
            .into_iter()
            .take(MAX_ERROR_DETAILS)
            .map(|(k, v)| opentelemetry::KeyValue::new(clip(&k, MAX_NAME), clip(&v, MAX_LOG_LINE)))
            .collect();
        cx.span().add_event(clip(&name, MAX_NAME), attributes);
    }
}
