//! The order-fulfilment saga: one instance per order, found by
//! `$.order_id`.
//!
//! - `OrderPlaced`, `StockReserved` and `PaymentCaptured` may arrive in any
//!   order; the first of them starts the instance and asks for a
//!   `FulfilmentOverdue` timeout. Each records what it says in the state.
//! - Once the order is placed, its stock reserved and its payment captured,
//!   the saga sends `ShipOrder` to shipping.
//! - `OrderShipped` completes the instance.
//! - Compensation: when shipping fails for good (`ShipOrder.Fault`, the
//!   host's fault for a dead-lettered `ShipOrder`), or the timeout passes
//!   before shipping was asked for (the payment failed for good, say), the
//!   saga undoes what was done: `RefundPayment` if it was paid,
//!   `ReleaseStock` if stock was reserved, then `CancelOrder`. It completes
//!   once both the reservation and the payment are known; until then, for
//!   [`GRACE`], a late reservation is released and a late payment refunded
//!   as it arrives, and then the instance completes.
//!
//! Everything the instance knows is in its state, so `switchyard sagas show
//! -p pipelines/orders.toml fulfilment ORDER` tells the whole story:
//! `order`, `reserved_units`, `paid_cents`, `shipping` (requested, then the
//! carrier's tracking), `cancelled` and `outcome`.

use serde::{Deserialize, Serialize};
use serde_json::json;
use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo, Shaped};

/// How long an order may take to be reserved and paid before it is undone.
pub const OVERDUE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a cancelled order waits for a reservation or a payment still on
/// its way (a payment in its delayed retries, say), to undo it too.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// The part of `OrderPlaced` the saga keeps (state key `order`), stored
/// with its shape so that a later version can change it while instances
/// of this one are still running.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct Order {
    pub customer: String,
    pub total_cents: u64,
}

impl Shaped for Order {
    const SHAPE: u32 = 1;
}

#[derive(Deserialize)]
struct StockReserved {
    units: u64,
}

#[derive(Deserialize)]
struct PaymentCaptured {
    amount_cents: u64,
}

#[derive(Deserialize)]
struct OrderShipped {
    carrier: String,
    tracking: String,
}

/// The parts of a fault the saga reads.
#[derive(Deserialize)]
struct Fault {
    plugin: String,
    error: FaultError,
    dead_letter: String,
}

#[derive(Deserialize)]
struct FaultError {
    #[serde(default)]
    code: Option<String>,
    message: String,
}

pub struct Fulfilment;

impl Plugin for Fulfilment {
    fn describe() -> PluginInfo {
        PluginInfo::new("fulfilment", env!("CARGO_PKG_VERSION"))
            .consumes_event("OrderPlaced")
            .consumes_event("StockReserved")
            .consumes_event("PaymentCaptured")
            .consumes_event("OrderShipped")
            .consumes_event("FulfilmentOverdue")
            .consumes_event("ShipOrder.Fault")
            .sends("ShipOrder")
            .sends("RefundPayment")
            .sends("ReleaseStock")
            .sends("CancelOrder")
    }

    fn handle(ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        let Some(saga) = ctx.saga() else {
            return Err(HandlerError::permanent(
                "fulfilment runs only as a saga ([plugins.fulfilment.saga] in the pipeline)",
            ));
        };
        let order_id = saga.id.clone();
        ctx.set_span_attribute("order.id", &order_id);
        if saga.is_new() {
            ctx.request_timeout(
                OVERDUE_AFTER,
                "FulfilmentOverdue",
                &json!({ "order_id": order_id }),
            )?;
        }
        // Once cancelled, an instance only undoes what still arrives.
        let cancelled = ctx.state().get::<bool>("cancelled")?.unwrap_or(false);
        match msg.message_type.as_str() {
            "OrderPlaced" => {
                let order: Order = msg.json()?;
                ctx.state().store("order", &order)?;
            }
            "StockReserved" => {
                let r: StockReserved = msg.json()?;
                ctx.state().set("reserved_units", &r.units)?;
                if cancelled {
                    ctx.send(
                        "ReleaseStock",
                        &json!({ "order_id": order_id, "units": r.units }),
                    )?;
                }
            }
            "PaymentCaptured" => {
                let p: PaymentCaptured = msg.json()?;
                ctx.state().set("paid_cents", &p.amount_cents)?;
                if cancelled {
                    ctx.send(
                        "RefundPayment",
                        &json!({ "order_id": order_id, "amount_cents": p.amount_cents }),
                    )?;
                }
            }
            "OrderShipped" => {
                let s: OrderShipped = msg.json()?;
                ctx.state()
                    .set("shipping", &format!("{} {}", s.carrier, s.tracking))?;
                ctx.state().set("outcome", "shipped")?;
                ctx.info(&format!("order {order_id} shipped ({})", s.tracking));
                ctx.complete_saga();
                return Ok(());
            }
            "ShipOrder.Fault" => {
                let f: Fault = msg.json()?;
                let why = format!(
                    "{} failed for good ({}): {} [dead letter {}]",
                    f.plugin,
                    f.error.code.as_deref().unwrap_or("no code"),
                    f.error.message,
                    f.dead_letter
                );
                return compensate(ctx, &order_id, &why);
            }
            "FulfilmentOverdue" => {
                if cancelled {
                    ctx.info(&format!(
                        "order {order_id}: nothing more came within {} s of its cancellation",
                        GRACE.as_secs()
                    ));
                    ctx.complete_saga();
                    return Ok(());
                }
                if ctx.state().get::<String>("shipping")?.is_some() {
                    // Reserved and paid in time: shipping decides now.
                    ctx.info(&format!(
                        "order {order_id}: overdue, but shipping is under way"
                    ));
                    return Ok(());
                }
                let why = format!("not reserved and paid within {} s", OVERDUE_AFTER.as_secs());
                return compensate(ctx, &order_id, &why);
            }
            other => {
                return Err(HandlerError::permanent(format!(
                    "fulfilment does not handle {other}"
                )));
            }
        }
        if cancelled {
            return close_when_settled(ctx);
        }
        ship_when_ready(ctx, &order_id)
    }
}

