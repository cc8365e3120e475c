// The `fraud` plugin, written in JavaScript: screens every placed order.
//
// It consumes the `OrderPlaced` event and publishes an `OrderScreened` event
// with its verdict. An accepted order goes on with a `SignReceipt` command
// (handled by the `receipts` plugin); an order held for review gets a
// `NotifyCustomer` command instead (handled by `notices`).
//
// With `RISK_URL` in its environment it asks that risk service for a score
// with `fetch` (`POST {RISK_URL}/scores`, over `wasi:http`): a score of 80 or
// more holds the order for review; a 429 or 5xx answer, or a service that
// cannot be reached, is a transient failure (the host retries); any other
// refusal is permanent. Without it the plugin stands in for the service,
// which is "unavailable" on the first attempt for the customer `flaky`.
//
// A payload that is not the expected JSON is refused for good (a permanent
// failure: dead-lettered).
//
// It counts each customer's screened orders in its state (`orders:<customer>`,
// committed with the message's outcome, so a retried attempt does not count
// twice) and puts the count on the trace span as `customer.orders`.

import { log, publish, send, spanAttribute } from "switchyard:plugin/host@0.2.2";
import { increment } from "switchyard:plugin/state@0.2.2";
// The engine has no `process.env`: the environment comes from WASI. The
// version is the one of the WASI WIT the plugin is built against.
import { getEnvironment } from "wasi:cli/environment@0.2.12";

// Orders of this many cents or more are held for a person to look at.
const REVIEW_FROM_CENTS = 100000;
// So are orders the risk service scores this high (out of 100).
const REVIEW_FROM_SCORE = 80;

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

// The value of an environment variable, read per message (top-level code
// runs once, when the component is built).
function setting(name) {
  const found = getEnvironment().find(([key]) => key === name);
  return found?.[1];
}

// The risk service's score of the order, from 0 to 100.
async function riskScore(service, message, order) {
  const url = `${service.replace(/\/+$/, "")}/scores`;
  let response;
  let text;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", "idempotency-key": message.id },
      body: JSON.stringify({
        order_id: order.order_id,
        customer: order.customer,
        total_cents: order.total_cents,
      }),
    });
    text = await response.text();
  } catch (e) {
    throw failure("transient", `POST ${url} failed: ${e}`, "risk-service-down", {
      order_id: order.order_id,
    });
  }
  const said = text.slice(0, 200);
  if (response.status === 429 || response.status >= 500) {
    throw failure("transient", `the risk service answered ${response.status}: ${said}`, "risk-service-down", {
      order_id: order.order_id,
    });
  }
  if (!response.ok) {
    throw failure("permanent", `the risk service refused the order (${response.status}): ${said}`, "risk-service-refused", {
      order_id: order.order_id,
    });
  }
  let score;
  try {
    score = JSON.parse(text).score;
  } catch {
    score = undefined;
  }
  if (typeof score !== "number" || !(score >= 0 && score <= 100)) {
    throw failure("transient", `the risk service answered without a score from 0 to 100: ${said}`, "risk-service-error", {
      order_id: order.order_id,
    });
  }
  return score;
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

  // Async: the engine runs its event loop until the promise settles, so
  // `await fetch(...)` works inside one call.
  async handle(message) {
    if (message.messageType !== "OrderPlaced") {
      throw failure("permanent", `fraud does not handle ${message.messageType}`, "unknown-type");
    }
    const order = readOrder(message);
    spanAttribute("order.id", order.order_id);
    const service = setting("RISK_URL");
    const score = service ? await riskScore(service, message, order) : undefined;
    if (!service && order.customer === "flaky" && message.attempt === 1) {
      throw failure("transient", "risk service unavailable, try again", "risk-service-down", {
        order_id: order.order_id,
      });
    }

    // s64 in the contract: a BigInt here.
    const orders = increment(`orders:${order.customer}`, 1n);
    spanAttribute("customer.orders", String(orders));

    const reasons = [];
    if (order.total_cents >= REVIEW_FROM_CENTS) reasons.push("large order");
    if (score !== undefined && score >= REVIEW_FROM_SCORE) reasons.push(`risk score ${score}`);
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
