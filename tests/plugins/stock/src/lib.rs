//! Reserves stock for `Reserve` commands.
//!
//! Version 1.0.0 has a bug: it keeps per-unit slots in a fixed table of ten,
//! so a quantity above ten indexes past the end and panics (a trap). Built
//! with the `fixed` feature it is version 1.1.0 and handles any quantity.
//! The pair lets tests dead-letter messages, load the fix, and replay them.

use serde::Deserialize;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

#[derive(Deserialize)]
struct Reserve {
    sku: String,
    quantity: usize,
}

#[cfg(not(feature = "fixed"))]
const VERSION: &str = "1.0.0";
#[cfg(feature = "fixed")]
const VERSION: &str = "1.1.0";

pub struct Stock;

#[cfg(not(feature = "fixed"))]
// The index is the bug this plugin exists to have.
#[allow(clippy::needless_range_loop)]
fn reserve(quantity: usize) -> usize {
    let mut slots = [0u8; 10];
    for unit in 0..std::hint::black_box(quantity) {
        slots[unit] = 1;
    }
    slots.iter().filter(|s| **s == 1).count()
}

#[cfg(feature = "fixed")]
fn reserve(quantity: usize) -> usize {
    quantity
}

impl Plugin for Stock {
    fn describe() -> PluginInfo {
        PluginInfo::new("stock", VERSION).handles_command("Reserve")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        let r: Reserve = msg.json()?;
        let reserved = reserve(r.quantity);
        ctx.info(&format!("reserved {reserved} of {}", r.sku));
        Ok(())
    }
}

switchyard_sdk::export_plugin!(Stock);
