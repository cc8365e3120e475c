//! CloudEvents 1.0 binary content mode, shared by the broker transports:
//! the payload is the message body, the envelope's fields are event
//! attributes. Each binding names the attributes its own way (AMQP
//! `cloudEvents:id`, Kafka `ce_id`); this module knows which attributes
//! there are and how they map to an [`Envelope`]. See docs/wire-format.md.

use std::borrow::Cow;
use std::time::{Duration, UNIX_EPOCH};

use crate::envelope::{Attempt, Envelope, Kind, now_ms};

/// A delayed retry's due time (milliseconds since the epoch), on messages
/// in a retry topic.
pub const NOT_BEFORE: &str = "synotbefore";

/// The largest `syhistory` attribute read: each attempt's error is clipped
/// to 2 KiB and a message carries at most 64 attempts.
const MAX_HISTORY_BYTES: usize = 256 << 10;

/// The attributes of a message, by attribute name, in a fixed order. Values
/// the envelope holds are borrowed, not copied.
pub fn attributes<'a>(e: &'a Envelope, source: &'a str) -> Vec<(&'static str, Cow<'a, str>)> {
    let mut a = Vec::with_capacity(12);
    a.extend([
        ("specversion", Cow::Borrowed("1.0")),
        ("id", Cow::Borrowed(e.id.as_str())),
        ("type", Cow::Borrowed(e.message_type.as_str())),
        ("source", Cow::Borrowed(source)),
        ("time", Cow::Owned(rfc3339(e.created_at_ms))),
        ("sykind", Cow::Borrowed(e.kind.as_str())),
        ("syattempt", Cow::Owned(e.attempt.to_string())),
    ]);
    let optional = [
        ("correlationid", &e.correlation_id),
        ("causationid", &e.causation_id),
        ("syreplyto", &e.reply_to),
        ("partitionkey", &e.partition_key),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            a.push((name, Cow::Borrowed(v.as_str())));
        }
    }
    if !e.history.is_empty()
        && let Ok(h) = serde_json::to_string(&e.history)
    {
        a.push(("syhistory", Cow::Owned(h)));
    }
    a
}

/// What a binding knows about a message besides its attributes: its own
/// properties (an AMQP `message-id`, a Kafka topic), used when an attribute
/// is missing.
#[derive(Default)]
pub struct Fallbacks {
    pub id: Option<String>,
    pub message_type: Option<String>,
    pub created_at_ms: Option<u64>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub partition_key: Option<String>,
    pub content_type: Option<String>,
}

/// Builds an envelope from a message's attributes (`attr(name)`), falling
/// back to the binding's own properties. `kind_of` gives the kind of a type
/// when the message does not say (a producer outside Switchyard). An error
/// names what is missing or wrong; the payload is never touched.
///
/// `retry_state` says whether the message came the way only the host's own
/// retries and replays come (a route's retry topic, RabbitMQ's default
/// exchange): only then are its attempt number and history (`syattempt`,
/// `syhistory`) believed. Anywhere else a sender could use them to skip a
/// handler's retries or plant attempts that never happened, so a message
/// from anywhere else starts at attempt 1 with no history.
pub fn decode<'a>(
    attr: impl Fn(&str) -> Option<Cow<'a, str>>,
    fallbacks: Fallbacks,
    kind_of: impl Fn(&str) -> Option<Kind>,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
    retry_state: bool,
) -> Result<Envelope, String> {
    let id = attr("id")
        .map(Cow::into_owned)
        .or(fallbacks.id)
        .ok_or("it has no CloudEvents id and no message id")?;
    let message_type = attr("type")
        .map(Cow::into_owned)
        .or(fallbacks.message_type)
        .ok_or("it has no CloudEvents type")?;
    let kind = match attr("sykind").as_deref() {
        Some(k) => Kind::parse(k).ok_or_else(|| {
            format!(
                "sykind `{}` is neither command nor event",
                crate::limits::quote(k)
            )
        })?,
        None => kind_of(&message_type).unwrap_or(Kind::Event),
    };
    let created_at_ms = attr("time")
        .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .or(fallbacks.created_at_ms)
        .unwrap_or_else(now_ms);
    let attempt = match attr("syattempt").filter(|_| retry_state) {
        Some(a) => a
            .parse::<u32>()
            .map_err(|_| format!("syattempt `{}` is not a number", crate::limits::quote(&a)))?,
        None => 1,
    };
    let history: Vec<Attempt> = match attr("syhistory").filter(|_| retry_state) {
        Some(h) if h.len() > MAX_HISTORY_BYTES => {
            return Err(format!(
                "syhistory is {} bytes, more than {MAX_HISTORY_BYTES}",
                h.len()
            ));
        }
        Some(h) => serde_json::from_str(&h).map_err(|e| {
            format!(
                "syhistory is not valid: {}",
                crate::text::clip(&e.to_string(), 512)
            )
        })?,
        None => Vec::new(),
    };
    Ok(Envelope {
        id,
        message_type,
        kind,
        payload,
        content_type: fallbacks
            .content_type
            .unwrap_or_else(|| crate::config::DEFAULT_CONTENT_TYPE.to_owned()),
        headers,
        correlation_id: attr("correlationid")
            .map(Cow::into_owned)
            .or(fallbacks.correlation_id),
        causation_id: attr("causationid").map(Cow::into_owned),
        reply_to: attr("syreplyto")
            .map(Cow::into_owned)
            .or(fallbacks.reply_to),
        partition_key: attr("partitionkey")
            .map(Cow::into_owned)
            .or(fallbacks.partition_key),
        created_at_ms,
        attempt,
        history,
    })
}

