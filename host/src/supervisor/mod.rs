//! The route supervisor: it starts one route per plugin, stops them, and
//! is the one way to change a running host without stopping it: a new
//! build of a plugin, a changed pipeline file, a version deployed over the
//! admin API, a rollback.
//!
//! Every change is prepared off the message path: the component is compiled
//! (or taken from the compile cache), its `describe()` is checked against
//! the pipeline exactly as at start-up, and a warm instance is made. Only a
//! version that passes all of that is handed to its route, which takes it
//! between two batches: the batch in hand finishes on the old version, the
//! next one runs on the new. The subscription is never touched, so no
//! message is lost or handled twice by a swap. A version that fails any
//! step is refused with its reasons and the old one keeps serving.
//!
//! Changes are made one at a time (one lock), so two deploys or a deploy and
//! a file change cannot interleave.

mod deployments;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch as channel};

pub use deployments::{Deployed, Deployments};

use crate::config::{Pipeline, PluginSpec};
use crate::dispatch::{self, Origin, RouteContext, RouteStatus, RouteUpdates, Version};
use crate::dlq::DeadLetterStore;
use crate::envelope::now_ms;
use crate::plugin::contract::{self, PluginInfo};
use crate::plugin::{LoadedPlugin, PluginEngine, Sandbox};
use crate::recover::RetryPolicy;
use crate::telemetry::Telemetry;
use crate::transport::{Topology, Transport};

/// One route as `switchyard plugins list` and `GET /plugins` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub plugin: String,
    pub version: String,
    pub digest: String,
    /// `file` or `deployed`.
    pub source: String,
    /// The component's file on the host.
    pub path: String,
    /// When the route started running this version (ms since the epoch).
    pub loaded_at_ms: u64,
    pub swaps: u64,
    /// Microseconds the route's last swap took.
    pub last_swap_us: Option<u64>,
    /// A newer version handed to the route, which it takes with its next
    /// batch.
    pub pending: Option<PendingInfo>,
}

/// A version waiting for its route's next batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInfo {
    pub version: String,
    pub digest: String,
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// No such plugin in the running pipeline.
    #[error("the running pipeline has no plugin `{0}`")]
    UnknownPlugin(String),
    /// The change is wrong (it does not compile, breaks the contract,
    /// ...): nothing was changed, and these are the reasons.
    #[error("{}", .0.join("\n"))]
    Refused(Vec<String>),
    /// The host could not carry it out (a disk error, say); nothing was
    /// changed. Shown with its whole chain of causes.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// What a pipeline change did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChangeReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub swapped: Vec<String>,
    /// Routes that could not be started (the change is otherwise applied;
    /// the next change or restart tries again).
    pub failed: Vec<String>,
}

impl ChangeReport {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.swapped.is_empty()
            && self.failed.is_empty()
    }
}

/// What every route shares, besides its plugin.
pub struct RouteServices {
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub host: String,
    pub telemetry: Telemetry,
    pub fail_when_plugin_cannot_start: bool,
    pub schemas: Arc<crate::schemas::Schemas>,
    pub crash_guard: Option<Arc<crate::crash_loop::CrashGuard>>,
    pub state: Option<crate::state::Access>,
    /// Where routes' journal records go (`None`: no journal).
    pub journal: Option<crate::journal::Sink>,
}

struct Route {
    /// The newest version handed to the route.
    versions: channel::Sender<Arc<Version>>,
    status: Arc<RouteStatus>,
    stop: channel::Sender<bool>,
    stop_flag: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    /// The digest of the pipeline's file when last read, to tell when it
    /// changes under a deployed version.
    file_digest: Option<String>,
}

/// What `list` reads, kept apart from the change lock so that listing
/// never waits for a change being compiled.
#[derive(Default)]
struct View {
    routes: BTreeMap<String, (channel::Receiver<Arc<Version>>, Arc<RouteStatus>)>,
    files: Vec<PathBuf>,
}

struct State {
    pipeline: Pipeline,
    topology: channel::Sender<Arc<Topology>>,
    routes: BTreeMap<String, Route>,
    stopping: bool,
}

/// How a route ended: its name and result.
pub type RouteExit = (String, Result<()>);

