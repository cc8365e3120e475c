"""Drives a Switchyard ingress over HTTPS with the CNCF CloudEvents SDK for
Python (the `cloudevents` package from PyPI), the way a producer that
speaks CloudEvents would: binary and structured mode, a retry under the
same event id, and the tokens of an ingress with one token for every type
and another for the event OrderPlaced only.

The pipeline behind BASE_URL must route the command PlaceOrder to the
example `orders` plugin (which replies) and take the event OrderPlaced;
its certificate must be signed by the CA in CA_FILE.

Prints "ids <id> <id> ..." (the messages it made durable under ids it
chose) and then "ok" when every answer was right; otherwise prints what it
got and exits 1.

Usage: ingress_cloudevents.py BASE_URL CA_FILE TOKEN EVENT_TOKEN
"""

import http.client
import json
import ssl
import sys
import urllib.parse

from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent


def main():
    base, ca_file, token, event_token = sys.argv[1:5]
    where = urllib.parse.urlsplit(base)
    trusted = ssl.create_default_context(cafile=ca_file)
    failures = []
    chosen_ids = []

    def request(path, body, headers, bearer, context=trusted):
        connection = http.client.HTTPSConnection(
            where.hostname, where.port, timeout=60, context=context
        )
        sent = dict(headers)
        if bearer is not None:
            sent["Authorization"] = "Bearer " + bearer
        try:
            connection.request("POST", path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def expect(what, status, got):
        got_status, data = got
        if got_status != status:
            failures.append(f"{what}: wanted {status}, got {got_status}: {data[:300]!r}")
            return None
        return json.loads(data)

    order = {
        "order_id": "CE-1",
        "customer": "ada",
        "items": [{"sku": "book", "quantity": 3, "unit_price_cents": 1200}],
    }

    # Binary mode: ce-* headers, the data as the body. A command, answered
    # by its handler's reply.
    event = CloudEvent(
        {
            "type": "PlaceOrder",
            "source": "/tests/interop/cloudevents",
            "id": "sdk-binary-1",
            "datacontenttype": "application/json",
        },
        order,
    )
    headers, body = to_binary(event)
    reply = expect(
        "a binary-mode command from the SDK",
        200,
        request("/commands/PlaceOrder", body, headers, token),
    )
    if reply is not None:
        chosen_ids.append("sdk-binary-1")
        if reply.get("order_id") != "CE-1" or reply.get("total_cents") != 3600:
            failures.append(f"the binary-mode command's reply is not the orders plugin's: {reply}")

    # The same event sent again (a producer's retry) is not a second message.
    again = expect(
        "the same binary-mode event again",
        202,
        request("/commands/PlaceOrder", body, headers, token),
    )
    if again is not None and (again.get("status") != "duplicate" or again.get("id") != "sdk-binary-1"):
        failures.append(f"a retry under the same id was not a duplicate: {again}")

    # Ids are a type's own: the event's sender, whose token admits only
    # OrderPlaced, cannot use up the command's id (nor learn of it).
    event = CloudEvent(
        {"type": "OrderPlaced", "source": "/tests/interop/cloudevents", "id": "sdk-binary-1"},
        {"order_id": "CE-0", "customer": "eve", "items": [], "total_cents": 0},
    )
    headers, body = to_binary(event)
    other = expect(
        "an event under the command's id, with the event's token",
        202,
        request("/events/OrderPlaced", body, headers, event_token),
    )
    if other is not None and other.get("status") != "accepted":
        failures.append(f"an event under another type's id was not its own message: {other}")

    # Structured mode: the whole event as application/cloudevents+json.
    placed = {"order_id": "CE-2", "customer": "ada", "items": [], "total_cents": 0}
    event = CloudEvent(
        {
            "type": "OrderPlaced",
            "source": "/tests/interop/cloudevents",
            "id": "sdk-structured-1",
            "datacontenttype": "application/json",
        },
        placed,
    )
    headers, body = to_structured(event)
    accepted = expect(
        "a structured-mode event from the SDK, with the event's own token",
        202,
        request("/events/OrderPlaced", body, headers, event_token),
    )
    if accepted is not None:
        if accepted.get("id") == "sdk-structured-1" and accepted.get("status") == "accepted":
            chosen_ids.append("sdk-structured-1")
        else:
            failures.append(f"the structured event was not accepted under its id: {accepted}")

    # The event's token admits that event type only; the token for every
    # type admits the event too.
    order_event = CloudEvent(
        {"type": "PlaceOrder", "source": "/tests/interop/cloudevents", "id": "sdk-binary-2"},
        order,
    )
    headers, body = to_binary(order_event)
    expect(
        "a command with the token of an event type only",
        401,
        request("/commands/PlaceOrder", body, headers, event_token),
    )
    expect("a command with no token", 401, request("/commands/PlaceOrder", body, headers, None))
    event = CloudEvent(
        {"type": "OrderPlaced", "source": "/tests/interop/cloudevents", "id": "sdk-binary-3"},
        dict(placed, order_id="CE-3"),
    )
    headers, body = to_binary(event)
    if expect(
        "an event with the token for every type",
        202,
        request("/events/OrderPlaced", body, headers, token),
    ) is not None:
        chosen_ids.append("sdk-binary-3")

    # Only HTTPS is spoken, and only with a certificate the client trusts.
    try:
        plain = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
        plain.request("POST", "/events/OrderPlaced", body=b"{}", headers={"Authorization": "Bearer " + token})
        status = plain.getresponse().status
        failures.append(f"plain HTTP to the HTTPS ingress was answered {status}")
    except (http.client.HTTPException, OSError):
        pass
    try:
        request("/events/OrderPlaced", b"{}", {}, token, context=ssl.create_default_context())
        failures.append("a client that does not trust the test CA got through")
    except ssl.SSLCertVerificationError:
        pass

    print("ids " + " ".join(chosen_ids))
    if failures:
        for f in failures:
            print(f)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
