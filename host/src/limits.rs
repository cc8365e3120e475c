//! The shape and size limits of a message where it crosses into the host.
//!
//! A broker delivers whatever a client wrote: an id of 5 KB, a type no route
//! takes, a reply address that names one of the pipeline's own queues. Each
//! such field becomes a log field, a metric label, an index key in the
//! dead-letter store or a destination on the broker, so each is checked
//! once, when the message arrives, and a message that breaks a limit is
//! dead-lettered as `malformed` before any plugin sees it. The limits are
//! wide enough for any well-behaved client and narrow enough that no field
//! can make the host loop, grow without bound or write where it should not.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use crate::envelope::{Envelope, Kind, ORIGINAL_ID_HEADER, REPLAY_TRACE_HEADER};
use crate::text::clip;

/// Message, correlation and causation ids: AMQP carries them as short
/// strings (255 bytes), and PostgreSQL indexes them.
pub const MAX_ID: usize = 255;
/// A reply address: a queue name on RabbitMQ (a short string), a topic on
/// Kafka (249 characters at most).
pub const MAX_REPLY_TO: usize = 255;
/// A media type.
pub const MAX_CONTENT_TYPE: usize = 255;
/// A partition key (a Kafka record key).
pub const MAX_PARTITION_KEY: usize = 1024;
/// Headers one message may carry.
pub const MAX_HEADERS: usize = 128;
/// Headers a plugin may put on a message it emits: the host adds its own
/// (trace context, a replay's link) and the result must still arrive.
pub const MAX_PLUGIN_HEADERS: usize = MAX_HEADERS - 16;
/// A header's name: AMQP field names are short strings.
pub const MAX_HEADER_NAME: usize = 255;
/// Names and values of all of a message's headers together.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Header bytes a plugin may use, leaving room for the host's own.
pub const MAX_PLUGIN_HEADER_BYTES: usize = MAX_HEADER_BYTES - (4 << 10);
/// [`MAX_HISTORY`] and [`DEFAULT_MAX_MESSAGE_SIZE`] bound what a pipeline may
/// set, so they live with its model in [`crate::config`].
pub use crate::config::{DEFAULT_MAX_MESSAGE_SIZE, MAX_HISTORY};
/// The `message.type` metric label and span name part of a malformed
/// message: its own type could be anything, and labels must stay few.
pub const MALFORMED_TYPE_LABEL: &str = "(malformed)";

/// How much of a refused value an error quotes.
const QUOTE: usize = 64;

/// What a route takes: the kind of each type it subscribes to.
pub trait Takes {
    /// The kind this route takes `message_type` as, or `None` if it does not
    /// take it.
    fn kind_of(&self, message_type: &str) -> Option<Kind>;
}

impl<F: Fn(&str) -> Option<Kind>> Takes for F {
    fn kind_of(&self, message_type: &str) -> Option<Kind> {
        self(message_type)
    }
}

/// Checks a message that arrived for a route. The error says which field
/// breaks which limit, quoting a clipped, escaped part of its value.
pub fn check_inbound(e: &Envelope, route: &impl Takes, max_payload: u64) -> Result<(), String> {
    check_text("message id", &e.id, MAX_ID)?;
    check_type(&e.message_type)?;
    match route.kind_of(&e.message_type) {
        None => {
            return Err(format!(
                "its type `{}` is not one this route takes",
                e.message_type
            ));
        }
        Some(k) if k != e.kind => {
            return Err(format!(
                "it says it is {} {}, which this pipeline takes as {}",
                e.kind.with_article(),
                e.message_type,
                k.with_article()
            ));
        }
        Some(_) => {}
    }
    if e.payload.len() as u64 > max_payload {
        return Err(format!(
            "its payload is {} bytes, over the limit of {} ([host] max_message_size)",
            e.payload.len(),
            max_payload
        ));
    }
    check_text("content type", &e.content_type, MAX_CONTENT_TYPE)?;
    if let Some(c) = &e.correlation_id {
        check_text("correlation id", c, MAX_ID)?;
    }
    if let Some(c) = &e.causation_id {
        check_text("causation id", c, MAX_ID)?;
    }
    if let Some(r) = &e.reply_to {
        check_text("reply-to address", r, MAX_REPLY_TO)?;
        if e.kind == Kind::Event {
            return Err(
                "it is an event with a reply-to address; only commands are answered".into(),
            );
        }
    }
    if let Some(k) = &e.partition_key {
        check_text("partition key", k, MAX_PARTITION_KEY)?;
    }
    check_headers(&e.headers)?;
    if e.history.len() > MAX_HISTORY {
        return Err(format!(
            "it carries {} earlier attempts, more than {MAX_HISTORY}",
            e.history.len()
        ));
    }
    Ok(())
}

