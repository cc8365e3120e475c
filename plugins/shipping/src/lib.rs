//! Handles the `ShipOrder` command and publishes `OrderShipped`.
//!
//! It stands in for a carrier's booking service. No carrier takes a parcel
//! of more than 100 units: such an order fails for good (a permanent error,
//! code `parcel-too-large`), so the fulfilment saga that asked for it gets
//! `ShipOrder.Fault` back and undoes the order.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

/// `ShipOrder` command payload.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct ShipOrder {
    pub order_id: String,
    pub customer: String,
    pub units: u64,
}

/// `OrderShipped` event payload.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct OrderShipped {
    pub order_id: String,
    pub carrier: String,
    pub tracking: String,
}

/// The most units a parcel may hold.
pub const MAX_UNITS: u64 = 100;

pub struct Shipping;

impl Plugin for Shipping {
    fn describe() -> PluginInfo {
        PluginInfo::new("shipping", env!("CARGO_PKG_VERSION"))
            .handles_command("ShipOrder")
            .publishes("OrderShipped")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        let ship: ShipOrder = msg.json()?;
        ctx.set_span_attribute("order.id", &ship.order_id);
        if ship.units > MAX_UNITS {
            return Err(HandlerError::permanent(format!(
                "no carrier takes a parcel of {} units (order {}); the most is {MAX_UNITS}",
                ship.units, ship.order_id
            ))
            .with_code("parcel-too-large")
            .with_detail("order_id", &ship.order_id));
        }
        // A tracking number the order id always gives, so that a redelivery
        // books the same parcel.
        let tracking = format!("SY-{}", ship.order_id);
        ctx.info(&format!(
            "booked {} units of order {} for {} ({tracking})",
            ship.units, ship.order_id, ship.customer
        ));
        ctx.publish(
            "OrderShipped",
            &OrderShipped {
                order_id: ship.order_id,
                carrier: "parcel-post".into(),
                tracking,
            },
        )
    }
}

switchyard_sdk::export_plugin!(Shipping);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::testing::TestHost;

    fn ship(units: u64) -> Message {
        Message::command("ShipOrder")
            .with_json(&json!({"order_id": "A-1", "customer": "ada", "units": units}))
    }

    #[test]
    fn books_a_parcel() {
        let out = TestHost::<Shipping>::new().handle(ship(MAX_UNITS));
        out.assert_ok();
        assert_eq!(
            out.published_json::<OrderShipped>("OrderShipped"),
            vec![OrderShipped {
                order_id: "A-1".into(),
                carrier: "parcel-post".into(),
                tracking: "SY-A-1".into(),
            }]
        );
    }

    #[test]
    fn a_parcel_too_large_fails_for_good() {
        let out = TestHost::<Shipping>::new().handle(ship(MAX_UNITS + 1));
        let err = out.handler_error().expect("must fail");
        assert!(!err.is_transient());
        assert_eq!(err.code.as_deref(), Some("parcel-too-large"));
        assert!(out.published.is_empty());
    }
}
