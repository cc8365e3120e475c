"""HTTP requests from a Python plugin, over `wasi:http/outgoing-handler`.

A plugin has no sockets: the host makes the request for it, to the origins
its `http` grant lists, under the message's deadline. `request` waits for
the whole response, like `urllib.request.urlopen` would:

    response = request("POST", url, {"content-type": "application/json"}, body)
    if response.status >= 500: ...

A request that gets no response raises `HttpFailure`, whose `code` is the
same as the Rust SDK's (`http-denied`, `http-connect`, `http-timeout`,
`http-tls`, `http-too-large`, `http-invalid-request`, `http-protocol`) and
whose `transient` says whether trying again can help: a request the host
refuses, or one that is malformed, fails the same way every time.

The plugin is built against its world merged with `wasi:http/imports` (see
docs/guides/python.md), which is why the plugin's own types module is
`switchyard_plugin_types` there: both packages name an interface `types`.
"""

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from componentize_py_types import Err
from wit_world.imports import outgoing_handler
from wit_world.imports import wasi_http_types as http
from wit_world.imports.streams import StreamError_Closed

# Bytes written or read per stream call.
CHUNK = 4096

METHODS = {
    "GET": http.Method_Get(),
    "HEAD": http.Method_Head(),
    "POST": http.Method_Post(),
    "PUT": http.Method_Put(),
    "DELETE": http.Method_Delete(),
    "PATCH": http.Method_Patch(),
    "OPTIONS": http.Method_Options(),
}


@dataclass
class Response:
    status: int
    headers: list = field(default_factory=list)
    body: bytes = b""

    def header(self, name):
        """The first value of header `name` (any case), or None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class HttpFailure(Exception):
    """A request that got no response: refused, unreachable, too slow, ..."""

    def __init__(self, code, message, transient):
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient


def _kind(code):
    """The SDK's code and whether retrying can help, for a WASI error-code."""
    name = type(code).__name__.removeprefix("ErrorCode_")
    if name == "HttpRequestDenied":
        return "http-denied", False
    if name in ("DnsTimeout", "ConnectionTimeout", "ConnectionReadTimeout",
                "ConnectionWriteTimeout", "HttpResponseTimeout"):
        return "http-timeout", True
    if name in ("DnsError", "DestinationNotFound", "DestinationUnavailable",
                "DestinationIpProhibited", "DestinationIpUnroutable", "ConnectionRefused",
                "ConnectionTerminated", "ConnectionLimitReached"):
        return "http-connect", True
    if name in ("TlsProtocolError", "TlsCertificateError", "TlsAlertReceived"):
        return "http-tls", True
    if name == "HttpResponseBodySize":
        return "http-too-large", True
    if name in ("HttpRequestMethodInvalid", "HttpRequestUriInvalid", "HttpRequestUriTooLong",
                "HttpRequestHeaderSize", "HttpRequestHeaderSectionSize"):
        return "http-invalid-request", False
    return "http-protocol", True


def _failed(method, url, code):
    kind, transient = _kind(code)
    if kind == "http-denied":
        why = "refused by the host: the origin is not in the plugin's `http` grant"
    else:
        why = type(code).__name__.removeprefix("ErrorCode_")
    return HttpFailure(kind, f"{method} {url}: {why}", transient)


def _invalid(method, url, why):
    return HttpFailure("http-invalid-request", f"{method} {url}: {why}", False)


def request(method, url, headers=None, body=b""):
    """Sends one request and returns its `Response` with the whole body."""
    method = method.upper()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _invalid(method, url, "not an http or https URL")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    fields = http.Fields()
    try:
        for name, value in (headers or {}).items():
            fields.append(name, value.encode() if isinstance(value, str) else value)
        if body or method not in ("GET", "HEAD"):
            # The length is known: said up front rather than sent chunked.
            if not any(k.lower() == "content-length" for k in (headers or {})):
                fields.append("content-length", str(len(body)).encode())
    except Err as e:
        raise _invalid(method, url, f"a header is not allowed: {e.value}")
    outgoing = http.OutgoingRequest(fields)
    try:
        outgoing.set_method(METHODS.get(method, http.Method_Other(method)))
        outgoing.set_scheme(http.Scheme_Https() if parts.scheme == "https" else http.Scheme_Http())
        outgoing.set_authority(parts.netloc)
        outgoing.set_path_with_query(path)
    except Err:
        raise _invalid(method, url, "not a valid request")
    outgoing_body = outgoing.body()
    try:
        future = outgoing_handler.handle(outgoing, None)
    except Err as e:
        raise _failed(method, url, e.value)
    # A request the host refuses stops taking its body: the response's
    # error then says why, not the failed write.
    with outgoing_body.write() as stream:
        for at in range(0, len(body), CHUNK):
            try:
                stream.blocking_write_and_flush(body[at:at + CHUNK])
            except Err:
                break
    try:
        http.OutgoingBody.finish(outgoing_body, None)
    except Err:
        pass
    with future:
        with future.subscribe() as ready:
            ready.block()
        answer = future.get()
    if answer is None or isinstance(answer, Err):
        raise HttpFailure("http-protocol", f"{method} {url}: no response", True)
    if isinstance(answer.value, Err):
        raise _failed(method, url, answer.value.value)
    with answer.value.value as incoming:
        with incoming.headers() as fields:
            entries = fields.entries()
        response = Response(
            incoming.status(), [(k, v.decode("utf-8", "replace")) for k, v in entries]
        )
        incoming_body = incoming.consume()
        response.body = _read(method, url, incoming_body)
    return response


def _read(method, url, incoming_body):
    chunks = []
    with incoming_body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(CHUNK * 16))
            except Err as e:
                if isinstance(e.value, StreamError_Closed):
                    break
                code = http.http_error_code(e.value.value)
                if code is not None:
                    raise _failed(method, url, code)
                raise HttpFailure("http-protocol", f"{method} {url}: reading the response failed", True)
    with http.IncomingBody.finish(incoming_body):
        pass
    return b"".join(chunks)