/// The running host's routes, and the one way to change them.
pub struct Supervisor {
    engine: Arc<PluginEngine>,
    transport: Arc<dyn Transport>,
    base: RouteServices,
    deployments: Deployments,
    state: tokio::sync::Mutex<State>,
    view: std::sync::RwLock<View>,
    /// The routing now, read without waiting for a change in progress.
    routing: channel::Receiver<Arc<Topology>>,
    exits: mpsc::UnboundedSender<RouteExit>,
    /// The pipeline file deployed to the fleet is in force: edits of the
    /// host's own file are not applied.
    fleet_file: AtomicBool,
}

impl Supervisor {
    /// Starts one route per plugin. Route ends are reported on the returned
    /// receiver.
    pub async fn start(
        engine: Arc<PluginEngine>,
        transport: Arc<dyn Transport>,
        pipeline: Pipeline,
        versions: Vec<Arc<Version>>,
        base: RouteServices,
    ) -> Result<(Arc<Supervisor>, mpsc::UnboundedReceiver<RouteExit>)> {
        let (exits, exits_rx) = mpsc::unbounded_channel();
        let deployments = Deployments::new(&pipeline.state_dir, &pipeline.name);
        let (topology, routing) = channel::channel(Arc::new(Topology::of(&pipeline)));
        let control = Arc::new(Supervisor {
            engine,
            transport,
            base,
            deployments,
            state: tokio::sync::Mutex::new(State {
                pipeline,
                topology,
                routes: BTreeMap::new(),
                stopping: false,
            }),
            view: std::sync::RwLock::new(View::default()),
            routing,
            exits,
            fleet_file: AtomicBool::new(false),
        });
        {
            let mut state = control.state.lock().await;
            for version in versions {
                // A version loaded from the pipeline's file has that file's
                // digest; a deployed one says nothing about the file.
                let file_digest = match version.origin {
                    Origin::File => Some(version.plugin.digest().to_owned()),
                    Origin::Deployed { .. } => file_digest(
                        state
                            .pipeline
                            .plugin(version.plugin.name().as_str())
                            .map(|s| s.wasm.as_path()),
                    ),
                };
                control
                    .spawn_route(&mut state, version, file_digest)
                    .await?;
            }
            control.publish_view(&state);
        }
        Ok((control, exits_rx))
    }

    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    /// Who takes each message type now, and as what kind. Does not wait
    /// for a change in progress.
    pub fn topology(&self) -> Arc<Topology> {
        self.routing.borrow().clone()
    }

    /// The transport the routes take messages from (replays go to it).
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// What every route shares: the dead-letter store, schemas, telemetry.
    pub fn services(&self) -> &RouteServices {
        &self.base
    }

    /// The pipeline as it runs now.
    pub async fn pipeline(&self) -> Pipeline {
        self.state.lock().await.pipeline.clone()
    }

