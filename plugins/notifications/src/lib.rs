//! Consumes `OrderPlaced` and `PaymentCaptured` and tells the customer.
//!
//! A real plugin would call an e-mail service; this one logs the e-mail.

use serde::Deserialize;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

#[derive(Debug, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    total_cents: u64,
}

#[derive(Debug, Deserialize)]
struct PaymentCaptured {
    order_id: String,
    amount_cents: u64,
}

pub struct Notifications;

impl Plugin for Notifications {
    fn describe() -> PluginInfo {
        PluginInfo::new("notifications", env!("CARGO_PKG_VERSION"))
            .consumes_event("OrderPlaced")
            .consumes_event("PaymentCaptured")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        match msg.message_type.as_str() {
            "OrderPlaced" => {
                let e: OrderPlaced = msg.json()?;
                ctx.info(&format!(
                    "e-mail to {}: we received order {} ({} cents)",
                    e.customer, e.order_id, e.total_cents
                ));
            }
            "PaymentCaptured" => {
                let e: PaymentCaptured = msg.json()?;
                ctx.info(&format!(
                    "e-mail: payment of {} cents for order {} captured",
                    e.amount_cents, e.order_id
                ));
            }
            other => {
                return Err(HandlerError::permanent(format!(
                    "unexpected message type {other}"
                )));
            }
        }
        Ok(())
    }
}

switchyard_sdk::export_plugin!(Notifications);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::{LogLevel, testing::TestHost};

    #[test]
    fn tells_the_customer_and_publishes_nothing() {
        let out = TestHost::<Notifications>::new().handle(Message::event("OrderPlaced").with_json(
            &json!({"order_id": "A-1", "customer": "ada", "total_cents": 10, "items": []}),
        ));
        out.assert_ok();
        assert!(out.published.is_empty());
        assert_eq!(out.logs.len(), 1);
        assert_eq!(out.logs[0].0, LogLevel::Info);
        assert!(out.logs[0].1.contains("ada"));
    }

    #[test]
    fn replying_to_an_event_is_refused() {
        struct Rude;
        impl Plugin for Rude {
            fn describe() -> PluginInfo {
                Notifications::describe()
            }
            fn handle(ctx: &mut Context<'_>, _: Message) -> Result<(), HandlerError> {
                ctx.reply(&"thanks")
            }
        }
        let out = TestHost::<Rude>::new().handle(Message::event("PaymentCaptured"));
        assert!(
            out.contract_violation()
                .is_some_and(|v| v.contains("replied"))
        );
        assert!(out.replies.is_empty());
    }
}
