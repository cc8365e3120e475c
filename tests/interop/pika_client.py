"""An independent RabbitMQ client (pika) talking to a Switchyard pipeline.

Sends a PlaceOrder command with the documented CloudEvents headers and a
reply-to queue, listens to the OrderPlaced events the pipeline publishes,
and prints what came back as one JSON object on stdout.

Usage: pika_client.py AMQP_URL EXCHANGE ORDER_ID
"""

import json
import sys
import time
import uuid
from datetime import datetime, timezone

import pika


def header_text(headers):
    out = {}
    for key, value in (headers or {}).items():
        out[key] = value.decode() if isinstance(value, bytes) else value
    return out


def main():
    url, exchange, order_id = sys.argv[1:4]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()

    # A queue of our own for the events: bound before the command goes out.
    events = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(events, exchange, routing_key="OrderPlaced")
    replies = channel.queue_declare("", exclusive=True).method.queue

    command_id = str(uuid.uuid4())
    body = json.dumps(
        {
            "order_id": order_id,
            "customer": "grace",
            "items": [{"sku": "lamp", "quantity": 2, "unit_price_cents": 1999}],
        }
    )
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=command_id,
        correlation_id="pika-" + order_id,
        reply_to=replies,
        headers={
            "cloudEvents:specversion": "1.0",
            "cloudEvents:id": command_id,
            "cloudEvents:type": "PlaceOrder",
            "cloudEvents:source": "urn:example:pika-client",
            "cloudEvents:time": datetime.now(timezone.utc).isoformat(),
            "tenant": "acme",
        },
    )
    channel.basic_publish(exchange, "PlaceOrder", body, properties, mandatory=True)

    seen = {"command_id": command_id}

    def keep(name):
        def on_message(ch, method, props, payload):
            seen[name] = {
                "routing_key": method.routing_key,
                "content_type": props.content_type,
                "correlation_id": props.correlation_id,
                "message_id": props.message_id,
                "headers": header_text(props.headers),
                "body": json.loads(payload),
            }
            ch.basic_ack(method.delivery_tag)

        return on_message

    channel.basic_consume(replies, keep("reply"))
    channel.basic_consume(events, keep("event"))
    deadline = time.monotonic() + 30
    while ("reply" not in seen or "event" not in seen) and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    connection.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
