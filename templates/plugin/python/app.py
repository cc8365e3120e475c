"""The `{{name}}` plugin, in Python: greets whoever asks.

- It handles the `Greet` command (`{"name": "ada"}`): it replies with a
  greeting and publishes a `Greeted` event.
- It consumes the `Greeted` event and writes it to the host's log.

A payload that is not the expected JSON fails for good (a permanent error:
the host dead-letters it and never retries it).
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    ErrorDetails,
    HandlerError_Permanent,
    Kind,
    LogLevel,
    Message,
    Outgoing,
    PluginInfo,
    Response,
    Subscription,
)


def permanent(text, code):
    return Err(HandlerError_Permanent(ErrorDetails(text, code, [])))


def read_name(message, field):
    """The payload's `field`, a non-empty string, or a permanent error."""
    try:
        body = json.loads(message.payload)
    except (ValueError, RecursionError) as e:
        raise permanent(f"{message.message_type} payload is not JSON: {e}", "malformed-payload")
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, str) or value == "":
        raise permanent(
            f"{message.message_type} needs a non-empty string `{field}`", "malformed-payload"
        )
    return body


class Handler(exports.Handler):
    def describe(self) -> PluginInfo:
        return PluginInfo(
            "{{name}}",
            "0.1.0",
            [Subscription("Greet", Kind.COMMAND), Subscription("Greeted", Kind.EVENT)],
            ["Greeted"],
            [],
        )

    def handle(self, message: Message) -> None:
        if message.message_type == "Greet":
            name = read_name(message, "name")["name"]
            greeting = f"Hello, {name}!"
            # Held until the handler returns: a failed attempt publishes
            # and replies nothing.
            event = json.dumps({"name": name, "greeting": greeting}).encode()
            host.publish(Outgoing("Greeted", event, "application/json", [], None))
            answer = json.dumps({"greeting": greeting}).encode()
            host.reply(Response(answer, "application/json", []))
        elif message.message_type == "Greeted":
            body = read_name(message, "name")
            host.log(LogLevel.INFO, f"{body['name']} was greeted: {body.get('greeting')}")
        else:
            raise permanent(f"{{name}} does not handle {message.message_type}", "unknown-type")
