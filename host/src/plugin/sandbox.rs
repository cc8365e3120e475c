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

/// What the host holds per table element (a pointer), counted against the
/// same cap as linear memory: tables are memory too, allocated by the host.
const TABLE_ELEMENT_BYTES: u64 = 8;

impl MemoryLimiter {
    pub fn new(max_bytes: u64) -> Self {
        MemoryLimiter {
            max_bytes,
            used: 0,
            exceeded: None,
        }
    }

    /// Bytes of linear memory the store's instances hold, all together.
    pub fn used(&self) -> u64 {
        self.used
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
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::msg(format!(
                "table limit of {MAX_TABLE_ELEMENTS} elements exceeded: the plugin asked for {desired}"
            )));
        }
        let growth = (desired as u64)
            .saturating_sub(current as u64)
            .saturating_mul(TABLE_ELEMENT_BYTES);
        let total = self.used.saturating_add(growth);
        if total > self.max_bytes {
            self.exceeded = Some(total);
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} exceeded: the plugin's memories and tables asked for {}",
                format_size(self.max_bytes),
                format_size(total)
            )));
        }
        self.used = total;
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

/// A wall clock that reads one fixed instant, for contract tests.
struct FixedClock(Duration);

impl HostWallClock for FixedClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        self.0
    }
}

/// How the host behaves towards one instance in a contract test, beyond
/// what the plugin's grants say.
#[derive(Clone, Debug, Default)]
pub struct Simulation {
    /// The wall clock reads this time (since the Unix epoch) and stands
    /// still, as does the monotonic clock: output that depends on the time
    /// is the same on every run.
    pub clock: Option<Duration>,
    /// Environment variables set for this instance, over the granted ones.
    pub env: Vec<(String, String)>,
    /// Every outbound connection fails, whatever the network grant says.
    pub network_down: bool,
    /// HTTP requests are answered from stubs, never sent.
    pub http: Option<Arc<super::http::HttpSimulation>>,
}

/// Builds the WASI context of one instance: nothing unless granted, then
/// what `simulation` imposes. Without the `stdio` grant, stdout and stderr
/// go to `tail`.
pub fn wasi_ctx(grants: &Grants, simulation: &Simulation, tail: &OutputTail) -> Result<WasiCtx> {
    let mut b = WasiCtxBuilder::new();
    // Blocking host I/O (granted files) is short; doing it on the handler's
    // thread avoids a thread hop per call.
    b.allow_blocking_current_thread(true);
    for (k, v) in &grants.env {
        if !simulation.env.iter().any(|(name, _)| name == k) {
            b.env(k, v);
        }
    }
    for (k, v) in &simulation.env {
        b.env(k, v);
    }
    for name in &grants.inherit_env {
        if simulation.env.iter().any(|(n, _)| n == name) {
            continue;
        }
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
    // The monotonic clock is replaced in the linker (see `clock`).
    if let Some(at) = simulation.clock {
        b.wall_clock(FixedClock(at));
    } else if !grants.clock {
        b.wall_clock(FrozenClock);
    }
    if grants.stdio {
        b.inherit_stdout();
        b.inherit_stderr();
    } else {
        b.stdout(tail.clone());
        b.stderr(tail.clone());
    }
    b.allow_udp(false);
    b.allow_ip_name_lookup(false);
    let network = if simulation.network_down {
        &[][..]
    } else {
        grants.network.as_slice()
    };
    b.allow_tcp(!network.is_empty());
    if !network.is_empty() {
        let allowed: Arc<[SocketAddr]> = network.to_vec().into();
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

/// How much of a plugin's stdout/stderr is kept per call: enough for a panic
/// message and its location.
const OUTPUT_TAIL: usize = 4096;

/// Keeps the end of what a plugin writes to stdout and stderr during one
/// call, so a failure record can show it (a Rust panic message, say). It
/// never refuses a write: a guest that panics when stderr fails must not be
/// made to fail by the capture.
#[derive(Clone, Default)]
pub struct OutputTail(Arc<std::sync::Mutex<Vec<u8>>>);

impl OutputTail {
    fn buffer(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.buffer();
        buf.extend_from_slice(bytes);
        if buf.len() > 2 * OUTPUT_TAIL {
            let cut = buf.len() - OUTPUT_TAIL;
            buf.drain(..cut);
        }
    }

    /// Forgets what the previous call wrote.
    pub fn clear(&self) {
        self.buffer().clear();
    }

    /// The end of what was written since the last `clear`, if anything.
    pub fn take(&self) -> Option<String> {
        let mut buf = self.buffer();
        if buf.is_empty() {
            return None;
        }
        let start = buf.len().saturating_sub(OUTPUT_TAIL);
        let text = String::from_utf8_lossy(&buf[start..]).into_owned();
        buf.clear();
        Some(text)
    }
}

impl wasmtime_wasi::cli::IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for OutputTail {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(TailStream(self.clone()))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(TailStream(self.clone()))
    }
}

struct TailStream(OutputTail);

#[async_trait::async_trait]
impl wasmtime_wasi::p2::OutputStream for TailStream {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.0.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::Pollable for TailStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for TailStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
