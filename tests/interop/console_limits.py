"""Drives a Switchyard web console the way a client that is neither a
browser nor ours would: every form field, query and path at and past its
limit, with the standard library's plain HTTP client.

Exits 0 and prints "ok" when the console answered every request as it
should; otherwise prints what it got and exits 1. It resolves the record
RECORD_ID (with a note far past the note's limit) as its last act.

Usage: console_limits.py BASE_URL TOKEN RECORD_ID MESSAGE_ID
"""

import http.client
import sys
import urllib.parse

LOGIN_LIMIT = 4096
FORM_LIMIT = 1 << 20


def main():
    base, token, record, message_id = sys.argv[1:5]
    where = urllib.parse.urlsplit(base)
    failures = []

    def request(method, path, body=None, session=None, headers=None):
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        sent = dict(headers or {})
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        if session is not None:
            sent["Cookie"] = "switchyard_session=" + session
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
            got = {k.lower(): v for k, v in response.getheaders()}
            return response.status, got, text
        except (ConnectionError, http.client.HTTPException) as e:
            # A server may close the connection on a body it will not read;
            # that is an answer too, as long as nothing changed.
            return None, {}, str(e)
        finally:
            connection.close()

    def check(name, ok, detail):
        if not ok:
            failures.append(f"{name}: {detail}")

    def form(pairs, pad_to=None):
        body = urllib.parse.urlencode(pairs)
        if pad_to is not None:
            body += "&pad=" + "x" * (pad_to - len(body) - len("&pad="))
            assert len(body) == pad_to
        return body

    # Sign-in: a form exactly at the limit is read; one byte more is not.
    status, headers, text = request(
        "POST", "/ui/login", form([("token", token), ("next", "/ui")], pad_to=LOGIN_LIMIT)
    )
    check("a sign-in form at the limit", status == 303 and "set-cookie" in headers, (status, text[:300]))
    session = headers.get("set-cookie", "").split(";")[0].partition("=")[2]
    status, headers, text = request(
        "POST", "/ui/login", form([("token", token), ("next", "/ui")], pad_to=LOGIN_LIMIT + 1)
    )
    check("a sign-in form past the limit", status in (413, None) and "set-cookie" not in headers, (status, text[:300]))
    status, headers, text = request("POST", "/ui/login", form([("token", "t" * 4000)]))
    check("a wrong token of 4,000 bytes", status == 401 and "set-cookie" not in headers, (status, text[:300]))
    # A cookie of 8,000 bytes that is no session opens nothing.
    status, headers, _ = request("GET", "/ui", session="s" * 8000)
    check("a forged 8,000-byte session", status == 303 and headers.get("location", "").startswith("/ui/login"), status)
    status, headers, _ = request("GET", "/ui", headers={"Cookie": "switchyard_session"})
    check("a cookie without a value", status == 303, status)

    if not session:
        print("\n".join(failures + ["no session: the rest cannot be tried"]))
        return 1
    status, _, page = request("GET", "/ui", session=session)
    csrf = page.partition('name="csrf" value="')[2].partition('"')[0]
    check("the overview", status == 200 and csrf, (status, page[:300]))

    # Paths and queries at and past any sensible length, and bytes that
    # are not UTF-8: a page that says so, never a server error.
    for path in [
        "/ui/dead-letters/" + "a" * 300,
        "/ui/dead-letters/%00%C3%28",
        "/ui/sagas/" + "p" * 300 + "/" + "i" * 300,
        "/ui/sagas/fulfilment/%FF",
        "/ui/" + "z" * 2000,
    ]:
        status, _, text = request("GET", path, session=session)
        check(f"GET {path[:40]}...", status in (400, 404), (status, text[:200]))
    status, _, text = request(
        "GET", "/ui/messages?q=" + urllib.parse.quote(message_id), session=session
    )
    check(
        "the journey of a message whose id is at the limit",
        status == 200 and message_id in text and "dead-lettered in orders" in text,
        (status, text[:500]),
    )
    status, _, text = request("GET", "/ui/messages?q=" + "x" * 8000, session=session)
    check("a search of 8,000 bytes", status == 200 and "Nothing is known of" in text, (status, text[:300]))
    query = urllib.parse.quote("a" * 200 + "=" + "b" * 200)
    status, _, text = request("GET", "/ui/messages?q=" + query, session=session)
    check("an attribute search of 200-byte name and value", status == 200 and "No plugin set" in text, (status, text[:300]))
    status, _, text = request("GET", "/ui/dead-letters?status=" + "q" * 300 + "&fingerprint=" + "f" * 300, session=session)
    check("a dead-letter list with unknown filters", status in (200, 400), (status, text[:300]))

    # Forms past the limit change nothing; a group that does not exist
    # replays nothing.
    status, _, text = request(
        "POST",
        f"/ui/dead-letters/{record}/edit",
        form([("csrf", csrf), ("payload", "{}")], pad_to=FORM_LIMIT + 1),
        session=session,
    )
    check("an edit form past the limit", status in (413, None), (status, text[:300]))
    status, _, text = request("GET", f"/ui/dead-letters/{record}", session=session)
    check(
        "the record after the refused edit",
        status == 200 and '<span class="status">dead</span>' in text,
        (status, text[:300]),
    )
    status, headers, text = request(
        "POST",
        "/ui/dead-letters/replay",
        form([("csrf", csrf), ("fingerprint", "f" * 300)]),
        session=session,
    )
    check("replaying a group that does not exist", status == 303, (status, text[:300]))
    status, _, text = request("GET", "/ui/dead-letters?status=all", session=session)
    check("the flash after it", "0 replayed." in text, text[:300])

    # A note of 10,000 characters with markup: resolved, clipped, escaped.
    note = "<b>" + "n" * 10000
    status, _, text = request(
        "POST",
        f"/ui/dead-letters/{record}/resolve",
        form([("csrf", csrf), ("note", note)]),
        session=session,
    )
    check("resolving with a long note", status == 303, (status, text[:300]))
    status, _, text = request("GET", f"/ui/dead-letters/{record}", session=session)
    check("the note escaped", "&lt;b&gt;nnn" in text and "<b>nnn" not in text, text[:300])

    if failures:
        print("\n".join(failures))
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