/// A message type as pipelines name them: a letter, then letters, digits,
/// `_`, `-` and `.`; at most 128 bytes.
pub fn check_type(t: &str) -> Result<(), String> {
    crate::config::MessageType::try_from(t)
        .map(drop)
        .map_err(|_| {
            format!(
                "its type `{}` is not a message type name (a letter, then letters, digits, `_`, `-` and `.`, at most 128 bytes)",
                quote(t)
            )
        })
}

/// Headers: how many, how long their names, how large all together. The
/// headers the host itself writes (trace context, a replay's link, a
/// malformed message's own id) have an allowance of their own, so that a
/// message at the limit stays within it when the host retries it.
pub fn check_headers(headers: &[(String, String)]) -> Result<(), String> {
    if !headers.iter().any(|(n, _)| is_host_header(n)) {
        return check_headers_within(headers, MAX_HEADERS, MAX_HEADER_BYTES);
    }
    let (host, theirs): (Vec<_>, Vec<_>) = headers
        .iter()
        .cloned()
        .partition(|(n, _)| is_host_header(n));
    check_headers_within(&theirs, MAX_HEADERS, MAX_HEADER_BYTES)?;
    check_headers_within(
        &host,
        MAX_HEADERS - MAX_PLUGIN_HEADERS,
        MAX_HEADER_BYTES - MAX_PLUGIN_HEADER_BYTES + MAX_HEADER_BYTES / 2,
    )
}

/// The headers the host itself writes on what it publishes.
fn is_host_header(name: &str) -> bool {
    matches!(
        name,
        "traceparent" | "tracestate" | REPLAY_TRACE_HEADER | ORIGINAL_ID_HEADER
    )
}

/// [`check_headers`] with other limits (a plugin's, which leave room for
/// the host's own headers).
pub fn check_headers_within(
    headers: &[(String, String)],
    max_count: usize,
    max_bytes: usize,
) -> Result<(), String> {
    if headers.len() > max_count {
        return Err(format!(
            "it has {} headers, more than {max_count}",
            headers.len()
        ));
    }
    let mut bytes = 0usize;
    for (name, value) in headers {
        check_text("header name", name, MAX_HEADER_NAME)?;
        bytes = bytes.saturating_add(name.len()).saturating_add(value.len());
    }
    if bytes > max_bytes {
        return Err(format!(
            "its headers take {bytes} bytes, more than {max_bytes}"
        ));
    }
    Ok(())
}

/// A non-empty text of at most `max` bytes without control characters.
pub fn check_text(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("its {what} is empty"));
    }
    if value.len() > max {
        return Err(format!(
            "its {what} is {} bytes, more than {max}: `{}`",
            value.len(),
            quote(value)
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "its {what} has control characters: `{}`",
            quote(value)
        ));
    }
    Ok(())
}

/// A refused value as an error quotes it: clipped and escaped.
pub fn quote(value: &str) -> String {
    clip(value, QUOTE)
}

