// The `receipts` plugin, written in C: signs the receipt of an accepted order.
//
// It handles the `SignReceipt` command: it computes a CRC-32 over
// "<order_id>|<customer>|<total_cents>", publishes a `ReceiptSigned` event
// carrying it, and replies with it when the sender asked for a reply.
//
// The signer is "busy" on the first attempt for the customer `flaky` (a
// transient failure: the host retries); a payload without the expected
// fields is refused for good (a permanent failure: dead-lettered).
//
// Bindings come from `wit-bindgen c` (plugin.h, plugin.c); see
// docs/guides/c.md for the build.

#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

typedef exports_switchyard_plugin_handler_message_t message_t;
typedef exports_switchyard_plugin_handler_handler_error_t handler_error_t;
typedef exports_switchyard_plugin_handler_plugin_info_t plugin_info_t;

// ---- a string field of a flat JSON object ---------------------------------

static size_t skip_space(const uint8_t *json, size_t len, size_t i) {
  while (i < len && (json[i] == ' ' || json[i] == '\t' || json[i] == '\n' || json[i] == '\r')) i++;
  return i;
}

// Skips the string that starts at json[i] (a '"'); returns the index after
// its closing quote, or `len` if it does not end.
static size_t skip_string(const uint8_t *json, size_t len, size_t i) {
  for (i++; i < len; i++) {
    if (json[i] == '\\') {
      i++;
    } else if (json[i] == '"') {
      return i + 1;
    }
  }
  return len;
}

// Skips the value that starts at json[i]: a string, a nested object or
// array (strings inside are skipped whole), or a literal. Returns the index
// after it, or `len` if it does not end.
static size_t skip_value(const uint8_t *json, size_t len, size_t i) {
  if (i < len && json[i] == '"') return skip_string(json, len, i);
  size_t depth = 0;
  while (i < len) {
    uint8_t c = json[i];
    if (c == '"') {
      i = skip_string(json, len, i);
      continue;
    }
    if (c == '{' || c == '[') {
      depth++;
    } else if (c == '}' || c == ']') {
      if (depth == 0) return i;
      depth--;
    } else if (c == ',' && depth == 0) {
      return i;
    }
    i++;
  }
  return len;
}

// Where the value of the top-level field `name` of a JSON object starts, or
// `len` when the payload is not an object or has no such field.
static size_t json_field(const uint8_t *json, size_t len, const char *name) {
  size_t name_len = strlen(name);
  size_t i = skip_space(json, len, 0);
  if (i >= len || json[i] != '{') return len;
  i++;
  for (;;) {
    i = skip_space(json, len, i);
    if (i >= len || json[i] != '"') return len;
    size_t key = i + 1;
    size_t after = skip_string(json, len, i);
    if (after >= len) return len;
    bool match = after - key - 1 == name_len && memcmp(json + key, name, name_len) == 0;
    i = skip_space(json, len, after);
    if (i >= len || json[i] != ':') return len;
    i = skip_space(json, len, i + 1);
    if (match) return i;
    i = skip_space(json, len, skip_value(json, len, i));
    if (i >= len || json[i] != ',') return len;
    i++;
  }
}

// Whether bytes [from, to) are UTF-8: each lead byte followed by as many
// continuation bytes as it announces.
static bool utf8(const uint8_t *s, size_t from, size_t to) {
  size_t i = from;
  while (i < to) {
    uint8_t c = s[i];
    size_t n = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xE ? 2 : (c >> 3) == 0x1E ? 3 : 9;
    if (n == 9 || (n > 0 && i + n >= to)) return false;
    for (size_t k = 1; k <= n; k++) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
    }
    i += n + 1;
  }
  return true;
}

enum field { FIELD_OK, FIELD_MISSING, FIELD_UNSUPPORTED };

