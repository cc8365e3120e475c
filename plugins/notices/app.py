"""The `notices` plugin, written in Python: tells customers what happened.

- consumes the `ReceiptSigned` event: the customer gets their receipt;
- handles the `NotifyCustomer` command: the customer is told why their
  order is held, and the sender gets a reply when it asked for one.

Each notice is published as a `CustomerNotified` event, stamped with the
time it was sent (the wall clock, granted in the pipeline) and sent over the
channel named by the `NOTICE_CHANNEL` environment variable (`email` unless
the pipeline's grants say otherwise).

With `MAIL_API_URL` set, each notice is handed to that mail service with
`POST {MAIL_API_URL}/messages` over `wasi:http` (keyed by the message id, so
a retried message is not mailed twice): a 429 or 5xx answer, or a service
that cannot be reached, is a transient failure (the host retries); any
other refusal is permanent. Without it the plugin stands in for the mail
server, which is "busy" on the first attempt for the customer `flaky`.

A payload that is not the expected JSON is refused for good (a permanent
failure: dead-lettered, never retried).

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

# The world also imports `wasi:http`, whose `types` takes the plain name.
from wit_world.imports.switchyard_plugin_types import (
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

import wasi_http

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


def mail(message, api, channel, order_id, customer, text):
    """Hands the notice to the mail service at `api`."""
    url = f"{api.rstrip('/')}/messages"
    body = {"to": customer, "channel": channel, "order_id": order_id, "text": text}
    headers = {"content-type": "application/json", "idempotency-key": message.id}
    try:
        response = wasi_http.request("POST", url, headers, json.dumps(body).encode())
    except wasi_http.HttpFailure as e:
        fail = transient if e.transient else permanent
        raise fail(e.message, e.code, order_id=order_id)
    said = response.body[:200].decode("utf-8", "replace")
    if response.status == 429 or response.status >= 500:
        raise transient(
            f"the mail service answered {response.status}: {said}", "mail-busy", order_id=order_id
        )
    if response.status >= 300:
        raise permanent(
            f"the mail service refused the notice ({response.status}): {said}",
            "mail-refused",
            order_id=order_id,
        )


def notify(message, order_id, customer, text):
    # Read per message: module-level code runs once, when the component is built.
    channel = os.environ.get("NOTICE_CHANNEL", "email")
    api = os.environ.get("MAIL_API_URL")
    if api:
        mail(message, api, channel, order_id, customer, text)
    elif customer == "flaky" and message.attempt == 1:
        raise transient("mail server busy, try again", "mail-busy", customer=customer)
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