    async fn spawn_route(
        &self,
        state: &mut State,
        version: Arc<Version>,
        file_digest: Option<String>,
    ) -> Result<()> {
        let name = version.plugin.name().to_string();
        let subscription = self.transport.subscribe(&name).await?;
        let ctx = RouteContext {
            pipeline: state.pipeline.name.clone(),
            policy: version.policy.clone(),
            dead_letters: self.base.dead_letters.clone(),
            topology: state.topology.borrow().clone(),
            source: crate::dlq::Source {
                transport: self.transport.kind().into(),
                location: self.transport.location(),
                queue: self.transport.queue(&name),
                consumer_group: self.transport.consumer_group(&name),
                partition: None,
                offset: None,
            },
            host: self.base.host.clone(),
            fail_when_plugin_cannot_start: self.base.fail_when_plugin_cannot_start,
            telemetry: self.base.telemetry.clone(),
            broker_dead_letters: state.pipeline.dead_letters.broker,
            schemas: self.base.schemas.clone(),
            max_message_size: state.pipeline.max_message_size,
            crash_guard: self.base.crash_guard.clone(),
            state: self.base.state.clone(),
            exactly_once: self.base.state.as_ref().is_some_and(|a| a.store.is_some())
                && state
                    .pipeline
                    .plugins
                    .iter()
                    .any(|p| p.name.as_str() == name && p.is_exactly_once()),
            saga: state
                .pipeline
                .plugins
                .iter()
                .find(|p| p.name.as_str() == name)
                .and_then(|p| p.saga.clone()),
            journal: self.base.journal.clone(),
        };
        if state.routes.is_empty() {
            dispatch::record_store_size(&ctx).await;
        }
        dispatch::record_saga_count(&ctx, &name).await;
        tracing::info!(
            plugin = %name,
            version = %version.plugin.info().version,
            digest = %crate::plugin::short_digest(version.plugin.digest()),
            source = origin_name(version.origin),
            "Route started"
        );
        let (versions, versions_rx) = channel::channel(version.clone());
        let status = RouteStatus::new(version);
        let (stop, stop_rx) = channel::channel(false);
        let stop_flag = Arc::new(AtomicBool::new(false));
        let route_updates = RouteUpdates {
            versions: versions_rx,
            topology: state.topology.subscribe(),
            status: status.clone(),
        };
        let exits = self.exits.clone();
        let batch_size = state.pipeline.batch_size();
        let flag = stop_flag.clone();
        let route_name = name.clone();
        let task = tokio::spawn(async move {
            use futures_util::FutureExt as _;
            let run =
                dispatch::run_route(ctx, route_updates, subscription, batch_size, stop_rx, flag);
            let result = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the route's task panicked")));
            let _ = exits.send((route_name, result));
        });
        state.routes.insert(
            name,
            Route {
                versions,
                status,
                stop,
                stop_flag,
                task,
                file_digest,
            },
        );
        Ok(())
    }

