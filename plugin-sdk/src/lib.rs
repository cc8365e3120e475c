//! Write [Switchyard] message handlers in Rust.
//!
//! A plugin is a type implementing [`Plugin`]: `describe` says which message
//! types it handles (each a command or an event) and which it may publish or
//! send; `handle` processes one message and emits outputs through the
//! [`Context`]. [`export_plugin!`] turns the type into a WebAssembly component
//! when built for `wasm32-wasip2`, and [`testing::TestHost`] runs the same
//! handler natively under plain `cargo test`, with the host's contract checks.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};
//!
//! #[derive(Deserialize)]
//! struct PlaceOrder { order_id: String }
//! #[derive(Serialize)]
//! struct OrderPlaced { order_id: String }
//!
//! pub struct Orders;
//!
//! impl Plugin for Orders {
//!     fn describe() -> PluginInfo {
//!         PluginInfo::new("orders", "1.0.0")
//!             .handles_command("PlaceOrder")
//!             .publishes("OrderPlaced")
//!     }
//!
//!     fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
//!         let cmd: PlaceOrder = msg.json()?;
//!         ctx.publish("OrderPlaced", &OrderPlaced { order_id: cmd.order_id })
//!     }
//! }
//!
//! switchyard_sdk::export_plugin!(Orders);
//!
//! # fn main() {
//! let outcome = switchyard_sdk::testing::TestHost::<Orders>::new()
//!     .handle(Message::command("PlaceOrder").with_json(&serde_json::json!({"order_id": "A-1"})));
//! outcome.assert_ok();
//! assert_eq!(outcome.published[0].message_type, "OrderPlaced");
//! # }
//! ```
//!
//! [Switchyard]: https://github.com/switchyard-rs/switchyard
#![deny(missing_docs)]

mod context;
mod error;
pub mod http;
mod message;
pub mod testing;

#[cfg(target_family = "wasm")]
mod guest;

pub use context::{Context, LogLevel, SagaInstance, Shaped, State};
pub use error::{ErrorKind, HandlerError};
pub use message::{JSON, Kind, Message, Outgoing, PluginInfo, Response, Subscription};

/// A message handler. Implement it on a unit struct and pass the struct to
/// [`export_plugin!`].
pub trait Plugin {
    /// Declares the plugin's name, version and the message types it handles,
    /// publishes and sends. The host checks this against the pipeline when it
    /// loads the plugin, and refuses outputs that it does not declare.
    fn describe() -> PluginInfo;

    /// Handles one message. Outputs emitted through `ctx` are dispatched only
    /// if this returns `Ok`; on `Err` the host discards them.
    fn handle(ctx: &mut Context<'_>, message: Message) -> Result<(), HandlerError>;
}

/// Exports a [`Plugin`] implementation as the component's `handler`.
///
/// Use it once per plugin crate, at the crate root. On targets other than
/// WebAssembly it expands to nothing, so the crate still builds (and its tests
/// run) natively.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[cfg(target_family = "wasm")]
        const _: () = {
            struct SwitchyardExport;
            impl $crate::__guest::Guest for SwitchyardExport {
                fn describe() -> $crate::__guest::PluginInfo {
                    $crate::__guest::describe::<$plugin>()
                }
                fn handle(
                    message: $crate::__guest::Message,
                ) -> ::core::result::Result<(), $crate::__guest::HandlerError> {
                    $crate::__guest::handle::<$plugin>(message)
                }
            }
    $crate::__guest::export!(SwitchyardExport with_types_in $crate::__guest::bindings);
        };
    };
}

#[doc(hidden)]
#[cfg(target_family = "wasm")]
pub mod __guest {
    pub use crate::guest::bindings;
    pub use crate::guest::bindings::__export_switchyard_plugin as export;
    pub use crate::guest::bindings::exports::switchyard::plugin::handler::Guest;
    pub use crate::guest::bindings::switchyard::plugin::types::{
        HandlerError, Message, PluginInfo,
    };
    pub use crate::guest::{describe, handle};
}
