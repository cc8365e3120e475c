"""A client of our own neither writing nor reading through Switchyard: sends
`Echo` commands to a pipeline's exchange with pika at a steady pace, each
with a reply-to queue of its own, and counts the replies that come back.

Prints one JSON object: how many were sent, how many distinct commands got
a reply, replies beyond the first for a command, and replies whose body was
not the command's.

Usage: steady_commands.py AMQP_URL EXCHANGE COUNT INTERVAL_MS
"""

import json
import sys
import time
import uuid
from datetime import datetime, timezone

import pika


def main():
    url, exchange, count, interval_ms = sys.argv[1:5]
    count, interval = int(count), int(interval_ms) / 1000
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    replies = channel.queue_declare("", exclusive=True).method.queue

    sent = {}
    answered = {}
    duplicates = 0
    mismatched = 0

    def on_reply(ch, method, props, payload):
        nonlocal duplicates, mismatched
        cause = (props.headers or {}).get("cloudEvents:causationid")
        cause = cause.decode() if isinstance(cause, bytes) else cause
        if cause in answered:
            duplicates += 1
        elif cause in sent:
            answered[cause] = True
            if json.loads(payload) != sent[cause]:
                mismatched += 1
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(replies, on_reply)
    for n in range(count):
        command_id = str(uuid.uuid4())
        body = {"n": n, "from": "pika"}
        sent[command_id] = body
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=command_id,
            reply_to=replies,
            headers={
                "cloudEvents:specversion": "1.0",
                "cloudEvents:id": command_id,
                "cloudEvents:type": "Echo",
                "cloudEvents:source": "urn:example:steady-client",
                "cloudEvents:time": datetime.now(timezone.utc).isoformat(),
            },
        )
        channel.basic_publish(exchange, "Echo", json.dumps(body), properties, mandatory=True)
        connection.process_data_events(time_limit=interval)
    deadline = time.monotonic() + 60
    while len(answered) < count and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    connection.close()
    print(
        json.dumps(
            {
                "sent": count,
                "answered": len(answered),
                "duplicates": duplicates,
                "mismatched": mismatched,
            }
        )
    )


if __name__ == "__main__":
    main()
