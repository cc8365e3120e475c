//! Handles the `Debit {"id", "amount"}` command for the tests of saga
//! faults: a debit over 100 fails for good (code `insufficient-funds`),
//! others succeed and publish `Debited {"id", "amount"}`.

use serde::Deserialize;
use serde_json::json;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

pub struct Bank;

#[derive(Deserialize)]
struct Debit {
    id: String,
    amount: i64,
}

impl Plugin for Bank {
    fn describe() -> PluginInfo {
        PluginInfo::new("bank", env!("CARGO_PKG_VERSION"))
            .handles_command("Debit")
            .publishes("Debited")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        let d: Debit = msg.json()?;
        if d.amount > 100 {
            return Err(HandlerError::permanent(format!(
                "cannot debit {} from {}",
                d.amount, d.id
            ))
            .with_code("insufficient-funds"));
        }
        ctx.publish("Debited", &json!({ "id": d.id, "amount": d.amount }))
    }
}

switchyard_sdk::export_plugin!(Bank);
