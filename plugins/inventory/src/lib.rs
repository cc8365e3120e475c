//! Consumes `OrderPlaced` and reserves stock, publishing `StockReserved`;
//! handles `ReleaseStock`, the fulfilment saga's undoing of a reservation.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

/// The part of `OrderPlaced` this plugin reads.
#[derive(Debug, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub items: Vec<Line>,
}

/// One order line.
#[derive(Debug, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: u32,
}

/// `ReleaseStock` command payload.
#[derive(Debug, Deserialize)]
pub struct ReleaseStock {
    pub order_id: String,
    pub units: u64,
}

/// `StockReserved` event payload.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct StockReserved {
    pub order_id: String,
    pub units: u64,
}

pub struct Inventory;

impl Plugin for Inventory {
    fn describe() -> PluginInfo {
        PluginInfo::new("inventory", env!("CARGO_PKG_VERSION"))
            .consumes_event("OrderPlaced")
            .handles_command("ReleaseStock")
            .publishes("StockReserved")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        if msg.message_type == "ReleaseStock" {
            let release: ReleaseStock = msg.json()?;
            ctx.info(&format!(
                "released {} units of order {}",
                release.units, release.order_id
            ));
            return Ok(());
        }
        let order: OrderPlaced = msg.json()?;
        let units = order.items.iter().map(|l| u64::from(l.quantity)).sum();
        for line in &order.items {
            ctx.debug(&format!("reserving {} x {}", line.quantity, line.sku));
        }
        ctx.info(&format!(
            "reserved {units} units for order {}",
            order.order_id
        ));
        ctx.publish(
            "StockReserved",
            &StockReserved {
                order_id: order.order_id,
                units,
            },
        )
    }
}

switchyard_sdk::export_plugin!(Inventory);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::testing::TestHost;

    #[test]
    fn reserves_every_unit() {
        let out = TestHost::<Inventory>::new().handle(Message::event("OrderPlaced").with_json(
            &json!({"order_id": "A-1", "customer": "ada", "total_cents": 1,
                    "items": [{"sku": "a", "quantity": 2, "unit_price_cents": 1},
                              {"sku": "b", "quantity": 3, "unit_price_cents": 1}]}),
        ));
        out.assert_ok();
        assert_eq!(
            out.published_json::<StockReserved>("StockReserved"),
            vec![StockReserved {
                order_id: "A-1".into(),
                units: 5
            }]
        );
    }

    #[test]
    fn releases_stock() {
        let out = TestHost::<Inventory>::new().handle(
            Message::command("ReleaseStock").with_json(&json!({"order_id": "A-1", "units": 5})),
        );
        out.assert_ok();
        assert!(out.published.is_empty());
        assert!(
            out.logs.iter().any(|(_, l)| l.contains("released 5 units")),
            "{:?}",
            out.logs
        );
    }

    #[test]
    fn a_command_of_the_same_name_is_not_accepted() {
        let out = TestHost::<Inventory>::new().handle(Message::command("OrderPlaced"));
        assert!(out.contract_violation().is_some());
    }
}
