// The `{{name}}` plugin, in C: greets whoever asks.
//
// - It handles the `Greet` command ({"name": "ada"}): it replies with a
//   greeting and publishes a `Greeted` event.
// - It consumes the `Greeted` event and writes it to the host's log.
//
// A payload that is not the expected JSON fails for good (a permanent
// error: the host dead-letters it and never retries it). To keep this file
// short it reads only a flat JSON object whose "name" is a plain string (no
// escapes); a real plugin would use a JSON library such as cJSON.
//
// plugin.h and plugin.c come from `wit-bindgen c` (see the Makefile).

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

enum { NAME_MAX_BYTES = 200 };

static plugin_string_t owned(const char *s) {
  plugin_string_t out;
  plugin_string_dup(&out, s);
  return out;
}

// Fills in a permanent error; returns false, for `return permanent(...)`.
static bool permanent(handler_error_t *err, const char *code, const char *format, ...) {
  char text[300];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof text, format, args);
  va_end(args);
  err->tag = SWITCHYARD_PLUGIN_TYPES_HANDLER_ERROR_PERMANENT;
  err->val.permanent.message = owned(text);
  err->val.permanent.code.is_some = true;
  err->val.permanent.code.val = owned(code);
  err->val.permanent.details.ptr = NULL;
  err->val.permanent.details.len = 0;
  return false;
}

static bool is_type(const message_t *message, const char *type) {
  return message->message_type.len == strlen(type) &&
         memcmp(message->message_type.ptr, type, message->message_type.len) == 0;
}

// Copies the plain string value of "name" in a JSON object into `out`.
// False if there is none, or it is empty, too long, or holds an escape, a
// quote or a control character.
static bool read_name(const uint8_t *json, size_t len, char out[NAME_MAX_BYTES + 1]) {
  static const char key[] = "\"name\"";
  size_t k = sizeof key - 1;
  if (len == 0 || json[0] != '{') return false;
  for (size_t i = 1; i + k < len; i++) {
    if (memcmp(json + i, key, k) != 0) continue;
    size_t j = i + k;
    while (j < len && (json[j] == ' ' || json[j] == '\t' || json[j] == '\n' || json[j] == '\r')) j++;
    if (j >= len || json[j] != ':') continue;
    j++;
    while (j < len && (json[j] == ' ' || json[j] == '\t' || json[j] == '\n' || json[j] == '\r')) j++;
    if (j >= len || json[j] != '"') return false;
    size_t from = ++j;
    while (j < len && json[j] != '"') {
      if (json[j] == '\\' || json[j] < 0x20 || j - from >= NAME_MAX_BYTES) return false;
      j++;
    }
    if (j >= len || j == from) return false;
    memcpy(out, json + from, j - from);
    out[j - from] = '\0';
    return true;
  }
  return false;
}

// The types it handles, and the kind of each.
static const struct {
  const char *type;
  uint8_t kind;
} HANDLES[] = {
    {"Greet", SWITCHYARD_PLUGIN_TYPES_KIND_COMMAND},
    {"Greeted", SWITCHYARD_PLUGIN_TYPES_KIND_EVENT},
};
// The events it publishes.
static const char *const PUBLISHES[] = {"Greeted"};

void exports_switchyard_plugin_handler_describe(plugin_info_t *ret) {
  ret->name = owned("{{name}}");
  ret->version = owned("0.1.0");
  size_t n = sizeof HANDLES / sizeof HANDLES[0];
  ret->handles.ptr = calloc(n, sizeof(switchyard_plugin_types_subscription_t));
  if (ret->handles.ptr == NULL) abort();
  ret->handles.len = n;
  for (size_t i = 0; i < n; i++) {
    ret->handles.ptr[i].message_type = owned(HANDLES[i].type);
    ret->handles.ptr[i].kind = HANDLES[i].kind;
  }
  n = sizeof PUBLISHES / sizeof PUBLISHES[0];
  ret->publishes.ptr = calloc(n, sizeof(plugin_string_t));
  if (ret->publishes.ptr == NULL) abort();
  ret->publishes.len = n;
  for (size_t i = 0; i < n; i++) ret->publishes.ptr[i] = owned(PUBLISHES[i]);
  // Commands it sends: none.
  ret->sends.ptr = NULL;
  ret->sends.len = 0;
}

static bool greet(message_t *message, handler_error_t *err) {
  char name[NAME_MAX_BYTES + 1];
  if (!read_name(message->payload.ptr, message->payload.len, name)) {
    return permanent(err, "malformed-payload",
                     "Greet needs a JSON object with a non-empty plain string \"name\"");
  }
  char body[2 * NAME_MAX_BYTES + 64];
  // Held until the handler returns true: a failed attempt publishes and
  // replies nothing.
  int n = snprintf(body, sizeof body, "{\"name\":\"%s\",\"greeting\":\"Hello, %s!\"}", name, name);
  switchyard_plugin_host_outgoing_t event;
  plugin_string_set(&event.message_type, "Greeted");
  event.payload.ptr = (uint8_t *)body;
  event.payload.len = (size_t)n;
  plugin_string_set(&event.content_type, "application/json");
  event.headers.ptr = NULL;
  event.headers.len = 0;
  event.partition_key.is_some = false;
  switchyard_plugin_host_publish(&event);

  char answer[NAME_MAX_BYTES + 64];
  n = snprintf(answer, sizeof answer, "{\"greeting\":\"Hello, %s!\"}", name);
  switchyard_plugin_host_response_t response;
  response.payload.ptr = (uint8_t *)answer;
  response.payload.len = (size_t)n;
  plugin_string_set(&response.content_type, "application/json");
  response.headers.ptr = NULL;
  response.headers.len = 0;
  switchyard_plugin_host_reply(&response);
  return true;
}

static bool greeted(message_t *message, handler_error_t *err) {
  char name[NAME_MAX_BYTES + 1];
  if (!read_name(message->payload.ptr, message->payload.len, name)) {
    return permanent(err, "malformed-payload",
                     "Greeted needs a JSON object with a non-empty plain string \"name\"");
  }
  char line[NAME_MAX_BYTES + 32];
  snprintf(line, sizeof line, "%s was greeted", name);
  plugin_string_t text;
  plugin_string_set(&text, line);
  switchyard_plugin_host_log(SWITCHYARD_PLUGIN_TYPES_LOG_LEVEL_INFO, &text);
  return true;
}

bool exports_switchyard_plugin_handler_handle(message_t *message, handler_error_t *err) {
  bool ok;
  if (is_type(message, "Greet")) {
    ok = greet(message, err);
  } else if (is_type(message, "Greeted")) {
    ok = greeted(message, err);
  } else {
    ok = permanent(err, "unknown-type", "{{name}} does not handle %.*s",
                   (int)message->message_type.len, (const char *)message->message_type.ptr);
  }
  exports_switchyard_plugin_handler_message_free(message);
  return ok;
}
