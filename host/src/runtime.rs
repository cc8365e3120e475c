//! A running host: a pipeline's plugins loaded and checked, its transport
//! open, one route per plugin.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{Pipeline, TransportConfig};
use crate::crash_loop::CrashGuard;
use crate::dispatch::{Origin, Version};
use crate::dlq::DeadLetterStore;
use crate::plugin::contract::{self, Problem};
use crate::plugin::{ComponentCache, LoadedPlugin, PluginEngine};
use crate::supervisor::{Deployments, RouteExit, RouteServices, Supervisor};
use crate::telemetry::Telemetry;
use crate::transport::amqp::AmqpTransport;
use crate::transport::embedded::EmbeddedTransport;
use crate::transport::kafka::KafkaTransport;
use crate::transport::{Topology, Transport};

/// The plugins of a pipeline, loaded and checked against it.
pub struct Plugins {
    pub engine: Arc<PluginEngine>,
    pub loaded: Vec<LoadedPlugin>,
    /// Where each plugin's component came from (same order as `loaded`).
    pub origins: Vec<Origin>,
    /// Warnings found while checking (errors make loading fail).
    pub warnings: Vec<Problem>,
    /// The pipeline's `[schemas]`, compiled.
    pub schemas: Arc<crate::schemas::Schemas>,
}

/// Why the plugins of a pipeline cannot run, every reason at once.
#[derive(Debug, thiserror::Error)]
#[error("{}", render_plugin_errors(.0))]
pub struct PluginErrors(pub Vec<String>);

/// Every reason on its own line, then how many there are.
fn render_plugin_errors(errors: &[String]) -> String {
    let n = errors.len();
    let mut out: String = errors.iter().map(|e| format!("{e}\n")).collect();
    out.push_str(&format!(
        "{n} plugin error{}",
        if n == 1 { "" } else { "s" }
    ));
    out
}

/// The cache directory for a pipeline.
pub fn cache_dir(pipeline: &Pipeline) -> Option<std::path::PathBuf> {
    pipeline
        .cache_dir
        .clone()
        .or_else(ComponentCache::default_dir)
}

/// Loads every plugin of the pipeline (compiling them in parallel), calls
/// their `describe()` and checks it against the pipeline. Reports every
/// problem of every plugin at once.
pub async fn load_plugins(pipeline: &Pipeline) -> Result<Plugins> {
    load_plugins_from(pipeline, &BTreeMap::new()).await
}

/// [`load_plugins`], except that the plugins named in `deployed` are loaded
/// from the given files (versions deployed to the host) instead of the
/// pipeline's.
pub async fn load_plugins_from(
    pipeline: &Pipeline,
    deployed: &BTreeMap<String, (PathBuf, Origin)>,
) -> Result<Plugins> {
    use tracing::Instrument as _;
    let span = tracing::info_span!("load plugins", pipeline = %pipeline.name, plugins = pipeline.plugins.len());
    load_plugins_inner(pipeline, deployed)
        .instrument(span)
        .await
}

/// Loads the build at `path` as plugin `plugin` of `pipeline`, in its
/// sandbox, and checks what its `describe()` says against the pipeline:
/// what a host would check before swapping it in. Its description, or every
/// reason it would be refused.
pub async fn check_build(
    pipeline: &Pipeline,
    plugin: &str,
    path: &Path,
) -> Result<crate::plugin::PluginInfo> {
    let Some(spec) = pipeline.plugin(plugin).cloned() else {
        let names: Vec<String> = pipeline
            .plugins
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        bail!(
            "pipeline `{}` has no plugin `{plugin}` (it has {})",
            pipeline.name,
            names.join(", ")
        );
    };
    let engine = PluginEngine::new(cache_dir(pipeline))?;
    let path = path.to_owned();
    let sandbox = crate::supervisor::sandbox_of(&spec);
    let loaded = tokio::task::spawn_blocking(move || engine.load(&path, sandbox))
        .await
        .context("plugin loading task failed")?
        .with_context(|| format!("plugin `{plugin}`"))?;
    let info = loaded.info().clone();
    let errors: Vec<String> = contract::check_plugin(&spec, &info)
        .into_iter()
        .filter(|p| p.error)
        .map(|p| p.to_string())
        .collect();
    if !errors.is_empty() {
        return Err(PluginErrors(errors).into());
    }
    Ok(info)
}