    /// Makes the routes and files of `state` what `list` and the watcher
    /// see.
    fn publish_view(&self, state: &State) {
        let mut files = vec![state.pipeline.source.clone()];
        files.extend(state.pipeline.plugins.iter().map(|p| p.wasm.clone()));
        let routes = state
            .routes
            .iter()
            .map(|(n, r)| (n.clone(), (r.versions.subscribe(), r.status.clone())))
            .collect();
        *self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = View { routes, files };
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What every route runs. Does not wait for a change in progress.
    pub async fn list(&self) -> Vec<RouteInfo> {
        self.view()
            .routes
            .iter()
            .map(|(name, (versions, status))| route_info(name, versions, status))
            .collect()
    }

    /// The routes whose plugin cannot start now, and why. Does not wait
    /// for a change in progress.
    pub fn routes_that_cannot_start(&self) -> Vec<(String, String)> {
        self.view()
            .routes
            .iter()
            .filter_map(|(name, (_, status))| status.cannot_start().map(|why| (name.clone(), why)))
            .collect()
    }

    /// Refuses changes from now on: the host is stopping. The routes go on
    /// until [`Supervisor::shutdown`].
    pub async fn begin_stop(&self) {
        self.state.lock().await.stopping = true;
    }

    /// What each route's running plugin declared in `describe()`: the
    /// types it handles, publishes and sends.
    pub fn contracts(&self) -> Vec<(String, crate::plugin::PluginInfo)> {
        self.view()
            .routes
            .iter()
            .map(|(name, (_, status))| {
                (name.clone(), status.serving().version.plugin.info().clone())
            })
            .collect()
    }

    /// Stops every route, letting each finish and settle the batch in hand.
    pub async fn shutdown(&self) {
        let tasks: Vec<_> = {
            let mut state = self.state.lock().await;
            state.stopping = true;
            let routes = std::mem::take(&mut state.routes);
            self.publish_view(&state);
            routes
                .into_values()
                .map(|r| {
                    r.stop_flag.store(true, Ordering::Relaxed);
                    let _ = r.stop.send(true);
                    r.task
                })
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Says whether the pipeline file deployed to the fleet is in force,
    /// which the host's own file then gives way to.
    pub fn set_fleet_file_in_force(&self, in_force: bool) {
        let was = self.fleet_file.swap(in_force, Ordering::Relaxed);
        if in_force && !was {
            tracing::info!(
                "The pipeline file deployed to the fleet is in force: edits of this host's own file are not applied while it is (deploy them with `switchyard deploy -p`)"
            );
        }
    }

    /// Reads the pipeline file again and applies what changed in it or in
    /// the plugin files it names; nothing while the fleet's file is in
    /// force.
    pub async fn reload_from_disk(&self) -> Result<ChangeReport, ChangeError> {
        if self.fleet_file.load(Ordering::Relaxed) {
            tracing::debug!(
                "A watched file changed; the fleet's pipeline file is in force, so nothing is applied"
            );
            return Ok(ChangeReport::default());
        }
        let source = self.state.lock().await.pipeline.source.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(&source))
            .await
            .map_err(|e| ChangeError::Failed(e.into()))?;
        match loaded {
            Ok(loaded) => self.apply_pipeline(loaded.pipeline).await,
            Err(e) => {
                let reasons = vec![e.to_string()];
                tracing::error!(
                    "The changed pipeline file is not valid; the host keeps running the previous one:\n{}",
                    reasons.join("\n")
                );
                Err(ChangeError::Refused(reasons))
            }
        }
    }

    /// Brings the running host to `new`: routes added, removed, and given
    /// new versions, all checked before any is applied. A change the
    /// running host cannot make (its transport, say) refuses the whole
    /// change.
    pub async fn apply_pipeline(&self, new: Pipeline) -> Result<ChangeReport, ChangeError> {
        let result = self.apply_pipeline_inner(new).await;
        match &result {
            Ok(report) if report.is_empty() => {}
            Ok(report) => tracing::info!(
                added = ?report.added,
                removed = ?report.removed,
                swapped = ?report.swapped,
                failed = ?report.failed,
                "Pipeline change applied"
            ),
            Err(e) => {
                tracing::error!("Pipeline change refused; the host keeps running as it was:\n{e}")
            }
        }
        result
    }

    async fn apply_pipeline_inner(&self, new: Pipeline) -> Result<ChangeReport, ChangeError> {
        let mut state = self.state.lock().await;
        if state.stopping {
            return Err(ChangeError::Refused(vec!["the host is stopping".into()]));
        }
        self.needs_no_restart(&state, &new)?;
        let fresh = self.load_changed(&state, &new).await?;
        let prepared = prepare_all(fresh, &new).await?;
        self.switch_to(&mut state, new, prepared).await
    }

    /// Refuses a change only a restart can make: the transport, the
    /// dead-letter store, or a broker's retry layout.
    fn needs_no_restart(&self, state: &State, new: &Pipeline) -> Result<(), ChangeError> {
        let mut reasons = restart_needed(&state.pipeline, new, self.transport.kind());
        // The host opens its state store (on a broker) only for plugins
        // that need it at start-up.
        if reasons.is_empty() && self.base.state.is_none() {
            let needs: Vec<String> = new
                .plugins
                .iter()
                .filter(|p| p.is_exactly_once())
                .map(|p| format!("`{}`", p.name))
                .collect();
            if !needs.is_empty() {
                reasons.push(format!(
                    "{} would be exactly-once, and this host opened no state store when it started; restart it (nothing was applied)",
                    needs.join(", ")
                ));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(ChangeError::Refused(reasons))
        }
    }

    /// Loads the plugins of `new` whose spec or component changed (what did
    /// not change is kept), and checks the new pipeline whole, with the
    /// versions it would run.
    async fn load_changed(&self, state: &State, new: &Pipeline) -> Result<Fresh, ChangeError> {
        let mut errors = Vec::new();
        let mut fresh = Fresh::new();
        for spec in &new.plugins {
            let name = spec.name.as_str();
            let deployed = match self.deployments.current(name) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(format!("plugin `{name}`: {e:#}"));
                    continue;
                }
            };
            let file_now = file_digest(Some(&spec.wasm));
            let (path, origin) = match &deployed {
                Some((d, path)) => (
                    path.clone(),
                    Origin::Deployed {
                        at_ms: d.deployed_at_ms,
                    },
                ),
                None => (spec.wasm.clone(), Origin::File),
            };
            if let Some(route) = state.routes.get(name) {
                let assigned = route.versions.borrow().clone();
                let want = match &deployed {
                    Some((d, _)) => Some(d.digest.clone()),
                    None => file_now.clone(),
                };
                if deployed.is_some() && file_now != route.file_digest {
                    tracing::warn!(
                        plugin = name,
                        file = %spec.wasm.display(),
                        "The plugin's file changed, but the plugin runs a deployed version; `switchyard plugins rollback` returns to the file"
                    );
                }
                if state.pipeline.plugin(name) == Some(spec)
                    && want.as_deref() == Some(assigned.plugin.digest())
                {
                    continue;
                }
            }
            match self.load(spec, &path).await {
                Ok(plugin) => {
                    fresh.insert(name.to_owned(), (plugin, origin, file_now));
                }
                Err(e) => errors.push(e),
            }
        }
        let kept: BTreeMap<&str, Arc<Version>> = state
            .routes
            .iter()
            .map(|(n, r)| (n.as_str(), r.versions.borrow().clone()))
            .collect();
        let mut pairs: Vec<(&PluginSpec, &PluginInfo)> = Vec::new();
        for spec in &new.plugins {
            let name = spec.name.as_str();
            if let Some((p, _, _)) = fresh.get(name) {
                pairs.push((spec, p.info()));
            } else if let Some(v) = kept.get(name) {
                pairs.push((spec, v.plugin.info()));
            }
        }
        if errors.is_empty() {
            errors.extend(contract_errors(new, &pairs));
        }
        drop(pairs);
        if !errors.is_empty() {
            return Err(ChangeError::Refused(errors));
        }
        Ok(fresh)
    }

    /// Applies a change that passed every check: routing first (the only
    /// step that can still refuse), then routes removed, given their new
    /// versions, and added.
    async fn switch_to(
        &self,
        state: &mut State,
        new: Pipeline,
        prepared: Prepared,
    ) -> Result<ChangeReport, ChangeError> {
        let topology = Topology::of(&new);
        if **state.topology.borrow() != topology {
            self.transport
                .set_routing(&new)
                .await
                .map_err(|e| ChangeError::Refused(vec![format!("{e:#}")]))?;
            state.topology.send_replace(Arc::new(topology));
        }
        let mut report = ChangeReport::default();
        let removed: Vec<String> = state
            .routes
            .keys()
            .filter(|n| new.plugin(n).is_none())
            .cloned()
            .collect();
        for name in removed {
            if let Some(route) = state.routes.remove(&name) {
                route.stop_flag.store(true, Ordering::Relaxed);
                let _ = route.stop.send(true);
                let plugin = name.clone();
                tokio::spawn(async move {
                    let _ = route.task.await;
                    tracing::info!(plugin = %plugin, "Route stopped: the plugin left the pipeline");
                });
                report.removed.push(name);
            }
        }
        state.pipeline = new;
        self.publish_view(state);
        for (name, (version, file_now)) in prepared {
            if let Some(route) = state.routes.get_mut(&name) {
                log_handover(&version);
                route.versions.send_replace(version);
                route.file_digest = file_now;
                report.swapped.push(name);
            } else {
                match self.spawn_route(state, version, file_now).await {
                    Ok(()) => report.added.push(name),
                    Err(e) => {
                        tracing::error!(plugin = %name, error = %format!("{e:#}"), "Cannot start the new route");
                        report.failed.push(name);
                    }
                }
            }
        }
        self.publish_view(state);
        Ok(report)
    }

    /// Makes `bytes` the running version of plugin `name`, and keeps it
    /// (deployed versions survive restarts).
    pub async fn deploy(&self, name: &str, bytes: Vec<u8>) -> Result<RouteInfo, ChangeError> {
        let result = self.deploy_inner(name, bytes).await;
        log_change("Deploy", name, &result);
        result
    }

    async fn deploy_inner(&self, name: &str, bytes: Vec<u8>) -> Result<RouteInfo, ChangeError> {
        let state = self.state.lock().await;
        if state.stopping {
            return Err(ChangeError::Refused(vec!["the host is stopping".into()]));
        }
        let spec = spec_of(&state, name)?;
        let digest = crate::plugin::digest_of(&bytes);
        let path = self.deployments.wasm_path(name, &digest);
        let bytes = Arc::new(bytes);
        let plugin = {
            let engine = self.engine.clone();
            let (path, bytes, sandbox) = (path.clone(), bytes.clone(), sandbox_of(&spec));
            tokio::task::spawn_blocking(move || engine.load_bytes(&path, &bytes, sandbox))
                .await
                .map_err(|e| ChangeError::Failed(e.into()))?
                .map_err(|e| ChangeError::Refused(vec![format!("plugin `{name}`: {e}")]))?
        };
        let at_ms = now_ms();
        let version = self
            .check_and_prepare(&state, &spec, plugin, Origin::Deployed { at_ms })
            .await?;
        let entry = Deployed {
            digest,
            version: version.plugin.info().version.clone(),
            deployed_at_ms: at_ms,
            size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
        };
        self.in_store(name, move |store, plugin| store.push(plugin, &bytes, entry))
            .await?;
        Ok(self.hand_over(&state, name, version))
    }

    /// Returns plugin `name` to the version it ran before its last
    /// deployment (an earlier deployment, or the pipeline's file).
    pub async fn rollback(&self, name: &str) -> Result<RouteInfo, ChangeError> {
        let result = self.rollback_inner(name).await;
        log_change("Rollback", name, &result);
        result
    }

    async fn rollback_inner(&self, name: &str) -> Result<RouteInfo, ChangeError> {
        let state = self.state.lock().await;
        if state.stopping {
            return Err(ChangeError::Refused(vec!["the host is stopping".into()]));
        }
        let spec = spec_of(&state, name)?;
        let history = self
            .deployments
            .history(name)
            .map_err(ChangeError::Failed)?;
        if history.is_empty() {
            return Err(ChangeError::Refused(vec![format!(
                "plugin `{name}` runs {} from its pipeline file; no deployment to roll back",
                spec.wasm.display()
            )]));
        }
        let (path, source) = match history.len().checked_sub(2).and_then(|i| history.get(i)) {
            Some(previous) => (
                self.deployments.wasm_path(name, &previous.digest),
                Origin::Deployed {
                    at_ms: previous.deployed_at_ms,
                },
            ),
            None => (spec.wasm.clone(), Origin::File),
        };
        let plugin = self
            .load(&spec, &path)
            .await
            .map_err(|e| ChangeError::Refused(vec![format!("cannot roll back: {e}")]))?;
        let version = self
            .check_and_prepare(&state, &spec, plugin, source)
            .await?;
        self.in_store(name, |store, plugin| store.pop(plugin))
            .await?;
        Ok(self.hand_over(&state, name, version))
    }

    /// Runs a deployment-store operation for plugin `name` off the async
    /// runtime (it writes and syncs files).
    async fn in_store<T: Send + 'static>(
        &self,
        name: &str,
        op: impl FnOnce(&Deployments, &str) -> Result<T> + Send + 'static,
    ) -> Result<T, ChangeError> {
        let store = self.deployments.clone();
        let plugin = name.to_owned();
        tokio::task::spawn_blocking(move || op(&store, &plugin))
            .await
            .map_err(|e| ChangeError::Failed(e.into()))?
            .map_err(ChangeError::Failed)
    }

