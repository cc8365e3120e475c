// The `fraud` plugin, written in JavaScript: screens every placed order.
//
// It consumes the `OrderPlaced` event and publishes an `OrderScreened` event
// with its verdict. An accepted order goes on with a `SignReceipt` command
// (handled by the `receipts` plugin); an order held for review gets a
// `NotifyCustomer` command instead (handled by `notices`).
//
// The risk service is "unavailable" on the first attempt for the customer
// `flaky` (a transient failure: the host retries); a payload that is not the
// expected JSON is refused for good (a permanent failure: dead-lettered).
//
// It counts each customer's screened orders in its state (`orders:<customer>`,
// committed with the message's outcome, so a retried attempt does not count
// twice) and puts the count on the trace span as `customer.orders`.

import { log, publish, send, spanAttribute } from "switchyard:plugin/host@0.2.2";
import { increment } from "switchyard:plugin/state@0.2.2";

// Orders of this many cents or more are held for a person to look at.
const REVIEW_FROM_CENTS = 100000;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function failure(kind, message, code, details = {}) {
  return { tag: kind, val: { message, code, details: Object.entries(details) } };
}

function readOrder(message) {
  let order;
  try {
    order = JSON.parse(decoder.decode(message.payload));
  } catch (e) {
    throw failure("permanent", `OrderPlaced payload is not JSON: ${e.message}`, "bad-payload");
  }
  const missing = [];
  if (typeof order?.order_id !== "string") missing.push("order_id");
  if (typeof order?.customer !== "string") missing.push("customer");
  if (!Number.isSafeInteger(order?.total_cents) || order.total_cents < 0) missing.push("total_cents");
  if (missing.length > 0) {
    throw failure("permanent", `OrderPlaced payload lacks ${missing.join(", ")}`, "bad-payload", {
      missing: missing.join(","),
    });
  }
  return order;
}

function json(messageType, body, key) {
  return {
    messageType,
    payload: encoder.encode(JSON.stringify(body)),
    contentType: "application/json",
    headers: [],
    partitionKey: key,
  };
}

export const handler = {
  describe() {
    return {
      name: "fraud",
      version: "1.0.0",
      handles: [{ messageType: "OrderPlaced", kind: "event" }],
      publishes: ["OrderScreened"],
      sends: ["SignReceipt", "NotifyCustomer"],
    };
  },

  handle(message) {
    if (message.messageType !== "OrderPlaced") {
      throw failure("permanent", `fraud does not handle ${message.messageType}`, "unknown-type");
    }
    const order = readOrder(message);
    spanAttribute("order.id", order.order_id);
    if (order.customer === "flaky" && message.attempt === 1) {
      throw failure("transient", "risk service unavailable, try again", "risk-service-down", {
        order_id: order.order_id,
      });
    }

    // s64 in the contract: a BigInt here.
    const orders = increment(`orders:${order.customer}`, 1n);
    spanAttribute("customer.orders", String(orders));

    const reasons = [];
    if (order.total_cents >= REVIEW_FROM_CENTS) reasons.push("large order");
    const verdict = reasons.length === 0 ? "accept" : "review";
    log("info", `order ${order.order_id}: ${verdict}${reasons.length ? ` (${reasons.join(", ")})` : ""}`);

    publish(json("OrderScreened", { order_id: order.order_id, verdict, reasons }, order.order_id));
    if (verdict === "accept") {
      send(
        json(
          "SignReceipt",
          { order_id: order.order_id, customer: order.customer, total_cents: order.total_cents },
          order.order_id,
        ),
      );
    } else {
      send(
        json(
          "NotifyCustomer",
          { order_id: order.order_id, customer: order.customer, reason: reasons.join(", ") },
          order.order_id,
        ),
      );
    }
  },
};