/// The versions deployed to this pipeline's host that a start must run
/// instead of the pipeline's files.
pub fn deployed_versions(pipeline: &Pipeline) -> Result<BTreeMap<String, (PathBuf, Origin)>> {
    let store = Deployments::new(&pipeline.state_dir, &pipeline.name);
    let mut out = BTreeMap::new();
    for spec in &pipeline.plugins {
        if let Some((d, path)) = store.current(spec.name.as_str())? {
            tracing::info!(
                plugin = %spec.name,
                version = %d.version,
                digest = %crate::plugin::short_digest(&d.digest),
                file = %spec.wasm.display(),
                "Running the version deployed to this host, not the pipeline's file (`switchyard plugins rollback` returns to it)"
            );
            out.insert(
                spec.name.to_string(),
                (
                    path,
                    Origin::Deployed {
                        at_ms: d.deployed_at_ms,
                    },
                ),
            );
        }
    }
    Ok(out)
}

async fn load_plugins_inner(
    pipeline: &Pipeline,
    deployed: &BTreeMap<String, (PathBuf, Origin)>,
) -> Result<Plugins> {
    let engine = Arc::new(PluginEngine::new(cache_dir(pipeline))?);
    let mut tasks = JoinSet::new();
    let mut origins = Vec::new();
    for (i, spec) in pipeline.plugins.iter().enumerate() {
        let engine = engine.clone();
        let spec = spec.clone();
        let (path, origin) = deployed
            .get(spec.name.as_str())
            .cloned()
            .unwrap_or_else(|| (spec.wasm.clone(), Origin::File));
        origins.push(origin);
        tasks.spawn_blocking(move || (i, engine.load(&path, crate::supervisor::sandbox_of(&spec))));
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.context("plugin loading task failed")?);
    }
    results.sort_by_key(|(i, _)| *i);

    let mut errors = Vec::new();
    let schemas = match crate::schemas::Schemas::load(pipeline) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            errors.push(format!("{e:#}"));
            Arc::default()
        }
    };
    let mut loaded = Vec::new();
    for ((_, result), spec) in results.into_iter().zip(&pipeline.plugins) {
        match result {
            Ok(p) => loaded.push(p),
            Err(e) => errors.push(format!("error: plugin `{}`: {e}", spec.name)),
        }
    }
    let mut problems: Vec<Problem> = Vec::new();
    let pairs: Vec<_> = loaded
        .iter()
        .filter_map(|p| pipeline.plugin(p.name().as_str()).map(|s| (s, p.info())))
        .collect();
    for (spec, info) in &pairs {
        problems.extend(contract::check_plugin(spec, info));
    }
    if errors.is_empty() {
        problems.extend(contract::check_pipeline(pipeline, &pairs));
    }
    let (errs, warnings): (Vec<_>, Vec<_>) = problems.into_iter().partition(|p| p.error);
    errors.extend(errs.iter().map(ToString::to_string));
    if !errors.is_empty() {
        return Err(PluginErrors(errors).into());
    }
    Ok(Plugins {
        engine,
        loaded,
        origins,
        warnings,
        schemas,
    })
}

/// Opens the pipeline's embedded store for enqueueing (no consumer lock).
/// Fails when the pipeline runs on a broker; see [`open`].
pub fn open_transport(pipeline: &Pipeline) -> Result<EmbeddedTransport> {
    let Some(config) = pipeline.embedded() else {
        bail!(
            "pipeline {} does not use the embedded transport",
            pipeline.name
        );
    };
    EmbeddedTransport::open(config, Topology::of(pipeline))
}