    /// Compiles and links one plugin file with its pipeline entry's sandbox.
    async fn load(&self, spec: &PluginSpec, path: &Path) -> Result<LoadedPlugin, String> {
        let engine = self.engine.clone();
        let (path, sandbox) = (path.to_owned(), sandbox_of(spec));
        let name = spec.name.clone();
        match tokio::task::spawn_blocking(move || engine.load(&path, sandbox)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(format!("plugin `{name}`: {e}")),
            Err(e) => Err(format!("plugin `{name}`: loading failed: {e}")),
        }
    }

    /// Checks a new build of one plugin against the running pipeline and
    /// makes its instance.
    async fn check_and_prepare(
        &self,
        state: &State,
        spec: &PluginSpec,
        plugin: LoadedPlugin,
        origin: Origin,
    ) -> Result<Arc<Version>, ChangeError> {
        let others: Vec<(String, Arc<Version>)> = state
            .routes
            .iter()
            .filter(|(n, _)| n.as_str() != spec.name.as_str())
            .map(|(n, r)| (n.clone(), r.versions.borrow().clone()))
            .collect();
        let mut pairs: Vec<(&PluginSpec, &PluginInfo)> = vec![(spec, plugin.info())];
        for (n, v) in &others {
            if let Some(s) = state.pipeline.plugin(n) {
                pairs.push((s, v.plugin.info()));
            }
        }
        let errors = contract_errors(&state.pipeline, &pairs);
        drop(pairs);
        if !errors.is_empty() {
            return Err(ChangeError::Refused(errors));
        }
        prepare(plugin, spec.retry.clone(), origin)
            .await
            .map_err(|e| ChangeError::Refused(vec![e]))
    }

