//! Handles the `ChargePayment` command and publishes `PaymentCaptured`;
//! handles `RefundPayment`, the fulfilment saga's undoing of a charge.
//!
//! With `GATEWAY_URL` in its environment (granted in the pipeline, with
//! the gateway's origin in its `http` grant) it charges through a payment
//! gateway: `POST {GATEWAY_URL}/charges` with the message id as the
//! `Idempotency-Key`, so a retried charge is one charge at the gateway. A
//! 2xx answer captures the payment; 402 is a declined card (permanent);
//! a 5xx, 408 or 429 answer, a timeout or a refused connection is transient
//! and retried. Without `GATEWAY_URL` it stands in for a gateway itself:
//! an amount whose cents end in 13 times out on the first two attempts. A
//! payload that is not a `ChargePayment` is poison (a permanent error).

use serde::{Deserialize, Serialize};
use switchyard_sdk::http::Request;
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
        match std::env::var("GATEWAY_URL") {
            Ok(gateway) => charge_at(ctx, &gateway, &msg, &charge)?,
            Err(_) if charge.amount_cents % 100 == 13 && msg.attempt <= FLAKY_ATTEMPTS => {
                return Err(timed_out(&charge, msg.attempt));
            }
            Err(_) => {}
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

fn timed_out(charge: &ChargePayment, attempt: u32) -> HandlerError {
    HandlerError::transient(format!(
        "payment gateway timed out charging order {} (attempt {attempt})",
        charge.order_id
    ))
    .with_code("gateway-timeout")
}

/// Charges through the gateway at `gateway`; `Ok` once it has taken the
/// charge.
fn charge_at(
    ctx: &mut Context<'_>,
    gateway: &str,
    msg: &Message,
    charge: &ChargePayment,
) -> Result<(), HandlerError> {
    let url = format!("{}/charges", gateway.trim_end_matches('/'));
    let answer = ctx.http(
        Request::post(&url)
            .header("idempotency-key", &msg.id)
            .json(charge)?,
    )?;
    let said = || answer.text().chars().take(200).collect::<String>();
    match answer.status {
        200..=299 => Ok(()),
        402 => Err(HandlerError::permanent(format!(
            "the card of order {} was declined: {}",
            charge.order_id,
            said()
        ))
        .with_code("card-declined")),
        504 | 408 => Err(timed_out(charge, msg.attempt)),
        429 | 500..=599 => Err(HandlerError::transient(format!(
            "payment gateway answered {} charging order {}: {}",
            answer.status,
            charge.order_id,
            said()
        ))
        .with_code("gateway-error")),
        status => Err(HandlerError::permanent(format!(
            "payment gateway refused the charge of order {} with {status}: {}",
            charge.order_id,
            said()
        ))
        .with_code("gateway-refused")),
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