/// Makes a message that broke a limit safe to record: an id that is not a
/// valid id becomes a short one derived from it (the original is kept in a
/// header, clipped to the header limit), so that logs, indexes and the
/// dead-letter store only ever see bounded, printable ids.
pub fn sanitize(e: &mut Envelope) {
    if check_text("id", &e.id, MAX_ID).is_ok() {
        return;
    }
    let digest = Sha256::digest(e.id.as_bytes());
    let mut id = String::from("malformed-");
    for b in &digest[..12] {
        let _ = write!(id, "{b:02x}");
    }
    let original = std::mem::replace(&mut e.id, id);
    e.headers.retain(|(n, _)| n != ORIGINAL_ID_HEADER);
    e.headers.push((
        ORIGINAL_ID_HEADER.to_owned(),
        clip(&original, MAX_HEADER_BYTES / 2),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(t: &str) -> Option<Kind> {
        match t {
            "PlaceOrder" => Some(Kind::Command),
            "Tick" => Some(Kind::Event),
            _ => None,
        }
    }

    fn command() -> Envelope {
        Envelope::new(
            "PlaceOrder",
            Kind::Command,
            b"{}".to_vec(),
            "application/json",
        )
    }

    #[test]
    fn a_well_formed_message_passes() {
        let mut e = command();
        e.reply_to = Some("amq.gen-abc".into());
        e.headers = vec![("tenant".into(), "acme".into())];
        assert_eq!(check_inbound(&e, &route, 1 << 20), Ok(()));
    }

    #[test]
    fn each_field_at_and_over_its_limit() {
        let at = |n: usize| "x".repeat(n);
        let mut e = command();
        e.id = at(MAX_ID);
        assert!(check_inbound(&e, &route, 1 << 20).is_ok());
        e.id = at(MAX_ID + 1);
        let err = check_inbound(&e, &route, 1 << 20).unwrap_err();
        assert!(err.contains("message id is 256 bytes"), "{err}");

        let mut e = command();
        e.reply_to = Some(at(MAX_REPLY_TO));
        assert!(check_inbound(&e, &route, 1 << 20).is_ok());
        e.reply_to = Some(at(300));
        let err = check_inbound(&e, &route, 1 << 20).unwrap_err();
        assert!(err.contains("reply-to address is 300 bytes"), "{err}");

        let mut e = command();
        e.payload = vec![b' '; 100];
        assert!(check_inbound(&e, &route, 100).is_ok());
        let err = check_inbound(&e, &route, 99).unwrap_err();
        assert!(err.contains("payload is 100 bytes"), "{err}");

        let mut e = command();
        e.headers = (0..MAX_HEADERS)
            .map(|i| (format!("h{i}"), String::new()))
            .collect();
        assert!(check_inbound(&e, &route, 1 << 20).is_ok());
        e.headers.push(("one-more".into(), String::new()));
        let err = check_inbound(&e, &route, 1 << 20).unwrap_err();
        assert!(err.contains("129 headers"), "{err}");

        let mut e = command();
        e.headers = vec![("big".into(), at(MAX_HEADER_BYTES))];
        let err = check_inbound(&e, &route, 1 << 20).unwrap_err();
        assert!(err.contains("headers take"), "{err}");
    }

    #[test]
    fn types_the_route_does_not_take_or_takes_as_another_kind_are_refused() {
        let mut e = command();
        e.message_type = "Refund".into();
        let err = check_inbound(&e, &route, 1 << 20).unwrap_err();
        assert!(err.contains("not one this route takes"), "{err}");
        e.message_type = "x".repeat(4800);
        let err = check_inbound(&e, &route, 1 << 20).unwrap_err();
        assert!(err.contains("not a message type name"), "{err}");
        assert!(err.len() < 400, "the error quotes a clipped type: {err}");
        let mut e = command();
        e.kind = Kind::Event;
        let err = check_inbound(&e, &route, 1 << 20).unwrap_err();
        assert!(err.contains("takes as a command"), "{err}");
    }

    #[test]
    fn control_characters_and_empty_values_are_refused() {
        let mut e = command();
        e.id = "a\nb".into();
        assert!(
            check_inbound(&e, &route, 1 << 20)
                .unwrap_err()
                .contains("control")
        );
        e.id = String::new();
        assert!(
            check_inbound(&e, &route, 1 << 20)
                .unwrap_err()
                .contains("empty")
        );
    }

    #[test]
    fn an_event_cannot_ask_for_a_reply() {
        let mut e = Envelope::new("Tick", Kind::Event, Vec::new(), "application/json");
        e.reply_to = Some("somewhere".into());
        assert!(
            check_inbound(&e, &route, 1 << 20)
                .unwrap_err()
                .contains("event with a reply-to")
        );
    }

    #[test]
    fn sanitize_replaces_an_unusable_id_and_keeps_the_original() {
        let mut e = command();
        let good = e.id.clone();
        sanitize(&mut e);
        assert_eq!(e.id, good);
        e.id = format!("{}\u{1b}[31m", "y".repeat(5000));
        sanitize(&mut e);
        assert!(
            e.id.starts_with("malformed-") && e.id.len() < 64,
            "{}",
            e.id
        );
        let (_, kept) = e
            .headers
            .iter()
            .find(|(n, _)| n == ORIGINAL_ID_HEADER)
            .unwrap();
        assert!(kept.starts_with("yyyy") && !kept.contains('\u{1b}'));
        let again = e.id.clone();
        sanitize(&mut e);
        assert_eq!(e.id, again, "a sanitized id is a valid id");
    }
}
