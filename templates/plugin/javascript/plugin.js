// The `{{name}}` plugin, in JavaScript: greets whoever asks.
//
// - It handles the `Greet` command (`{"name": "ada"}`): it replies with a
//   greeting and publishes a `Greeted` event.
// - It consumes the `Greeted` event and writes it to the host's log.
//
// A payload that is not the expected JSON fails for good (a permanent
// error: the host dead-letters it and never retries it).

import { log, publish, reply } from "switchyard:plugin/host@{{wit_version}}";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function permanent(message, code) {
  return { tag: "permanent", val: { message, code, details: [] } };
}

// The payload as an object whose `field` is a non-empty string, or a
// permanent error.
function readBody(message, field) {
  let body;
  try {
    body = JSON.parse(decoder.decode(message.payload));
  } catch (e) {
    throw permanent(`${message.messageType} payload is not JSON: ${e.message}`, "malformed-payload");
  }
  if (typeof body?.[field] !== "string" || body[field] === "") {
    throw permanent(`${message.messageType} needs a non-empty string \`${field}\``, "malformed-payload");
  }
  return body;
}

function json(value) {
  return encoder.encode(JSON.stringify(value));
}

export const handler = {
  describe() {
    return {
      name: "{{name}}",
      version: "0.1.0",
      handles: [
        { messageType: "Greet", kind: "command" },
        { messageType: "Greeted", kind: "event" },
      ],
      publishes: ["Greeted"],
      sends: [],
    };
  },

  handle(message) {
    if (message.messageType === "Greet") {
      const { name } = readBody(message, "name");
      const greeting = `Hello, ${name}!`;
      // Held until the handler returns: a failed attempt publishes and
      // replies nothing.
      publish({
        messageType: "Greeted",
        payload: json({ name, greeting }),
        contentType: "application/json",
        headers: [],
        partitionKey: undefined,
      });
      reply({ payload: json({ greeting }), contentType: "application/json", headers: [] });
    } else if (message.messageType === "Greeted") {
      const body = readBody(message, "name");
      log("info", `${body.name} was greeted: ${body.greeting}`);
    } else {
      throw permanent(`{{name}} does not handle ${message.messageType}`, "unknown-type");
    }
  },
};