/// Completes a cancelled order's instance once its reservation and its
/// payment are both known (and undone): nothing more can come.
fn close_when_settled(ctx: &mut Context<'_>) -> Result<(), HandlerError> {
    let reserved = ctx.state().get::<u64>("reserved_units")?.is_some();
    let paid = ctx.state().get::<u64>("paid_cents")?.is_some();
    if reserved && paid {
        ctx.complete_saga();
    }
    Ok(())
}

/// Sends `ShipOrder` once the order is placed, reserved and paid, and not
/// asked for before.
fn ship_when_ready(ctx: &mut Context<'_>, order_id: &str) -> Result<(), HandlerError> {
    let mut state = ctx.state();
    let order: Option<Order> = state.load("order")?;
    let units: Option<u64> = state.get("reserved_units")?;
    let paid: Option<u64> = state.get("paid_cents")?;
    let asked: Option<String> = state.get("shipping")?;
    let (Some(order), Some(units), Some(_), None) = (order, units, paid, asked) else {
        return Ok(());
    };
    state.set("shipping", "requested")?;
    ctx.send(
        "ShipOrder",
        &json!({ "order_id": order_id, "customer": order.customer, "units": units }),
    )
}

/// Undoes what was done for the order and cancels it; completes the saga
/// when nothing more can come, or waits [`GRACE`] for what still may.
fn compensate(ctx: &mut Context<'_>, order_id: &str, why: &str) -> Result<(), HandlerError> {
    let paid: Option<u64> = ctx.state().get("paid_cents")?;
    let units: Option<u64> = ctx.state().get("reserved_units")?;
    if let Some(amount_cents) = paid {
        ctx.send(
            "RefundPayment",
            &json!({ "order_id": order_id, "amount_cents": amount_cents }),
        )?;
    }
    if let Some(units) = units {
        ctx.send(
            "ReleaseStock",
            &json!({ "order_id": order_id, "units": units }),
        )?;
    }
    ctx.send(
        "CancelOrder",
        &json!({ "order_id": order_id, "reason": why }),
    )?;
    ctx.state().set("outcome", &format!("cancelled: {why}"))?;
    ctx.state().set("cancelled", &true)?;
    ctx.warn(&format!("order {order_id} cancelled: {why}"));
    if paid.is_some() && units.is_some() {
        ctx.complete_saga();
    } else {
        ctx.request_timeout(GRACE, "FulfilmentOverdue", &json!({ "order_id": order_id }))?;
    }
    Ok(())
}

