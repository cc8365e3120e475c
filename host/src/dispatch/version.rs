//! What a route runs and reports: one build of its plugin (a
//! [`Version`]), where that build came from, and the status the route
//! shares with the supervisor that hands it new versions.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::envelope::now_ms;
use crate::plugin::{Instance, LoadedPlugin};
use crate::recover::RetryPolicy;

/// Where the component a route runs came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The `.wasm` file the pipeline names.
    File,
    /// Deployed to this host (kept in its deployment store).
    Deployed { at_ms: u64 },
}

/// One build of a plugin, ready for its route.
pub struct Version {
    pub plugin: LoadedPlugin,
    pub policy: RetryPolicy,
    pub origin: Origin,
    /// An instance made while the version was prepared, so the route's
    /// first message on it does not pay for instantiation.
    warm: std::sync::Mutex<Option<Instance>>,
}

impl Version {
    /// A version whose instance is made by the route when it first needs
    /// one (at start-up, where a plugin that cannot start is retried).
    pub fn new(plugin: LoadedPlugin, policy: RetryPolicy, origin: Origin) -> Arc<Self> {
        Arc::new(Version {
            plugin,
            policy,
            origin,
            warm: std::sync::Mutex::new(None),
        })
    }

    /// A version with an instance made now: a build that cannot be
    /// instantiated is refused here rather than on the route.
    pub(crate) fn prepared(
        plugin: LoadedPlugin,
        policy: RetryPolicy,
        origin: Origin,
    ) -> Result<Arc<Self>> {
        let instance = plugin.instantiate()?;
        Ok(Arc::new(Version {
            plugin,
            policy,
            origin,
            warm: std::sync::Mutex::new(Some(instance)),
        }))
    }

    /// The instance made in advance, if it is still there.
    pub fn take_instance(&self) -> Option<Instance> {
        self.warm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// What a route is running, as the route itself reports it.
#[derive(Clone)]
pub struct Serving {
    pub version: Arc<Version>,
    /// When the route started running it.
    pub since_ms: u64,
    /// How long the route's swap to it took (none for the first version).
    pub swap_took: Option<Duration>,
    /// Swaps this route has made.
    pub swaps: u64,
}

/// Shared between a route and the host's control.
pub struct RouteStatus {
    serving: std::sync::Mutex<Serving>,
    /// Why the route's plugin cannot start, while it cannot.
    cannot_start: std::sync::Mutex<Option<String>>,
}

impl RouteStatus {
    pub fn new(version: Arc<Version>) -> Arc<Self> {
        Arc::new(RouteStatus {
            serving: std::sync::Mutex::new(Serving {
                version,
                since_ms: now_ms(),
                swap_took: None,
                swaps: 0,
            }),
            cannot_start: std::sync::Mutex::new(None),
        })
    }

    /// Why the plugin cannot start, if it cannot now.
    pub fn cannot_start(&self) -> Option<String> {
        self.cannot_start
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Called by the route after each batch: why its plugin could not
    /// start, or `None` once it ran.
    pub fn set_cannot_start(&self, why: Option<String>) {
        *self
            .cannot_start
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    pub fn serving(&self) -> Serving {
        self.serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Called by the route when it has swapped.
    pub fn swapped(&self, version: Arc<Version>, took: Duration) {
        let mut s = self
            .serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.version = version;
        s.since_ms = now_ms();
        s.swap_took = Some(took);
        s.swaps += 1;
    }
}
