"""Drives a Switchyard ingress the way a web client that is not ours would,
with the standard library's plain HTTP client: commands and events, plain
JSON and CloudEvents in both modes, every header at and past its limit,
each refusal with its status.

The pipeline behind BASE_URL must route the command PlaceOrder (with a
JSON Schema that requires order_id, customer and items) to the example
`orders` plugin, which replies, and take the event OrderPlaced.

Prints one line "ids <id> <id> ..." (the messages it made durable under
ids it chose) and then "ok" when every answer was right; otherwise prints
what it got and exits 1.

Usage: ingress_client.py BASE_URL TOKEN MAX_BODY
"""

import http.client
import json
import sys
import urllib.parse

MAX_ID = 255


def main():
    base, token, max_body = sys.argv[1], sys.argv[2], int(sys.argv[3])
    where = urllib.parse.urlsplit(base)
    failures = []
    chosen_ids = []

    def request(method, path, body=b"", headers=None, auth=True):
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        sent = {"Content-Type": "application/json"}
        if auth:
            sent["Authorization"] = "Bearer " + token
        sent.update(headers or {})
        if isinstance(body, str):
            body = body.encode()
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            got = {k.lower(): v for k, v in response.getheaders()}
            return response.status, got, data
        finally:
            connection.close()

    def expect(what, status, got_status, data, check=None):
        if got_status != status:
            failures.append(f"{what}: wanted {status}, got {got_status}: {data[:300]!r}")
            return None
        if check is not None:
            try:
                problem = check(data)
            except Exception as e:  # a body that does not parse is a failure too
                problem = f"{type(e).__name__}: {e}"
            if problem:
                failures.append(f"{what}: {problem}: {data[:300]!r}")
        return data

    order = {
        "order_id": "A-1",
        "customer": "ada",
        "items": [{"sku": "book", "quantity": 2, "unit_price_cents": 1200}],
    }

    # A command answered by its handler's reply.
    status, headers, data = request(
        "POST", "/commands/PlaceOrder", json.dumps(order), {"Prefer": "wait=30"}
    )
    expect(
        "a command with a reply",
        200,
        status,
        data,
        lambda d: None
        if json.loads(d).get("order_id") == "A-1"
        and json.loads(d).get("total_cents") == 2400
        and headers.get("switchyard-message-id")
        else "not the orders plugin's reply",
    )

    # Not waiting: durable, and the id to follow it by.
    status, _, data = request(
        "POST", "/commands/PlaceOrder", json.dumps(order), {"Prefer": "respond-async"}
    )
    expect(
        "respond-async",
        202,
        status,
        data,
        lambda d: None if json.loads(d).get("status") == "accepted" and json.loads(d)["id"] else "no id",
    )

    # An event.
    placed = {"order_id": "E-1", "customer": "ada", "items": [], "total_cents": 0}
    status, _, data = request("POST", "/events/OrderPlaced", json.dumps(placed))
    expect("an event", 202, status, data)

    # Tokens.
    status, headers, data = request("POST", "/events/OrderPlaced", json.dumps(placed), auth=False)
    expect("no token", 401, status, data)
    if headers.get("www-authenticate") != "Bearer":
        failures.append(f"no token: no WWW-Authenticate: Bearer, got {headers}")
    status, _, data = request(
        "POST", "/events/OrderPlaced", json.dumps(placed), {"Authorization": "Bearer " + token + "x"}
    )
    expect("a wrong token", 401, status, data)
    status, _, data = request(
        "POST", "/events/OrderPlaced", json.dumps(placed), {"Authorization": "Bearer " + "t" * 4000}
    )
    expect("a 4,000-byte wrong token", 401, status, data)

    # Types and kinds.
    status, _, data = request("POST", "/commands/NoSuchThing", "{}")
    expect("an unknown command", 404, status, data, lambda d: None if "PlaceOrder" in json.loads(d)["error"] else "does not name the commands there are")
    status, _, data = request("POST", "/commands/OrderPlaced", json.dumps(placed))
    expect("an event posted as a command", 409, status, data)
    status, _, data = request("POST", "/events/PlaceOrder", json.dumps(order))
    expect("a command posted as an event", 409, status, data)
    status, _, data = request("POST", "/commands/Place%20Order", "{}")
    expect("a type name with a space", 400, status, data)
    status, _, data = request("POST", "/commands/" + "A" * 2000, "{}")
    if status not in (400, 404, 414, 431):
        failures.append(f"a 2,000-byte type: got {status}")
    status, _, data = request("GET", "/commands/PlaceOrder")
    expect("GET", 405, status, data)
    status, _, data = request("POST", "/somewhere", "{}")
    expect("another path", 404, status, data)

    # Bodies.
    status, _, data = request("POST", "/commands/PlaceOrder", "{not json")
    expect("a body that is not JSON", 400, status, data)
    status, _, data = request(
        "POST", "/commands/PlaceOrder", json.dumps({"order_id": "B-1", "items": []})
    )
    expect(
        "a payload that breaks the schema",
        400,
        status,
        data,
        lambda d: None if "customer" in json.loads(d)["error"] else "no schema complaint",
    )
    text = json.dumps(order)
    padded = text[:-1] + " " * (max_body - len(text)) + "}"
    assert len(padded.encode()) == max_body
    status, _, data = request("POST", "/commands/PlaceOrder", padded, {"Prefer": "respond-async"})
    expect("a body of exactly max_body", 202, status, data)
    status, _, data = request("POST", "/commands/PlaceOrder", padded + " ", {"Prefer": "respond-async"})
    expect("a body one byte past max_body", 413, status, data)

    # Ids the client chooses.
    key = "k" * MAX_ID
    status, _, data = request(
        "POST", "/commands/PlaceOrder", json.dumps(order), {"Prefer": "respond-async", "Idempotency-Key": key}
    )
    if expect("an Idempotency-Key of 255 bytes", 202, status, data, lambda d: None if json.loads(d)["id"] == key else "not its id") is not None:
        chosen_ids.append(key)
    # A retry under the same id is not a second message.
    status, _, data = request(
        "POST", "/commands/PlaceOrder", json.dumps(order), {"Prefer": "respond-async", "Idempotency-Key": key}
    )
    expect("a retry under the same Idempotency-Key", 202, status, data, lambda d: None if json.loads(d)["status"] == "duplicate" else "sent again")
    status, _, data = request(
        "POST", "/events/OrderPlaced", json.dumps(placed), {"Idempotency-Key": "event-twice"}
    )
    expect("an event with an Idempotency-Key", 202, status, data, lambda d: None if json.loads(d)["status"] == "accepted" else "not accepted")
    status, _, data = request(
        "POST", "/events/OrderPlaced", json.dumps(placed), {"Idempotency-Key": "event-twice"}
    )
    expect("the same event again", 202, status, data, lambda d: None if json.loads(d)["status"] == "duplicate" else "published again")
    status, _, data = request(
        "POST", "/commands/PlaceOrder", json.dumps(order), {"Prefer": "respond-async", "Idempotency-Key": key + "k"}
    )
    expect("an Idempotency-Key of 256 bytes", 400, status, data)
    status, _, data = request(
        "POST", "/commands/PlaceOrder", json.dumps(order), {"Prefer": "respond-async", "Idempotency-Key": "caf\u00e9"}
    )
    expect("an Idempotency-Key that is not ASCII", 400, status, data)
    status, _, data = request(
        "POST", "/commands/PlaceOrder", json.dumps(order), {"Prefer": "wait=soon"}
    )
    expect("Prefer: wait=soon", 400, status, data)

    # CloudEvents, binary mode.
    ce = {
        "ce-specversion": "1.0",
        "ce-id": "ce-binary-1",
        "ce-type": "PlaceOrder",
        "ce-source": "/tests/interop",
        "ce-correlationid": "flow-ce-1",
        "Prefer": "respond-async",
    }
    status, _, data = request("POST", "/commands/PlaceOrder", json.dumps(order), ce)
    if expect("a binary-mode CloudEvent", 202, status, data, lambda d: None if json.loads(d)["id"] == "ce-binary-1" else "not its id") is not None:
        chosen_ids.append("ce-binary-1")
    status, _, data = request("POST", "/commands/PlaceOrder", json.dumps(order), dict(ce, **{"ce-type": "CancelOrder"}))
    expect("a CloudEvent of another type", 400, status, data)
    status, _, data = request("POST", "/commands/PlaceOrder", json.dumps(order), dict(ce, **{"ce-specversion": "0.3"}))
    expect("a CloudEvent of version 0.3", 400, status, data)

    # CloudEvents, structured mode, answered by the reply.
    event = {
        "specversion": "1.0",
        "id": "ce-structured-1",
        "type": "PlaceOrder",
        "source": "/tests/interop",
        "datacontenttype": "application/json",
        "data": dict(order, order_id="S-1"),
    }
    status, _, data = request(
        "POST",
        "/commands/PlaceOrder",
        json.dumps(event),
        {"Content-Type": "application/cloudevents+json", "Prefer": "wait=30"},
    )
    if expect("a structured CloudEvent", 200, status, data, lambda d: None if json.loads(d).get("order_id") == "S-1" else "not its reply") is not None:
        chosen_ids.append("ce-structured-1")
    status, _, data = request(
        "POST",
        "/commands/PlaceOrder",
        json.dumps(dict(event, data={"order_id": "S-2"})),
        {"Content-Type": "application/cloudevents+json"},
    )
    expect("a structured CloudEvent whose data breaks the schema", 400, status, data)

    print("ids " + " ".join(chosen_ids))
    if failures:
        for f in failures:
            print(f)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