switchyard_sdk::export_plugin!(Fulfilment);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::testing::TestHost;

    fn placed() -> Message {
        Message::event("OrderPlaced").with_json(&json!({
            "order_id": "A-1", "customer": "ada", "total_cents": 2500,
            "items": [{"sku": "book", "quantity": 2, "unit_price_cents": 1250}]
        }))
    }

    fn reserved() -> Message {
        Message::event("StockReserved").with_json(&json!({"order_id": "A-1", "units": 2}))
    }

    fn paid() -> Message {
        Message::event("PaymentCaptured")
            .with_json(&json!({"order_id": "A-1", "amount_cents": 2500}))
    }

    #[test]
    fn ships_once_placed_reserved_and_paid_in_any_order() {
        let saga = TestHost::<Fulfilment>::new().with_saga("A-1", 0);
        let first = saga.handle(paid());
        first.assert_ok();
        assert_eq!(
            first.timeouts.len(),
            1,
            "the first message asks for the timeout"
        );
        saga.handle(reserved()).assert_ok();
        let last = saga.handle(placed());
        last.assert_ok();
        assert!(last.timeouts.is_empty());
        assert_eq!(
            last.sent_json::<serde_json::Value>("ShipOrder"),
            vec![json!({"order_id": "A-1", "customer": "ada", "units": 2})]
        );
        let shipped = saga.handle(Message::event("OrderShipped").with_json(
            &json!({"order_id": "A-1", "carrier": "parcel-post", "tracking": "SY-A-1"}),
        ));
        shipped.assert_ok();
        assert!(saga.saga_completed());
        assert_eq!(saga.state::<String>("outcome").as_deref(), Some("shipped"));
    }

    #[test]
    fn a_shipping_fault_refunds_releases_and_cancels() {
        let saga = TestHost::<Fulfilment>::new()
            .with_saga("A-1", 4)
            .with_state(
                "order",
                &json!({"shape": 1, "data": {"customer": "ada", "total_cents": 2500}}),
            )
            .with_state("reserved_units", &2)
            .with_state("paid_cents", &2500)
            .with_state("shipping", "requested");
        let out = saga.handle(Message::event("ShipOrder.Fault").with_json(&json!({
            "instance": "A-1",
            "command": {"type": "ShipOrder", "id": "m-1", "payload": {}},
            "plugin": "shipping",
            "error": {"kind": "permanent", "code": "parcel-too-large", "message": "too big"},
            "dead_letter": "d-1"
        })));
        out.assert_ok();
        assert_eq!(
            out.sent_json::<serde_json::Value>("RefundPayment"),
            vec![json!({"order_id": "A-1", "amount_cents": 2500})]
        );
        assert_eq!(
            out.sent_json::<serde_json::Value>("ReleaseStock"),
            vec![json!({"order_id": "A-1", "units": 2})]
        );
        let cancel = out.sent_json::<serde_json::Value>("CancelOrder");
        assert!(
            cancel[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("parcel-too-large") && r.contains("d-1")),
            "{cancel:?}"
        );
        assert!(saga.saga_completed());
    }

    #[test]
    fn overdue_before_payment_releases_stock_cancels_and_waits_for_a_late_payment() {
        let saga = TestHost::<Fulfilment>::new()
            .with_saga("A-1", 2)
            .with_state(
                "order",
                &json!({"shape": 1, "data": {"customer": "ada", "total_cents": 0}}),
            )
            .with_state("reserved_units", &2);
        let out =
            saga.handle(Message::event("FulfilmentOverdue").with_json(&json!({"order_id": "A-1"})));
        out.assert_ok();
        assert!(
            out.sent_json::<serde_json::Value>("RefundPayment")
                .is_empty()
        );
        assert_eq!(out.sent_json::<serde_json::Value>("ReleaseStock").len(), 1);
        assert_eq!(out.sent_json::<serde_json::Value>("CancelOrder").len(), 1);
        assert!(!saga.saga_completed(), "a payment may still come");
        assert_eq!(out.timeouts.len(), 1);
        assert_eq!(out.timeouts[0].0, GRACE);

        // It does come: refunded at once, and the instance completes.
        let late = saga.handle(paid());
        late.assert_ok();
        assert_eq!(
            late.sent_json::<serde_json::Value>("RefundPayment"),
            vec![json!({"order_id": "A-1", "amount_cents": 2500})]
        );
        assert!(late.sent_json::<serde_json::Value>("ShipOrder").is_empty());
        assert!(saga.saga_completed());
    }

    #[test]
    fn a_cancelled_order_completes_when_its_grace_is_over() {
        let saga = TestHost::<Fulfilment>::new()
            .with_saga("A-1", 3)
            .with_state("cancelled", &true)
            .with_state("reserved_units", &2);
        let out =
            saga.handle(Message::event("FulfilmentOverdue").with_json(&json!({"order_id": "A-1"})));
        out.assert_ok();
        assert!(out.sent.is_empty());
        assert!(saga.saga_completed());
    }

    #[test]
    fn overdue_while_shipping_changes_nothing() {
        let saga = TestHost::<Fulfilment>::new()
            .with_saga("A-1", 3)
            .with_state("shipping", "requested");
        let out =
            saga.handle(Message::event("FulfilmentOverdue").with_json(&json!({"order_id": "A-1"})));
        out.assert_ok();
        assert!(out.sent.is_empty());
        assert!(!saga.saga_completed());
    }
}