/// Opens the pipeline's transport, whichever it is: the embedded store, or a
/// connection to its broker.
pub async fn open(pipeline: &Pipeline) -> Result<Arc<dyn Transport>> {
    match &pipeline.transport {
        TransportConfig::Embedded(_) => Ok(Arc::new(open_transport(pipeline)?)),
        TransportConfig::Amqp(config) => Ok(Arc::new(AmqpTransport::new(pipeline, config)?)),
        TransportConfig::Kafka(config) => Ok(Arc::new(KafkaTransport::new(pipeline, config)?)),
    }
}

/// How [`run`] ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunMode {
    /// Until the shutdown future completes.
    #[default]
    Serve,
    /// Until every queue is empty (or shutdown).
    Drain,
}

/// How a host runs, besides its pipeline.
pub struct RunOptions {
    pub mode: RunMode,
    pub telemetry: Telemetry,
    /// Bind the admin listener (`/metrics`, `/healthz`, `/readyz`, `/plugins`) here.
    pub admin: Option<std::net::SocketAddr>,
    /// The bearer token the admin API's changing endpoints require; `None`
    /// turns them off.
    pub admin_token: Option<String>,
    /// Reload plugins and the pipeline file when they change.
    pub watch: bool,
    /// Handed the host's control once its routes run (tests and embedders
    /// use it to change the host while it runs).
    pub on_started: Option<tokio::sync::oneshot::Sender<Arc<Supervisor>>>,
    /// Run on this transport instead of opening the pipeline's own (the
    /// test harness passes the embedded one, wrapped to watch it).
    pub transport: Option<Arc<dyn Transport>>,
}

impl RunOptions {
    /// No tracing, no admin listener.
    pub fn quiet(mode: RunMode) -> Self {
        RunOptions {
            mode,
            telemetry: Telemetry::off(),
            admin: None,
            admin_token: None,
            watch: false,
            on_started: None,
            transport: None,
        }
    }
}

/// Runs a pipeline without telemetry export or admin listener; see
/// [`run_with`].
pub async fn run(
    pipeline: &Pipeline,
    plugins: Plugins,
    mode: RunMode,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    run_with(pipeline, plugins, RunOptions::quiet(mode), shutdown).await
}

