//! A running host: a pipeline's plugins loaded and checked, its transport
//! open, one route per plugin.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Pipeline, TransportConfig};
use crate::dispatch;
use crate::plugin::contract::{self, Problem};
use crate::plugin::{ComponentCache, LoadedPlugin, PluginEngine, Sandbox};
use crate::telemetry::Telemetry;
use crate::transport::amqp::AmqpTransport;
use crate::transport::embedded::EmbeddedTransport;
use crate::transport::kafka::KafkaTransport;
use crate::transport::{Topology, Transport};

/// The plugins of a pipeline, loaded and checked against it.
pub struct Plugins {
    pub engine: Arc<PluginEngine>,
    pub loaded: Vec<LoadedPlugin>,
    /// Warnings found while checking (errors make loading fail).
    pub warnings: Vec<Problem>,
}

/// Why the plugins of a pipeline cannot run, every reason at once.
#[derive(Debug)]
pub struct PluginErrors(pub Vec<String>);

impl std::fmt::Display for PluginErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        let n = self.0.len();
        write!(f, "{n} plugin error{}", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for PluginErrors {}

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
    use tracing::Instrument as _;
    let span = tracing::info_span!("load plugins", pipeline = %pipeline.name, plugins = pipeline.plugins.len());
    load_plugins_inner(pipeline).instrument(span).await
}

async fn load_plugins_inner(pipeline: &Pipeline) -> Result<Plugins> {
    let engine = Arc::new(PluginEngine::new(cache_dir(pipeline))?);
    let mut tasks = JoinSet::new();
    for (i, spec) in pipeline.plugins.iter().enumerate() {
        let engine = engine.clone();
        let spec = spec.clone();
        tasks.spawn_blocking(move || {
            let sandbox = Sandbox {
                name: spec.name.clone(),
                limits: spec.limits.clone(),
                grants: spec.grants.clone(),
            };
            (i, engine.load(&spec.wasm, sandbox))
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.context("plugin loading task failed")?);
    }
    results.sort_by_key(|(i, _)| *i);

    let mut errors = Vec::new();
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
        warnings,
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
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub mode: RunMode,
    pub telemetry: Telemetry,
    /// Bind the admin listener (`/metrics`, `/healthz`) here.
    pub admin: Option<std::net::SocketAddr>,
}

impl RunOptions {
    /// No tracing, no admin listener.
    pub fn quiet(mode: RunMode) -> Self {
        RunOptions {
            mode,
            telemetry: Telemetry::off(),
            admin: None,
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
    } = options;
    for w in &plugins.warnings {
        tracing::warn!(plugin = %w.plugin, "{}", w.message);
    }
    let transport = open(pipeline).await?;
    let _guard = transport.start_consuming().await?;
    for warning in transport.startup_warnings().await? {
        tracing::warn!("{warning}");
    }
    let batch_size = pipeline.batch_size();
    let dead_letters = crate::dlq::open(&pipeline.dead_letters, &pipeline.name)
        .await
        .with_context(|| {
            format!(
                "cannot open the {}",
                crate::dlq::describe(&pipeline.dead_letters)
            )
        })?;
    let topology = Arc::new(Topology::of(pipeline));
    let host = crate::dlq::host_name();
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_task = match admin {
        Some(addr) => match crate::admin::Admin::bind(addr, telemetry.clone()).await {
            Ok(admin) => {
                tracing::info!(
                    address = %admin.local_addr().map_or(addr.to_string(), |a| a.to_string()),
                    "Admin listener: /metrics, /healthz"
                );
                let mut stop = stop_rx.clone();
                Some(tokio::spawn(admin.serve(async move {
                    let _ = stop.changed().await;
                })))
            }
            // Metrics are not worth failing the host for.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Admin listener not started");
                None
            }
        },
        None => None,
    };
    let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut routes = JoinSet::new();
    for plugin in &plugins.loaded {
        let sub = transport.subscribe(plugin.name().as_str()).await?;
        tracing::info!(
            plugin = %plugin.name(),
            version = %plugin.info().version,
            digest = %short_digest(plugin.digest()),
            "Route started"
        );
        let Some(spec) = pipeline.plugin(plugin.name().as_str()) else {
            bail!(
                "plugin {} is not part of pipeline {}",
                plugin.name(),
                pipeline.name
            );
        };
        let ctx = dispatch::RouteContext {
            pipeline: pipeline.name.clone(),
            policy: spec.retry.clone(),
            dead_letters: dead_letters.clone(),
            topology: topology.clone(),
            source: crate::dlq::Source {
                transport: transport.kind().into(),
                location: transport.location(),
                queue: transport.queue(plugin.name().as_str()),
                consumer_group: transport.consumer_group(plugin.name().as_str()),
                partition: None,
                offset: None,
            },
            host: host.clone(),
            fail_when_plugin_cannot_start: mode == RunMode::Drain,
            telemetry: telemetry.clone(),
            broker_dead_letters: pipeline.dead_letters.broker,
        };
        if routes.is_empty() {
            dispatch::record_store_size(&ctx).await;
        }
        routes.spawn(dispatch::run_route(
            ctx,
            plugin.clone(),
            sub,
            batch_size,
            stop_rx.clone(),
            stop_flag.clone(),
        ));
    }
    tracing::info!(
        pipeline = %pipeline.name,
        transport = transport.kind(),
        location = %transport.location(),
        dead_letters = %crate::dlq::describe(&pipeline.dead_letters),
        routes = plugins.loaded.len(),
        "Host running"
    );

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
    let route_died = async {
        match routes.join_next().await {
            Some(Ok(Ok(()))) | None => std::future::pending().await,
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("a route task failed: {e}")),
        }
    };
    let outcome: Result<()> = tokio::select! {
        () = shutdown => {
            tracing::info!("Shutting down: finishing messages in flight");
            Ok(())
        }
        r = drained => {
            r?;
            tracing::info!("Drained: every queue is empty");
            Ok(())
        }
        r = route_died => r,
    };
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop_tx.send(true);
    while let Some(r) = routes.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "Route stopped with an error"),
            Err(e) => tracing::error!(error = %e, "Route task failed"),
        }
    }
    // The listener stops taking connections at once; an open scrape gets a
    // moment to finish, not the power to hold the host.
    if let Some(mut task) = admin_task
        && tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
    {
        task.abort();
    }
    outcome?;
    if mode == RunMode::Drain && !transport.is_idle().await? {
        bail!("stopped before every queue was empty");
    }
    Ok(())
}

/// `sha256:0123456789ab` — enough to tell versions apart in logs.
pub fn short_digest(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
