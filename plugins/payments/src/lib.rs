//! Handles the `ChargePayment` command and publishes `PaymentCaptured`;
//! handles `RefundPayment`, the fulfilment saga's undoing of a charge.
//!
//! It stands in for a call to a payment gateway that is sometimes down: an
//! amount whose cents end in 13 makes the "gateway" time out on the first two
//! attempts (a transient error, worth retrying). A payload that is not a
//! `ChargePayment` is poison (a permanent error).

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

/// `ChargePayment` command payload.
#[derive(Debug, Deserialize, Serialize)]
pub struct ChargePayment {
    pub order_id: String,
    pub customer: String,
    pub amount_cents: u64,
}

/// `PaymentCaptured` event payload.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub amount_cents: u64,
}

/// `RefundPayment` command payload.
#[derive(Debug, Deserialize, Serialize)]
pub struct RefundPayment {
    pub order_id: String,
    pub amount_cents: u64,
}

/// Attempts on which the simulated gateway times out.
const FLAKY_ATTEMPTS: u32 = 2;

pub struct Payments;

impl Plugin for Payments {
    fn describe() -> PluginInfo {
        PluginInfo::new("payments", env!("CARGO_PKG_VERSION"))
            .handles_command("ChargePayment")
            .handles_command("RefundPayment")
            .publishes("PaymentCaptured")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        if msg.message_type == "RefundPayment" {
            let refund: RefundPayment = msg.json()?;
            ctx.info(&format!(
                "refunded {} cents for order {}",
                refund.amount_cents, refund.order_id
            ));
            return Ok(());
        }
        let charge: ChargePayment = msg.json()?;
        if charge.amount_cents == 0 {
            return Err(HandlerError::permanent(format!(
                "refusing to charge 0 cents for order {}",
                charge.order_id
            ))
            .with_code("zero-amount"));
        }
        if charge.amount_cents % 100 == 13 && msg.attempt <= FLAKY_ATTEMPTS {
            return Err(HandlerError::transient(format!(
                "payment gateway timed out charging order {} (attempt {})",
                charge.order_id, msg.attempt
            ))
            .with_code("gateway-timeout"));
        }
        ctx.info(&format!(
            "charged {} {} cents for order {}",
            charge.customer, charge.amount_cents, charge.order_id
        ));
        ctx.publish(
            "PaymentCaptured",
            &PaymentCaptured {
                order_id: charge.order_id,
                amount_cents: charge.amount_cents,
            },
        )
    }
}

switchyard_sdk::export_plugin!(Payments);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::testing::TestHost;

    fn charge(amount: u64) -> Message {
        Message::command("ChargePayment")
            .with_json(&json!({"order_id": "A-1", "customer": "ada", "amount_cents": amount}))
    }

    #[test]
    fn captures_payment() {
        let out = TestHost::<Payments>::new().handle(charge(2500));
        out.assert_ok();
        assert_eq!(
            out.published_json::<PaymentCaptured>("PaymentCaptured"),
            vec![PaymentCaptured {
                order_id: "A-1".into(),
                amount_cents: 2500
            }]
        );
    }

    #[test]
    fn flaky_gateway_is_transient_then_succeeds() {
        let host = TestHost::<Payments>::new();
        let first = host.handle(charge(1013));
        assert!(first.handler_error().is_some_and(|e| e.is_transient()));
        assert!(first.published.is_empty());
        host.handle(charge(1013).with_attempt(FLAKY_ATTEMPTS + 1))
            .assert_ok();
    }

    #[test]
    fn refunds() {
        let out = TestHost::<Payments>::new().handle(
            Message::command("RefundPayment")
                .with_json(&json!({"order_id": "A-1", "amount_cents": 2500})),
        );
        out.assert_ok();
        assert!(out.published.is_empty());
        assert!(
            out.logs
                .iter()
                .any(|(_, l)| l.contains("refunded 2500 cents")),
            "{:?}",
            out.logs
        );
    }

    #[test]
    fn malformed_payload_is_permanent() {
        let out = TestHost::<Payments>::new()
            .handle(Message::command("ChargePayment").with_json(&json!({"amount": "lots"})));
        assert!(out.handler_error().is_some_and(|e| !e.is_transient()));
    }
}