/// Runs a pipeline until `shutdown` completes (or, in drain mode, until no
/// message is left). Routes finish and settle the batch in hand first.
pub async fn run_with(
    pipeline: &Pipeline,
    plugins: Plugins,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let RunOptions {
        mode,
        telemetry,
        admin,
        admin_token,
        watch,
        on_started,
        transport,
    } = options;
    for w in &plugins.warnings {
        tracing::warn!(plugin = %w.plugin, "{}", w.message);
    }
    let transport = match transport {
        Some(t) => t,
        None => open(pipeline).await?,
    };
    let _guard = transport.start_consuming().await?;
    for warning in transport.startup_warnings().await? {
        tracing::warn!("{warning}");
    }
    let (dead_letters, crash_guard) = open_stores(pipeline).await?;
    let state = open_state(pipeline, &*transport, &plugins).await?;
    let pruner = state
        .as_ref()
        .and_then(|a| a.store.clone())
        .map(|store| tokio::spawn(prune_done(store, pipeline.state.processed_retention)));
    // On a broker, due saga timeouts are sent from the state store; the
    // embedded transport schedules them itself.
    let timer = state
        .as_ref()
        .and_then(|a| a.store.clone())
        .filter(|_| pipeline.plugins.iter().any(|p| p.saga.is_some()))
        .map(|store| tokio::spawn(fire_timeouts(store, transport.clone())));
    let versions = versions_of(pipeline, &plugins)?;
    // Before any route runs: a host whose ingress cannot start does not.
    let ingress = match &pipeline.ingress {
        Some(config) => Some(bind_ingress(pipeline, config, &*transport).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // The journal's writer stops after the routes, which settle their
    // last batches first.
    let (journal_stop, journal_stopped) = watch::channel(false);
    let (journal, journal_reader, journal_pruner, journal_writer) =
        open_journal(pipeline, &*transport, &telemetry, journal_stopped).await;
    let (control, mut exits) = Supervisor::start(
        plugins.engine.clone(),
        transport.clone(),
        pipeline.clone(),
        versions,
        RouteServices {
            dead_letters,
            host: crate::dlq::host_name(),
            telemetry: telemetry.clone(),
            fail_when_plugin_cannot_start: mode == RunMode::Drain,
            schemas: plugins.schemas.clone(),
            crash_guard: crash_guard.clone(),
            state,
            journal,
        },
    )
    .await?;
    // The admin listener outlives the routes: while they drain, /readyz
    // says so and /metrics can still be scraped.
    let (admin_stop, admin_stopped) = watch::channel(false);
    let phase = crate::admin::Phase::new();
    // What the fleet's follower last read, for the console.
    let (fleet_view, fleet_seen) = watch::channel(None);
    // Without a console no one reads it, and the follower reads no more.
    let fleet_seen = (pipeline.fleet.is_some() && admin.is_some()).then_some(fleet_seen);
    let admin_task = match admin {
        Some(addr) => {
            start_admin(
                addr,
                &telemetry,
                &control,
                ConsoleFeeds {
                    journal: journal_reader,
                    fleet: fleet_seen,
                },
                admin_token,
                phase.clone(),
                admin_stopped,
            )
            .await
        }
        None => None,
    };
    let ingress_task = ingress.map(|i| {
        let mut stop = stop_rx.clone();
        tokio::spawn(i.serve(control.clone(), async move {
            let _ = stop.changed().await;
        }))
    });
    let watcher = watch.then(|| {
        tokio::spawn(crate::supervisor::watch::run(
            control.clone(),
            pipeline.watch_interval,
            stop_rx.clone(),
        ))
    });
    // Follows the versions deployed to the fleet, and reports this host.
    let follower = pipeline.fleet.clone().map(|config| {
        tokio::spawn(crate::fleet::follow(
            config,
            control.clone(),
            stop_rx.clone(),
            fleet_view,
        ))
    });
    tracing::info!(
        pipeline = %pipeline.name,
        transport = transport.kind(),
        location = %transport.location(),
        dead_letters = %crate::dlq::describe(&pipeline.dead_letters),
        routes = plugins.loaded.len(),
        "Host running"
    );
    phase.serving();
    if let Some(tx) = on_started {
        let _ = tx.send(control.clone());
    }
    let outcome = until_done(
        mode,
        &*transport,
        &mut exits,
        crash_guard.as_deref(),
        shutdown,
    )
    .await;
    phase.draining();
    control.begin_stop().await;
    let _ = stop_tx.send(true);
    if let Some(task) = ingress_task {
        // It takes no new request; those in progress get their moment.
        let _ = task.await;
    }
    stop(&control, &mut exits, watcher, admin_task, admin_stop).await;
    for task in [pruner, timer, journal_pruner].into_iter().flatten() {
        task.abort();
    }
    // It says that this host stopped; a database that does not answer
    // does not hold the host.
    if let Some(mut task) = follower
        && tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
    {
        task.abort();
    }
    let _ = journal_stop.send(true);
    if let Some(writer) = journal_writer {
        // What the routes settled last is written before the host stops.
        if tokio::time::timeout(JOURNAL_FLUSH, writer).await.is_err() {
            tracing::warn!("The journal's last records were not written in time");
        }
    }
    outcome?;
    if mode == RunMode::Drain && !transport.is_idle().await? {
        bail!("stopped before every queue was empty");
    }
    Ok(())
}

/// The dead-letter store, and the crash-loop guard that records in it.
async fn open_stores(
    pipeline: &Pipeline,
) -> Result<(Arc<dyn DeadLetterStore>, Option<Arc<CrashGuard>>)> {
    let dead_letters = crate::dlq::open(&pipeline.dead_letters, &pipeline.name)
        .await
        .with_context(|| {
            format!(
                "cannot open the {}",
                crate::dlq::describe(&pipeline.dead_letters)
            )
        })?;
    // A safety net, not the message path: a host whose state directory
    // cannot be written (a read-only file system) runs without it.
    let crash_guard = match CrashGuard::start(
        &pipeline.state_dir,
        &pipeline.name,
        dead_letters.clone(),
        pipeline.crash_loop_limit,
    )
    .await
    {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "The crash-loop guard cannot start; running without it");
            None
        }
    };
    Ok((dead_letters, crash_guard))
}