    fn hand_over(&self, state: &State, name: &str, version: Arc<Version>) -> RouteInfo {
        log_handover(&version);
        match state.routes.get(name) {
            Some(route) => {
                route.versions.send_replace(version);
                route_info(name, &route.versions.subscribe(), &route.status)
            }
            // The pipeline has the plugin but its route did not start; it
            // runs the new version when it does.
            None => RouteInfo {
                plugin: name.to_owned(),
                version: version.plugin.info().version.clone(),
                digest: version.plugin.digest().to_owned(),
                source: origin_name(version.origin).into(),
                path: version.plugin.path().display().to_string(),
                loaded_at_ms: 0,
                swaps: 0,
                last_swap_us: None,
                pending: None,
            },
        }
    }

    /// The files a watcher looks at: the pipeline and its plugins.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        self.view().files.clone()
    }
}

/// The running pipeline's entry for plugin `name`.
fn spec_of(state: &State, name: &str) -> Result<PluginSpec, ChangeError> {
    state
        .pipeline
        .plugin(name)
        .cloned()
        .ok_or_else(|| ChangeError::UnknownPlugin(name.to_owned()))
}

fn log_handover(version: &Version) {
    tracing::info!(
        plugin = %version.plugin.name(),
        version = %version.plugin.info().version,
        digest = %crate::plugin::short_digest(version.plugin.digest()),
        source = origin_name(version.origin),
        "New plugin version checked; the route takes it between two batches"
    );
}

