// The `fetcher` test plugin, in JavaScript: calls HTTP with the web's
// `fetch`, which ComponentizeJS implements over `wasi:http`.
//
// The command `Fetch` ({url, method, body}) is answered with the response
// ({status, body}). A request that fails (refused by the host, a
// connection that fails) is a transient failure with code `fetch-failed`
// and the error's text.

import { reply } from "switchyard:plugin/host@0.2.2";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function failure(kind, message, code) {
  return { tag: kind, val: { message, code, details: [] } };
}

export const handler = {
  describe() {
    return {
      name: "fetcher",
      version: "1.0.0",
      handles: [{ messageType: "Fetch", kind: "command" }],
      publishes: [],
      sends: [],
    };
  },

  // An async handler: the engine runs its event loop until the promise
  // settles, so `await fetch(...)` works inside one call.
  async handle(message) {
    const call = JSON.parse(decoder.decode(message.payload));
    let response;
    let text;
    try {
      response = await fetch(call.url, {
        method: call.method ?? "GET",
        headers: { "content-type": "application/json" },
        body: call.body ?? undefined,
      });
      text = await response.text();
    } catch (e) {
      throw failure("transient", `fetch ${call.url} failed: ${e}`, "fetch-failed");
    }
    reply({
      payload: encoder.encode(JSON.stringify({ status: response.status, body: text })),
      contentType: "application/json",
      headers: [],
    });
  },
};