/// Where plugins' state is kept: in the transport's own store when it has
/// one (the embedded transport), otherwise in `[state]`'s store, opened
/// only when a plugin uses state, is `exactly_once` or is a saga.
async fn open_state(
    pipeline: &Pipeline,
    transport: &dyn Transport,
    plugins: &Plugins,
) -> Result<Option<crate::state::Access>> {
    if let Some(reader) = transport.state() {
        return Ok(Some(crate::state::Access {
            reader,
            store: None,
        }));
    }
    let exactly_once = pipeline.plugins.iter().any(|p| p.is_exactly_once());
    if !exactly_once && !plugins.loaded.iter().any(LoadedPlugin::uses_state) {
        return Ok(None);
    }
    let store = crate::state::open(&pipeline.state, &pipeline.name)
        .await
        .context("cannot open the state store ([state])")?;
    tracing::info!(store = %store.location(), "State store open");
    Ok(Some(crate::state::Access {
        reader: store.clone(),
        store: Some(store),
    }))
}

/// How long a stopping host waits for its journal writer.
const JOURNAL_FLUSH: Duration = Duration::from_secs(5);

/// How often the journal is pruned.
const JOURNAL_PRUNE: Duration = Duration::from_secs(600);

/// The journal as `[journal]` says: on the embedded transport written in
/// the settle transaction; on a broker by a writer task of its own. A
/// journal store that cannot be opened is logged and the host runs
/// without a journal: it never stops messages. Returns the routes' sink,
/// the pruning task and the writer task.
async fn open_journal(
    pipeline: &Pipeline,
    transport: &dyn Transport,
    telemetry: &crate::telemetry::Telemetry,
    stop: watch::Receiver<bool>,
) -> (
    Option<crate::journal::Sink>,
    Option<Arc<dyn crate::journal::Store>>,
    Option<tokio::task::JoinHandle<()>>,
    Option<tokio::task::JoinHandle<()>>,
) {
    let config = &pipeline.journal;
    if !config.enabled {
        return (None, None, None, None);
    }
    let in_settle = transport.kind() == "embedded";
    // On the embedded transport the journal is the transport's own file,
    // wherever the pipeline's settings point.
    let mut config = config.clone();
    if in_settle && let Some(e) = pipeline.embedded() {
        config.store = crate::config::StoreConfig::Embedded {
            path: e.path.clone(),
        };
    }
    let config = &config;
    let store = match crate::journal::open(config, &pipeline.name).await {
        Ok(store) => store,
        Err(e) => {
            tracing::warn!(
                error = %format!("{e:#}"),
                "Cannot open the journal; running without one (messages are not affected)"
            );
            return (None, None, None, None);
        }
    };
    let pruner = tokio::spawn(crate::journal::prune_every(
        store.clone(),
        config.clone(),
        JOURNAL_PRUNE,
    ));
    if in_settle {
        let sink = crate::journal::Sink::InSettle {
            payloads: config.payloads,
        };
        return (Some(sink), Some(store), Some(pruner), None);
    }
    tracing::info!(store = %store.location(), "Journal open");
    let (writer, task) = crate::journal::Writer::start(
        store.clone(),
        telemetry.metrics.journal_dropped.clone(),
        config.payloads,
        stop,
    );
    (
        Some(crate::journal::Sink::Writer(writer)),
        Some(store),
        Some(pruner),
        Some(task),
    )
}

/// How often a host on a broker looks for due saga timeouts.
const TIMEOUT_POLL: Duration = Duration::from_secs(1);