fn log_change(what: &str, plugin: &str, result: &Result<RouteInfo, ChangeError>) {
    if let Err(e) = result {
        tracing::error!(
            plugin,
            "{what} refused; the running version keeps serving:\n{e}"
        );
    }
}

fn origin_name(origin: Origin) -> &'static str {
    match origin {
        Origin::File => "file",
        Origin::Deployed { .. } => "deployed",
    }
}

fn route_info(
    name: &str,
    versions: &channel::Receiver<Arc<Version>>,
    status: &RouteStatus,
) -> RouteInfo {
    let serving = status.serving();
    let assigned = versions.borrow().clone();
    let v = &serving.version;
    let pending = (!Arc::ptr_eq(&assigned, v)).then(|| PendingInfo {
        version: assigned.plugin.info().version.clone(),
        digest: assigned.plugin.digest().to_owned(),
    });
    RouteInfo {
        plugin: name.to_owned(),
        version: v.plugin.info().version.clone(),
        digest: v.plugin.digest().to_owned(),
        source: origin_name(v.origin).into(),
        path: v.plugin.path().display().to_string(),
        loaded_at_ms: serving.since_ms,
        swaps: serving.swaps,
        last_swap_us: serving
            .swap_took
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        pending,
    }
}

/// The sandbox a plugin entry of a pipeline gives its component.
pub fn sandbox_of(spec: &PluginSpec) -> Sandbox {
    Sandbox {
        name: spec.name.clone(),
        limits: spec.limits.clone(),
        grants: spec.grants.clone(),
    }
}

/// Plugins loaded for a change: component, origin, digest of the
/// pipeline's file for it.
type Fresh = BTreeMap<String, (LoadedPlugin, Origin, Option<String>)>;

/// Versions ready to be handed to their routes, with their files' digests.
type Prepared = BTreeMap<String, (Arc<Version>, Option<String>)>;

