//! What a plugin instance may touch: WASI built from the pipeline's grants,
//! and a memory limiter that remembers why it refused to grow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use wasmtime::ResourceLimiter;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, HostWallClock, WasiCtx, WasiCtxBuilder};

use crate::config::{Grants, format_size};

/// Caps the linear memory of one store (all its memories together) and its
/// table growth.
///
/// Refusing to grow traps the guest (rather than returning -1 from
/// `memory.grow`) because most guest allocators abort on failure anyway, and
/// a trap lets the host classify the failure as memory exhaustion. The cap
/// covers the sum of every memory: a component may hold several core
/// instances, each with its own memory.
pub struct MemoryLimiter {
    max_bytes: u64,
    /// Bytes of linear memory the store holds now, across memories.
    used: u64,
    /// Set when a grow was refused, so the trap can be classified.
    pub exceeded: Option<u64>,
}

/// A plugin gets far fewer table elements than it could ever need for
/// function pointers; the cap only stops table-growth bombs.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl MemoryLimiter {
    pub fn new(max_bytes: u64) -> Self {
        MemoryLimiter {
            max_bytes,
            used: 0,
            exceeded: None,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = (desired as u64).saturating_sub(current as u64);
        let total = self.used.saturating_add(growth);
        if total > self.max_bytes {
            self.exceeded = Some(total);
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} exceeded: the plugin asked for {}",
                format_size(self.max_bytes),
                format_size(total)
            )));
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::msg(format!(
                "table limit of {MAX_TABLE_ELEMENTS} elements exceeded: the plugin asked for {desired}"
            )));
        }
        Ok(true)
    }
}

/// A wall clock stuck at the Unix epoch, for plugins without the `clock`
/// grant: time is a side channel and a source of non-determinism.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// Builds the WASI context of one instance: nothing unless granted.
pub fn wasi_ctx(grants: &Grants) -> Result<WasiCtx> {
    let mut b = WasiCtxBuilder::new();
    // Blocking host I/O (granted files) is short; doing it on the handler's
    // thread avoids a thread hop per call.
    b.allow_blocking_current_thread(true);
    for (k, v) in &grants.env {
        b.env(k, v);
    }
    for name in &grants.inherit_env {
        if let Ok(v) = std::env::var(name) {
            b.env(name, v);
        }
    }
    for dir in &grants.dirs {
        let perms = if dir.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        b.preopened_dir(&dir.host, &dir.guest, perms)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "cannot grant directory {} as {}",
                    dir.host.display(),
                    dir.guest
                )
            })?;
    }
    if !grants.clock {
        // The monotonic clock is replaced in the linker (see `clock`).
        b.wall_clock(FrozenClock);
    }
    if grants.stdio {
        b.inherit_stdout();
        b.inherit_stderr();
    }
    b.allow_udp(false);
    b.allow_ip_name_lookup(false);
    b.allow_tcp(!grants.network.is_empty());
    if !grants.network.is_empty() {
        let allowed: Arc<[SocketAddr]> = grants.network.clone().into();
        b.socket_addr_check(move |addr, usage| {
            let ok = match usage {
                SocketAddrUse::TcpConnect => allowed.contains(&addr),
                // The implicit bind before a connect uses an ephemeral port.
                SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                _ => false,
            };
            Box::pin(async move { ok })
        });
    }
    Ok(b.build())
}