/// How long a sent timeout waits to be handled before it is sent again (its
/// message lost with a broker, say). A second copy has the same message id,
/// and a saga handles a timeout once.
const TIMEOUT_LEASE: Duration = Duration::from_secs(300);

/// Sends due saga timeouts to their sagas' routes, every second. Hosts
/// sharing the store each claim different ones.
async fn fire_timeouts(
    store: Arc<dyn crate::state::Store>,
    transport: Arc<dyn crate::transport::Transport>,
) {
    let mut every = tokio::time::interval(TIMEOUT_POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease = u64::try_from(TIMEOUT_LEASE.as_millis()).unwrap_or(u64::MAX);
    loop {
        every.tick().await;
        let due = match store
            .claim_timeouts(crate::envelope::now_ms(), lease, 100)
            .await
        {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Cannot look for due saga timeouts");
                continue;
            }
        };
        let mut by_route: std::collections::BTreeMap<String, Vec<crate::envelope::Envelope>> =
            std::collections::BTreeMap::new();
        for (plugin, instance, timeout) in due {
            by_route
                .entry(plugin)
                .or_default()
                .push(timeout.message(&instance));
        }
        for (route, messages) in by_route {
            let n = messages.len();
            match transport.enqueue_to(&route, messages).await {
                Ok(()) => tracing::debug!(plugin = %route, timeouts = n, "Saga timeouts sent"),
                Err(e) => tracing::warn!(
                    plugin = %route,
                    timeouts = n,
                    error = %format!("{e:#}"),
                    "Cannot send due saga timeouts; they are sent again after their lease"
                ),
            }
        }
    }
}

/// Forgets, every hour, the done records of exactly-once plugins older than
/// `retention`.
async fn prune_done(store: Arc<dyn crate::state::Store>, retention: Duration) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        let before = crate::envelope::now_ms()
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        match store.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                records = n,
                "Forgot the records of messages handled before the retention"
            ),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Cannot prune the records of handled messages")
            }
        }
    }
}

/// One version per loaded plugin, each with its retry policy.
fn versions_of(pipeline: &Pipeline, plugins: &Plugins) -> Result<Vec<Arc<Version>>> {
    let origins = plugins
        .origins
        .iter()
        .copied()
        .chain(std::iter::repeat(Origin::File));
    plugins
        .loaded
        .iter()
        .zip(origins)
        .map(|(plugin, origin)| {
            let Some(spec) = pipeline.plugin(plugin.name().as_str()) else {
                bail!(
                    "plugin {} is not part of pipeline {}",
                    plugin.name(),
                    pipeline.name
                );
            };
            Ok(Version::new(plugin.clone(), spec.retry.clone(), origin))
        })
        .collect()
}

/// What the console reads besides the supervisor.
struct ConsoleFeeds {
    /// Where message journeys are read.
    journal: Option<Arc<dyn crate::journal::Store>>,
    /// What the fleet's follower last read (with `[fleet]`).
    fleet: Option<watch::Receiver<Option<crate::fleet::FleetView>>>,
}

/// Starts the admin listener; a host runs without it if it cannot bind.
async fn start_admin(
    addr: std::net::SocketAddr,
    telemetry: &Telemetry,
    control: &Arc<Supervisor>,
    feeds: ConsoleFeeds,
    token: Option<String>,
    phase: Arc<crate::admin::Phase>,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<Result<()>>> {
    match crate::admin::Admin::bind(addr, telemetry.clone()).await {
        Ok(admin) => {
            let deploys = if token.is_some() {
                "deploys on"
            } else {
                "deploys off: no token"
            };
            tracing::info!(
                address = %admin.local_addr().map_or(addr.to_string(), |a| a.to_string()),
                "Admin listener: /metrics, /healthz, /readyz, /plugins, the console at /ui ({deploys})"
            );
            let console = crate::console::Console::new(
                control.clone(),
                feeds.journal,
                token.clone(),
                admin.guesses(),
                feeds.fleet,
            )
            .await;
            let admin = admin
                .with_control(control.clone(), token)
                .with_phase(phase)
                .with_console(console);
            Some(tokio::spawn(admin.serve(async move {
                let _ = stop.changed().await;
            })))
        }
        // Metrics are not worth failing the host for.
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Admin listener not started");
            None
        }
    }
}