// Copies the string value of the top-level field `name` into `out` (at most
// `cap - 1` bytes). This example takes plain strings only: no escapes, no
// control characters, UTF-8, not empty.
static enum field json_string(const uint8_t *json, size_t len, const char *name,
                              char *out, size_t cap) {
  size_t j = json_field(json, len, name);
  if (j >= len || json[j] != '"') return FIELD_MISSING;
  size_t from = ++j;
  while (j < len && json[j] != '"') {
    if (json[j] == '\\' || json[j] < 0x20 || j - from + 1 >= cap) return FIELD_UNSUPPORTED;
    j++;
  }
  if (j >= len || j == from || !utf8(json, from, j)) return FIELD_UNSUPPORTED;
  memcpy(out, json + from, j - from);
  out[j - from] = '\0';
  return FIELD_OK;
}

// Reads the top-level field `name` as a whole number that fits in 64 bits
// (no sign, fraction or exponent).
static bool json_u64(const uint8_t *json, size_t len, const char *name, uint64_t *out) {
  size_t j = json_field(json, len, name);
  if (j >= len || json[j] < '0' || json[j] > '9') return false;
  if (json[j] == '0' && j + 1 < len && json[j + 1] >= '0' && json[j + 1] <= '9') return false;
  uint64_t v = 0;
  while (j < len && json[j] >= '0' && json[j] <= '9') {
    uint64_t digit = (uint64_t)(json[j++] - '0');
    if (v > (UINT64_MAX - digit) / 10) return false;
    v = v * 10 + digit;
  }
  j = skip_space(json, len, j);
  if (j >= len || (json[j] != ',' && json[j] != '}')) return false;
  *out = v;
  return true;
}

// ---- CRC-32 (IEEE 802.3, as zlib computes it) ------------------------------

static uint32_t crc32(const char *data, size_t len) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < len; i++) {
    crc ^= (uint8_t)data[i];
    for (int k = 0; k < 8; k++) {
      crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
  }
  return ~crc;
}

// ---- building the host's types ---------------------------------------------

// A string the host takes ownership of (returned values are freed by the
// generated post-return code).
static plugin_string_t owned(const char *s) {
  plugin_string_t out;
  plugin_string_dup(&out, s);
  return out;
}

static bool fail(handler_error_t *err, uint8_t kind, const char *code,
                 const char *format, ...) {
  char text[256];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof text, format, args);
  va_end(args);
  err->tag = kind;
  switchyard_plugin_types_error_details_t *details =
      kind == SWITCHYARD_PLUGIN_TYPES_HANDLER_ERROR_TRANSIENT ? &err->val.transient
                                                              : &err->val.permanent;
  details->message = owned(text);
  details->code.is_some = true;
  details->code.val = owned(code);
  details->details.ptr = NULL;
  details->details.len = 0;
  return false;
}

static void log_info(const char *text) {
  plugin_string_t s;
  plugin_string_set(&s, text);
  switchyard_plugin_host_log(SWITCHYARD_PLUGIN_TYPES_LOG_LEVEL_INFO, &s);
}

// ---- the contract ----------------------------------------------------------

void exports_switchyard_plugin_handler_describe(plugin_info_t *ret) {
  ret->name = owned("receipts");
  ret->version = owned("1.0.0");

  ret->handles.len = 1;
  ret->handles.ptr = malloc(sizeof(switchyard_plugin_types_subscription_t));
  if (ret->handles.ptr == NULL) abort();
  ret->handles.ptr[0].message_type = owned("SignReceipt");
  ret->handles.ptr[0].kind = SWITCHYARD_PLUGIN_TYPES_KIND_COMMAND;

  ret->publishes.len = 1;
  ret->publishes.ptr = malloc(sizeof(plugin_string_t));
  if (ret->publishes.ptr == NULL) abort();
  ret->publishes.ptr[0] = owned("ReceiptSigned");

  ret->sends.len = 0;
  ret->sends.ptr = NULL;
}

