//! `wasi:clocks/monotonic-clock`, replaced so that no wait outlives the
//! current call's CPU deadline.
//!
//! Epoch interruption only fires while wasm code runs. A plugin that blocks
//! in `poll` on a long `subscribe-duration` (a `sleep`) would otherwise hold
//! its route, and the host's shutdown, for as long as it asked. Here every
//! sleep ends at the deadline at the latest; when the guest resumes, the
//! epoch check stops it as a timeout. Without the `clock` grant, `now`
//! reads zero.

use std::sync::OnceLock;

use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

/// Marker for the linker: the clock's data is a [`ClockView`].
pub struct CappedClock;

impl HasData for CappedClock {
    type Data<'a> = ClockView<'a>;
}

/// What the clock needs from the store.
pub struct ClockView<'a> {
    pub table: &'a mut ResourceTable,
    /// `false` without the `clock` grant: `now` reads zero.
    pub real: bool,
    /// End of the current call's CPU budget.
    pub deadline: Option<tokio::time::Instant>,
}

/// Monotonic time is nanoseconds since the host started.
fn elapsed_nanos() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl ClockView<'_> {
    fn now(&self) -> u64 {
        if self.real { elapsed_nanos() } else { 0 }
    }

    fn sleep(&mut self, nanos: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let now = tokio::time::Instant::now();
        let wanted = now.checked_add(std::time::Duration::from_nanos(nanos));
        let until = match (wanted, self.deadline) {
            (Some(w), Some(d)) => Some(w.min(d)),
            (None, Some(d)) => Some(d),
            (w, None) => w,
        };
        let sleep = self.table.push(Sleep {
            until,
            immediate: nanos == 0,
            yielded: false,
        })?;
        subscribe(self.table, sleep)
    }
}

impl monotonic_clock::Host for ClockView<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(ClockView::now(self))
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(if self.real { 1 } else { 1_000_000_000 })
    }

    fn subscribe_instant(
        &mut self,
        when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        let nanos = when.saturating_sub(ClockView::now(self));
        self.sleep(nanos)
    }

    fn subscribe_duration(
        &mut self,
        duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.sleep(duration)
    }
}

/// A wait that ends at `until` (or, with no deadline known and an
/// unrepresentable time, never).
struct Sleep {
    until: Option<tokio::time::Instant>,
    /// A zero-length wait: yield once so other pollables get a chance.
    immediate: bool,
    yielded: bool,
}

#[async_trait::async_trait]
impl Pollable for Sleep {
    async fn ready(&mut self) {
        if self.immediate {
            if !self.yielded {
                self.yielded = true;
                tokio::task::yield_now().await;
            }
            return;
        }
        match self.until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}