/// What can be said of a message that does not decode, so that its dead
/// letter still names it. The payload is kept as it came.
pub fn salvage(id: String, message_type: String, payload: Vec<u8>) -> Envelope {
    let mut e = Envelope::new(
        message_type,
        Kind::Event,
        payload,
        crate::config::DEFAULT_CONTENT_TYPE,
    );
    e.id = id;
    e
}

/// RFC 3339 in UTC with milliseconds; empty if out of range.
pub fn rfc3339(ms: u64) -> String {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_default()
}

/// Headers a broker adds when it dead-letters a message (RabbitMQ, when a
/// delayed retry's wait ends); they are not the message's.
pub fn is_broker_header(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut e = Envelope::new(
            "PlaceOrder",
            Kind::Command,
            b"{}".to_vec(),
            "application/json",
        );
        e.correlation_id = Some("c".into());
        e.causation_id = Some("k".into());
        e.reply_to = Some("r".into());
        e.partition_key = Some("p".into());
        e.attempt = 3;
        e.history.push(Attempt {
            number: 2,
            started_at_ms: 5,
            duration_us: 7,
            error_kind: "transient".into(),
            error: "boom".into(),
            plugin: "orders@1.0.0".into(),
            then: "retry-later".into(),
            trace_id: None,
            span_id: None,
        });
        let attrs = attributes(&e, "switchyard/shop");
        let get = |n: &str| {
            attrs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| Cow::Borrowed(v.as_ref()))
        };
        let back = decode(
            get,
            Fallbacks {
                content_type: Some("application/json".into()),
                ..Fallbacks::default()
            },
            |_| None,
            e.payload.clone(),
            Vec::new(),
            true,
        )
        .unwrap();
        assert_eq!(back.id, e.id);
        assert_eq!(back.kind, Kind::Command);
        assert_eq!(back.attempt, 3);
        assert_eq!(back.history.len(), 1);
        assert_eq!(back.correlation_id.as_deref(), Some("c"));
        assert_eq!(back.causation_id.as_deref(), Some("k"));
        assert_eq!(back.reply_to.as_deref(), Some("r"));
        assert_eq!(back.partition_key.as_deref(), Some("p"));
        assert_eq!(back.created_at_ms, e.created_at_ms);
    }

    #[test]
    fn bad_attributes_are_named() {
        let attrs = [("id", "1"), ("type", "T"), ("syattempt", "lots")];
        let get = |n: &str| {
            attrs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| Cow::Borrowed(*v))
        };
        let err = decode(
            get,
            Fallbacks::default(),
            |_| None,
            Vec::new(),
            Vec::new(),
            true,
        )
        .unwrap_err();
        assert!(err.contains("syattempt `lots`"), "{err}");
        let none = |_: &str| None;
        let err = decode(
            none,
            Fallbacks::default(),
            |_| None,
            Vec::new(),
            Vec::new(),
            true,
        )
        .unwrap_err();
        assert!(err.contains("no CloudEvents id"), "{err}");
    }

    #[test]
    fn attempts_and_history_are_believed_only_from_the_retry_path() {
        let history = r#"[{"number":1,"started_at_ms":1,"duration_us":1,"error_kind":"transient","error":"planted","plugin":"x@1","then":"retry-later"}]"#;
        let attrs = [
            ("id", "1"),
            ("type", "T"),
            ("syattempt", "9"),
            ("syhistory", history),
        ];
        let get = |n: &str| {
            attrs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| Cow::Borrowed(*v))
        };
        let outside = decode(
            get,
            Fallbacks::default(),
            |_| None,
            Vec::new(),
            Vec::new(),
            false,
        )
        .unwrap();
        assert_eq!((outside.attempt, outside.history.len()), (1, 0));
        let retried = decode(
            get,
            Fallbacks::default(),
            |_| None,
            Vec::new(),
            Vec::new(),
            true,
        )
        .unwrap();
        assert_eq!((retried.attempt, retried.history.len()), (9, 1));
    }
}
