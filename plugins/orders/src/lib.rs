//! Handles the `PlaceOrder` command: checks it, publishes `OrderPlaced`, asks
//! payments to charge the customer with a `ChargePayment` command, and replies
//! with the accepted order. Handles `CancelOrder`, the fulfilment saga's
//! last word on an order it had to undo.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

/// `PlaceOrder` command payload.
#[derive(Debug, Deserialize, Serialize)]
pub struct PlaceOrder {
    pub order_id: String,
    pub customer: String,
    pub items: Vec<Line>,
}

/// One order line.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Line {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: u64,
}

/// `OrderPlaced` event payload.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer: String,
    pub items: Vec<Line>,
    pub total_cents: u64,
}

/// `ChargePayment` command payload.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct ChargePayment {
    pub order_id: String,
    pub customer: String,
    pub amount_cents: u64,
}

/// `CancelOrder` command payload.
#[derive(Debug, Deserialize, Serialize)]
pub struct CancelOrder {
    pub order_id: String,
    pub reason: String,
}

/// The reply to `PlaceOrder`.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct Accepted {
    pub order_id: String,
    pub total_cents: u64,
}

pub struct Orders;

impl Plugin for Orders {
    fn describe() -> PluginInfo {
        PluginInfo::new("orders", env!("CARGO_PKG_VERSION"))
            .handles_command("PlaceOrder")
            .handles_command("CancelOrder")
            .publishes("OrderPlaced")
            .sends("ChargePayment")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        if msg.message_type == "CancelOrder" {
            let cancel: CancelOrder = msg.json()?;
            ctx.set_span_attribute("order.id", &cancel.order_id);
            ctx.warn(&format!(
                "cancelled order {}: {}",
                cancel.order_id, cancel.reason
            ));
            return Ok(());
        }
        let order: PlaceOrder = msg.json()?;
        // Lets an operator find this order's trace by its id.
        ctx.set_span_attribute("order.id", &order.order_id);
        if order.items.is_empty() {
            return Err(
                HandlerError::permanent(format!("order {} has no items", order.order_id))
                    .with_code("empty-order")
                    .with_detail("order_id", &order.order_id),
            );
        }
        let total_cents = order
            .items
            .iter()
            .try_fold(0u64, |sum, l| {
                sum.checked_add(l.unit_price_cents.checked_mul(u64::from(l.quantity))?)
            })
            .ok_or_else(|| {
                HandlerError::permanent(format!("order {} total overflows", order.order_id))
            })?;

        ctx.info(&format!(
            "accepted order {} for {} ({} lines, {total_cents} cents)",
            order.order_id,
            order.customer,
            order.items.len()
        ));
        ctx.publish(
            "OrderPlaced",
            &OrderPlaced {
                order_id: order.order_id.clone(),
                customer: order.customer.clone(),
                items: order.items,
                total_cents,
            },
        )?;
        ctx.send(
            "ChargePayment",
            &ChargePayment {
                order_id: order.order_id.clone(),
                customer: order.customer,
                amount_cents: total_cents,
            },
        )?;
        ctx.reply(&Accepted {
            order_id: order.order_id,
            total_cents,
        })
    }
}

switchyard_sdk::export_plugin!(Orders);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::testing::TestHost;

    fn place_order(items: serde_json::Value) -> Message {
        Message::command("PlaceOrder")
            .with_json(&json!({"order_id": "A-1", "customer": "ada", "items": items}))
    }

    #[test]
    fn publishes_order_placed_sends_charge_and_replies() {
        let out = TestHost::<Orders>::new().handle(place_order(json!([
            {"sku": "book", "quantity": 2, "unit_price_cents": 1250},
            {"sku": "pen", "quantity": 1, "unit_price_cents": 300}
        ])));
        out.assert_ok();
        let placed: Vec<OrderPlaced> = out.published_json("OrderPlaced");
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0].total_cents, 2800);
        let charges: Vec<ChargePayment> = out.sent_json("ChargePayment");
        assert_eq!(
            charges,
            vec![ChargePayment {
                order_id: "A-1".into(),
                customer: "ada".into(),
                amount_cents: 2800
            }]
        );
        let reply: Accepted = out.replies[0].json_payload().unwrap();
        assert_eq!(reply.total_cents, 2800);
        assert_eq!(
            out.span_attributes,
            vec![("order.id".to_owned(), "A-1".to_owned())]
        );
    }

    #[test]
    fn empty_order_is_poison_and_publishes_nothing() {
        let out = TestHost::<Orders>::new().handle(place_order(json!([])));
        let err = out.handler_error().expect("must fail");
        assert!(!err.is_transient());
        assert_eq!(err.code.as_deref(), Some("empty-order"));
        assert!(out.published.is_empty() && out.sent.is_empty() && out.replies.is_empty());
    }

    #[test]
    fn cancels() {
        let out = TestHost::<Orders>::new().handle(
            Message::command("CancelOrder")
                .with_json(&json!({"order_id": "A-1", "reason": "payment failed"})),
        );
        out.assert_ok();
        assert!(out.published.is_empty() && out.sent.is_empty());
        assert!(
            out.logs
                .iter()
                .any(|(_, l)| l.contains("cancelled order A-1: payment failed")),
            "{:?}",
            out.logs
        );
    }

    #[test]
    fn malformed_payload_is_permanent() {
        let out = TestHost::<Orders>::new()
            .handle(Message::command("PlaceOrder").with_payload("not json", "text/plain"));
        let err = out.handler_error().expect("must fail");
        assert!(!err.is_transient());
        assert!(err.message.contains("PlaceOrder"), "{}", err.message);
    }
}