static bool sign(message_t *message, handler_error_t *err) {
  const uint8_t *json = message->payload.ptr;
  size_t len = message->payload.len;
  char order_id[128], customer[128];
  uint64_t total_cents = 0;
  const char *fields[2] = {"order_id", "customer"};
  char *values[2] = {order_id, customer};
  for (int f = 0; f < 2; f++) {
    switch (json_string(json, len, fields[f], values[f], sizeof order_id)) {
      case FIELD_OK:
        break;
      case FIELD_MISSING:
        return fail(err, SWITCHYARD_PLUGIN_TYPES_HANDLER_ERROR_PERMANENT, "bad-payload",
                    "SignReceipt payload lacks %s (a string)", fields[f]);
      case FIELD_UNSUPPORTED:
        return fail(err, SWITCHYARD_PLUGIN_TYPES_HANDLER_ERROR_PERMANENT, "bad-payload",
                    "SignReceipt %s must be 1 to 127 bytes of UTF-8 without escapes or "
                    "control characters",
                    fields[f]);
    }
  }
  if (!json_u64(json, len, "total_cents", &total_cents)) {
    return fail(err, SWITCHYARD_PLUGIN_TYPES_HANDLER_ERROR_PERMANENT, "bad-payload",
                "SignReceipt payload lacks total_cents (a whole number of cents)");
  }
  if (strcmp(customer, "flaky") == 0 && message->attempt == 1) {
    return fail(err, SWITCHYARD_PLUGIN_TYPES_HANDLER_ERROR_TRANSIENT, "signer-busy",
                "the signer is busy, try again (order %s)", order_id);
  }

  char signed_text[300];
  int n = snprintf(signed_text, sizeof signed_text, "%s|%s|%" PRIu64, order_id,
                   customer, total_cents);
  uint32_t checksum = crc32(signed_text, (size_t)n);

  char body[512];
  n = snprintf(body, sizeof body,
               "{\"order_id\":\"%s\",\"customer\":\"%s\",\"total_cents\":%" PRIu64
               ",\"checksum\":\"crc32:%08" PRIx32 "\"}",
               order_id, customer, total_cents, checksum);

  switchyard_plugin_host_outgoing_t event;
  plugin_string_set(&event.message_type, "ReceiptSigned");
  event.payload.ptr = (uint8_t *)body;
  event.payload.len = (size_t)n;
  plugin_string_set(&event.content_type, "application/json");
  event.headers.ptr = NULL;
  event.headers.len = 0;
  event.partition_key.is_some = true;
  plugin_string_set(&event.partition_key.val, order_id);
  switchyard_plugin_host_publish(&event);

  // The reply address is metadata, read from the host on demand.
  switchyard_plugin_host_message_metadata_t metadata;
  switchyard_plugin_host_metadata(&metadata);
  bool wants_reply = metadata.reply_to.is_some;
  switchyard_plugin_host_message_metadata_free(&metadata);
  if (wants_reply) {
    char answer[256];
    n = snprintf(answer, sizeof answer,
                 "{\"order_id\":\"%s\",\"checksum\":\"crc32:%08" PRIx32 "\"}", order_id,
                 checksum);
    switchyard_plugin_host_response_t response;
    response.payload.ptr = (uint8_t *)answer;
    response.payload.len = (size_t)n;
    plugin_string_set(&response.content_type, "application/json");
    response.headers.ptr = NULL;
    response.headers.len = 0;
    switchyard_plugin_host_reply(&response);
  }

  char line[300];
  snprintf(line, sizeof line, "signed the receipt of order %s: crc32:%08" PRIx32,
           order_id, checksum);
  log_info(line);
  return true;
}

bool exports_switchyard_plugin_handler_handle(message_t *message, handler_error_t *err) {
  bool ok;
  if (message->message_type.len == strlen("SignReceipt") &&
      memcmp(message->message_type.ptr, "SignReceipt", message->message_type.len) == 0) {
    ok = sign(message, err);
  } else {
    ok = fail(err, SWITCHYARD_PLUGIN_TYPES_HANDLER_ERROR_PERMANENT, "unknown-type",
              "receipts does not handle %.*s", (int)message->message_type.len,
              (const char *)message->message_type.ptr);
  }
  // The message is ours to free.
  exports_switchyard_plugin_handler_message_free(message);
  return ok;
}
