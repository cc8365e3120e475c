"""Messages at and past every field limit, sent to a Switchyard pipeline by
an independent RabbitMQ client (pika), as another team's service might.

Publishes PlaceOrder commands to the pipeline's exchange: some at the limit
of a field (to be handled once), some past it or otherwise unacceptable (to
be dead-lettered, never handled), all in one burst so that they share
batches. Prints {"handled": [ids], "refused": {id: field}} as JSON.

Usage: pika_limits.py AMQP_URL EXCHANGE
"""

import json
import random
import string
import sys
import uuid

import pika


def main():
    url, exchange = sys.argv[1:3]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    handled, refused = [], {}

    def order(order_id):
        return json.dumps(
            {
                "order_id": order_id,
                "customer": "grace",
                "items": [{"sku": "lamp", "quantity": 1, "unit_price_cents": 100}],
            }
        )

    def send(outcome, field, ce=None, message_id=None, reply_to=None, extra=None):
        ce_id = str(uuid.uuid4())
        headers = {
            "cloudEvents:specversion": "1.0",
            "cloudEvents:id": ce_id,
            "cloudEvents:type": "PlaceOrder",
            "cloudEvents:source": "urn:example:pika-limits",
        }
        headers.update(ce or {})
        headers.update(extra or {})
        shown = headers["cloudEvents:id"]
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            reply_to=reply_to,
            headers=headers,
        )
        channel.basic_publish(exchange, "PlaceOrder", order(field), properties)
        if outcome == "handled":
            handled.append(shown)
        else:
            refused[shown] = field

    # A well-formed order first and last: it must be handled once, whatever
    # shares its batch.
    send("handled", "plain")
    # The reply address, at and past AMQP's 255 bytes.
    send("handled", "reply-to-255", ce={"cloudEvents:syreplyto": "r" * 255})
    send("refused", "reply-to-300", ce={"cloudEvents:syreplyto": "r" * 300})
    # A reply address naming one of the pipeline's own queues.
    send("refused", "reply-to-own-queue", reply_to=exchange + ".payments")
    # The id, at and past 255 bytes, and with a control character.
    send("handled", "id-255", ce={"cloudEvents:id": "i" * 255})
    send("refused", "id-256", ce={"cloudEvents:id": "i" * 256})
    send("refused", "id-control", ce={"cloudEvents:id": "bad\nid-" + str(uuid.uuid4())})
    # The type: not a type name, and a name the route does not take.
    noise = "".join(random.choice(string.ascii_letters) for _ in range(4800))
    send("refused", "type-4800", ce={"cloudEvents:type": noise})
    send("refused", "type-not-taken", ce={"cloudEvents:type": "Refund"})
    # A command that calls itself an event.
    send("refused", "kind-event", ce={"cloudEvents:sykind": "event"})
    # Headers: at and past the count limit.
    send("handled", "headers-128", extra={"h%d" % i: "v" for i in range(128)})
    send("refused", "headers-129", extra={"h%d" % i: "v" for i in range(129)})
    # An attempt history planted by the sender: ignored, handled as new.
    planted = json.dumps(
        [
            {
                "number": n,
                "started_at_ms": 1,
                "duration_us": 1,
                "error_kind": "transient",
                "error": "planted",
                "plugin": "orders@1.0.0",
                "then": "retry-later",
            }
            for n in range(1, 4)
        ]
    )
    send(
        "handled",
        "planted-history",
        ce={"cloudEvents:syattempt": "99", "cloudEvents:syhistory": planted},
    )
    send("handled", "plain-last")
    print(json.dumps({"handled": handled, "refused": refused}))
    connection.close()


if __name__ == "__main__":
    main()
