//! Appends the id of every `Tick` and `Published` event it handles to
//! `/out/tally.log`, so a test can count which messages were handled and how
//! often. Needs the pipeline to grant a writable directory at `/out`.
//!
//! The `v2` build (feature `v2`, version 2.0.0) tags its lines with ` v2`, so
//! a hot-swap test can see which version handled each message. When the
//! pipeline grants the clock, each line also ends with ` t=<µs since the
//! epoch>`, the moment it was handled.
//!
//! Two broken builds for the hot-swap tests: `trap-on-start` traps while
//! the component starts (a static constructor that aborts), and `ballast`
//! asks for 96 MiB of linear memory from the start, more than a plugin may
//! have by default, so it cannot be instantiated.
//!
//! The `fails` build (version 3.0.0) loads and starts like the others and
//! fails every message for good (`bad-release`): a bad release, for the
//! fleet's canary tests.

// The constructor needs a link section, an unsafe attribute.
#![cfg_attr(feature = "trap-on-start", allow(unsafe_code))]

use std::io::Write;

use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

pub struct Tally;

#[cfg(feature = "trap-on-start")]
#[used]
#[unsafe(link_section = ".init_array")]
static TRAP_ON_START: extern "C" fn() = trap_on_start;

#[cfg(feature = "trap-on-start")]
extern "C" fn trap_on_start() {
    std::process::abort();
}

const VERSION: &str = if cfg!(feature = "v2") {
    "2.0.0"
} else if cfg!(feature = "fails") {
    "3.0.0"
} else {
    env!("CARGO_PKG_VERSION")
};

#[cfg(feature = "ballast")]
static BALLAST: std::sync::Mutex<[u8; 96 << 20]> = std::sync::Mutex::new([0; 96 << 20]);

impl Plugin for Tally {
    fn describe() -> PluginInfo {
        #[cfg(feature = "ballast")]
        std::hint::black_box(&BALLAST);
        PluginInfo::new("tally", VERSION)
            .consumes_event("Tick")
            .consumes_event("Published")
    }

    fn handle(_ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        if cfg!(feature = "fails") {
            return Err(HandlerError::permanent("this release fails every message")
                .with_code("bad-release"));
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/out/tally.log")
            .map_err(|e| HandlerError::transient(format!("cannot open /out/tally.log: {e}")))?;
        // One write per line: with O_APPEND a killed host never leaves half
        // a line behind.
        let mut line = msg.id;
        if cfg!(feature = "v2") {
            line.push_str(" v2");
        }
        // A clock the pipeline does not grant reads as the epoch.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if !now.is_zero() {
            line.push_str(&format!(" t={}", now.as_micros()));
        }
        line.push('\n');
        file.write_all(line.as_bytes())
            .map_err(|e| HandlerError::transient(format!("cannot append to /out/tally.log: {e}")))
    }
}

switchyard_sdk::export_plugin!(Tally);