/// Binds the HTTP ingress; a host whose `[ingress]` cannot listen, whose
/// certificate cannot be read, or whose token variables are not set, does
/// not start.
async fn bind_ingress(
    pipeline: &Pipeline,
    config: &crate::config::IngressConfig,
    transport: &dyn Transport,
) -> Result<crate::ingress::Ingress> {
    let read = |var: &str, what: &str| match std::env::var(var) {
        Ok(t) if !t.is_empty() => Ok(t),
        _ => Err(anyhow::anyhow!(
            "[ingress] {what} names the environment variable {var}, which is not set: set it to the bearer token clients must present"
        )),
    };
    let mut tokens = crate::ingress::Tokens::default();
    if let Some(var) = &config.token_env {
        tokens.all = Some(read(var, "token_env")?);
    }
    for (t, var) in &config.type_tokens {
        let what = format!("tokens.{t}");
        tokens.by_type.insert(t.to_string(), read(var, &what)?);
    }
    let required = tokens.required();
    let ingress =
        crate::ingress::Ingress::bind(pipeline, config.clone(), tokens, transport).await?;
    tracing::info!(
        address = %ingress.local_addr().map_or(config.listen.to_string(), |a| a.to_string()),
        scheme = if ingress.https() { "https" } else { "http" },
        token = if required { "required" } else { "none (loopback)" },
        "Ingress: POST /commands/{{Type}} and /events/{{Type}}"
    );
    Ok(ingress)
}

/// Waits for the host's end: `shutdown`, every queue empty (drain mode),
/// or a route that cannot go on.
async fn until_done(
    mode: RunMode,
    transport: &dyn Transport,
    exits: &mut mpsc::UnboundedReceiver<RouteExit>,
    crash_guard: Option<&CrashGuard>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let drained = async {
        if mode == RunMode::Serve {
            return std::future::pending::<Result<()>>().await;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if transport.is_idle().await? {
                return Ok(());
            }
        }
    };
    // Routes end with an error only when they cannot go on; a route stopped
    // because its plugin left the pipeline ends with `Ok`.
    let route_died = async {
        loop {
            match exits.recv().await {
                Some((_, Ok(()))) => {}
                Some((route, Err(e))) => {
                    return Err::<(), _>(e.context(format!("route {route} stopped")));
                }
                None => return std::future::pending().await,
            }
        }
    };
    tokio::select! {
        () = shutdown => {
            tracing::info!("Shutting down: finishing messages in flight");
            // Asked to stop: what is in hand if a second signal or the
            // supervisor's SIGKILL ends the host is not a crash's doing.
            if let Some(g) = crash_guard {
                g.stopping();
            }
            Ok(())
        }
        r = drained => {
            r?;
            tracing::info!("Drained: every queue is empty");
            Ok(())
        }
        r = route_died => r,
    }
}

/// Stops the routes (each settles the batch in hand), the watcher and the
/// admin listener.
async fn stop(
    control: &Supervisor,
    exits: &mut mpsc::UnboundedReceiver<RouteExit>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    admin_task: Option<tokio::task::JoinHandle<Result<()>>>,
    admin_stop: watch::Sender<bool>,
) {
    control.shutdown().await;
    while let Ok((route, result)) = exits.try_recv() {
        if let Err(e) = result {
            tracing::error!(plugin = %route, error = %format!("{e:#}"), "Route stopped with an error");
        }
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    let _ = admin_stop.send(true);
    // The listener stops taking connections at once; an open scrape gets a
    // moment to finish, not the power to hold the host.
    if let Some(mut task) = admin_task
        && tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
    {
        task.abort();
    }
}