/// Instantiates the versions of a change off the message path.
async fn prepare_all(fresh: Fresh, new: &Pipeline) -> Result<Prepared, ChangeError> {
    let mut errors = Vec::new();
    let mut prepared = Prepared::new();
    for (name, (plugin, origin, file_now)) in fresh {
        let Some(spec) = new.plugin(&name) else {
            continue;
        };
        match prepare(plugin, spec.retry.clone(), origin).await {
            Ok(v) => {
                prepared.insert(name, (v, file_now));
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(ChangeError::Refused(errors));
    }
    Ok(prepared)
}

/// Instantiates a new version off the message path.
async fn prepare(
    plugin: LoadedPlugin,
    policy: RetryPolicy,
    origin: Origin,
) -> Result<Arc<Version>, String> {
    let name = plugin.name().clone();
    match tokio::task::spawn_blocking(move || Version::prepared(plugin, policy, origin)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("plugin `{name}`: {e:#}")),
        Err(e) => Err(format!("plugin `{name}`: instantiation failed: {e}")),
    }
}

/// The contract errors of a pipeline run with these plugin versions.
fn contract_errors(pipeline: &Pipeline, pairs: &[(&PluginSpec, &PluginInfo)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (spec, info) in pairs {
        problems.extend(contract::check_plugin(spec, info));
    }
    problems.extend(contract::check_pipeline(pipeline, pairs));
    problems
        .into_iter()
        .filter(|p| p.error)
        .map(|p| p.to_string())
        .collect()
}

/// Why a host running `old` on a transport of kind `transport` cannot
/// become `new` without a restart; empty when it can.
pub fn restart_needed(old: &Pipeline, new: &Pipeline, transport: &str) -> Vec<String> {
    let mut reasons = Vec::new();
    let fixed = fixed_changes(old, new);
    if !fixed.is_empty() {
        reasons.push(format!(
            "{} changed: a running host cannot apply {}; restart it (nothing was applied)",
            fixed.join(", "),
            if fixed.len() == 1 { "that" } else { "those" }
        ));
    }

    // A route reads whether its plugin is a saga or exactly-once when it
    // starts.
    let remade: Vec<String> = new
        .plugins
        .iter()
        .filter(|p| {
            old.plugin(p.name.as_str()).is_some_and(|was| {
                was.saga != p.saga || was.is_exactly_once() != p.is_exactly_once()
            })
        })
        .map(|p| format!("`{}`", p.name))
        .collect();
    if !remade.is_empty() {
        reasons.push(format!(
            "the saga or exactly_once settings of {} changed: a running host applies them only when it starts; restart it (nothing was applied)",
            remade.join(", ")
        ));
    }

    // A broker's retry queues and topics are laid out per route when it is
    // subscribed; a changed number of delayed retries needs them laid out
    // again.
    if transport != "embedded" {
        let relaid: Vec<String> = new
            .plugins
            .iter()
            .filter(|p| {
                old.plugin(p.name.as_str())
                    .is_some_and(|was| was.retry.delayed != p.retry.delayed)
            })
            .map(|p| format!("`{}`", p.name))
            .collect();
        if !relaid.is_empty() {
            reasons.push(format!(
                "the delayed retries of {} changed: on the {transport} transport that changes its retry queues; restart the host to apply it (nothing was applied)",
                relaid.join(", "),
            ));
        }
    }
    reasons
}

/// The sections of a pipeline a running host cannot change.
fn fixed_changes(old: &Pipeline, new: &Pipeline) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.name != new.name {
        changed.push("[pipeline] name");
    }
    if old.transport != new.transport {
        changed.push("[transport]");
    }
    if old.dead_letters != new.dead_letters {
        changed.push("[dead_letters]");
    }
    if old.journal != new.journal {
        changed.push("[journal]");
    }
    if old.telemetry != new.telemetry {
        changed.push("[telemetry]");
    }
    if old.schemas != new.schemas {
        changed.push("[schemas]");
    }
    if old.admin != new.admin || old.admin_token_env != new.admin_token_env {
        changed.push("[admin]");
    }
    if old.ingress != new.ingress {
        changed.push("[ingress]");
    }
    if old.state != new.state {
        changed.push("[state]");
    }
    if old.fleet != new.fleet {
        changed.push("[fleet]");
    }
    if old.cache_dir != new.cache_dir
        || old.state_dir != new.state_dir
        || old.watch != new.watch
        || old.watch_interval != new.watch_interval
        || old.max_message_size != new.max_message_size
        || old.crash_loop_limit != new.crash_loop_limit
    {
        changed.push("[host]");
    }
    changed
}

/// `sha256:<hex>` of a file, if it can be read.
fn file_digest(path: Option<&Path>) -> Option<String> {
    std::fs::read(path?)
        .ok()
        .map(|b| crate::plugin::digest_of(&b))
}
