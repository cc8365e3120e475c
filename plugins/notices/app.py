"""The `notices` plugin, written in Python: tells customers what happened.

- consumes the `ReceiptSigned` event: the customer gets their receipt;
- handles the `NotifyCustomer` command: the customer is told why their
  order is held, and the sender gets a reply when it asked for one.

Each notice is published as a `CustomerNotified` event, stamped with the
time it was sent (the wall clock, granted in the pipeline) and sent over the
channel named by the `NOTICE_CHANNEL` environment variable (`email` unless
the pipeline's grants say otherwise). The mail server is
"busy" on the first attempt for the customer `flaky` (a transient failure:
the host retries); a payload that is not the expected JSON is refused for
good (a permanent failure: dead-lettered, never retried).

It counts the notices each customer got in its state (`notices:<customer>`,
committed with the message's outcome, so a retried attempt does not count
twice) and says which one this is in its log line.
"""

import json
import os
import time
from datetime import datetime, timezone

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, state
from wit_world.imports.types import (
    ErrorDetails,
    HandlerError_Permanent,
    HandlerError_Transient,
    Kind,
    LogLevel,
    Message,
    Outgoing,
    PluginInfo,
    Response,
    Subscription,
)

NAME = "notices"
VERSION = "1.0.0"


def permanent(text, code, **details):
    return Err(HandlerError_Permanent(ErrorDetails(text, code, list(details.items()))))


def transient(text, code, **details):
    return Err(HandlerError_Transient(ErrorDetails(text, code, list(details.items()))))


def read_json(message, *fields):
    """The payload as a JSON object holding `fields`, or a permanent error."""
    try:
        body = json.loads(message.payload)
    except (ValueError, RecursionError) as e:
        raise permanent(f"{message.message_type} payload is not JSON: {e}", "bad-payload")
    if not isinstance(body, dict):
        raise permanent(f"{message.message_type} payload is not a JSON object", "bad-payload")
    missing = [f for f in fields if not isinstance(body.get(f), str)]
    if missing:
        raise permanent(
            f"{message.message_type} payload lacks {', '.join(missing)}",
            "bad-payload",
            missing=",".join(missing),
        )
    return body


def notify(message, order_id, customer, text):
    if customer == "flaky" and message.attempt == 1:
        raise transient("mail server busy, try again", "mail-busy", customer=customer)
    # Read per message: module-level code runs once, when the component is built.
    channel = os.environ.get("NOTICE_CHANNEL", "email")
    sent_at = datetime.fromtimestamp(time.time(), timezone.utc).isoformat()
    count = state.increment(f"notices:{customer}", 1)
    host.log(
        LogLevel.INFO,
        f"{channel} to {customer} about order {order_id} (notice {count} to them): {text}",
    )
    notice = {
        "order_id": order_id,
        "customer": customer,
        "channel": channel,
        "text": text,
        "sent_at": sent_at,
    }
    host.publish(
        Outgoing("CustomerNotified", json.dumps(notice).encode(), "application/json", [], order_id)
    )


class Handler(exports.Handler):
    def describe(self) -> PluginInfo:
        return PluginInfo(
            NAME,
            VERSION,
            [
                Subscription("ReceiptSigned", Kind.EVENT),
                Subscription("NotifyCustomer", Kind.COMMAND),
            ],
            ["CustomerNotified"],
            [],
        )

    def handle(self, message: Message) -> None:
        if message.message_type == "ReceiptSigned":
            body = read_json(message, "order_id", "customer", "checksum")
            text = f"your receipt for order {body['order_id']} (checksum {body['checksum']})"
            notify(message, body["order_id"], body["customer"], text)
        elif message.message_type == "NotifyCustomer":
            body = read_json(message, "order_id", "customer", "reason")
            text = f"order {body['order_id']} is on hold: {body['reason']}"
            notify(message, body["order_id"], body["customer"], text)
            if host.metadata().reply_to is not None:
                answer = {"order_id": body["order_id"], "notified": True}
                host.reply(Response(json.dumps(answer).encode(), "application/json", []))
        else:
            raise permanent(f"notices does not handle {message.message_type}", "unknown-type")
