//! The record of a message an exactly-once plugin has handled: the inbox
//! that stops a redelivery from being handled again, holding the outbox of
//! what the handling emitted, so that the redelivery sends it again (with
//! the same ids) instead.

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, Kind, Reply};

/// A handled message of an exactly-once plugin and what it emitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub message_id: String,
    pub outputs: Vec<Envelope>,
    pub reply: Option<Reply>,
}

/// How the outputs are kept: JSON, payloads in hex.
#[derive(Serialize, Deserialize)]
struct Stored {
    outputs: Vec<StoredMessage>,
    reply: Option<StoredReply>,
}

#[derive(Serialize, Deserialize)]
struct StoredMessage {
    id: String,
    #[serde(rename = "type")]
    message_type: String,
    command: bool,
    payload: String,
    content_type: String,
    headers: Vec<(String, String)>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    partition_key: Option<String>,
    created_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredReply {
    address: String,
    in_reply_to: String,
    correlation_id: String,
    payload: String,
    content_type: String,
    headers: Vec<(String, String)>,
    created_at_ms: u64,
}

impl Done {
    /// The outputs and reply as stored.
    pub fn encode(&self) -> Vec<u8> {
        let stored = Stored {
            outputs: self
                .outputs
                .iter()
                .map(|e| StoredMessage {
                    id: e.id.clone(),
                    message_type: e.message_type.clone(),
                    command: e.kind == Kind::Command,
                    payload: hex::encode(&e.payload),
                    content_type: e.content_type.clone(),
                    headers: e.headers.clone(),
                    correlation_id: e.correlation_id.clone(),
                    causation_id: e.causation_id.clone(),
                    partition_key: e.partition_key.clone(),
                    created_at_ms: e.created_at_ms,
                })
                .collect(),
            reply: self.reply.as_ref().map(|r| StoredReply {
                address: r.address.clone(),
                in_reply_to: r.in_reply_to.clone(),
                correlation_id: r.correlation_id.clone(),
                payload: hex::encode(&r.payload),
                content_type: r.content_type.clone(),
                headers: r.headers.clone(),
                created_at_ms: r.created_at_ms,
            }),
        };
        // Strings, numbers and lists only: it always serializes.
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// A record read back from the store.
    pub fn decode(message_id: &str, bytes: &[u8]) -> Result<Done> {
        let stored: Stored = serde_json::from_slice(bytes)
            .with_context(|| format!("the stored outcome of message {message_id} is corrupt"))?;
        let payload = |hex_text: &str| {
            hex::decode(hex_text)
                .with_context(|| format!("a stored payload of message {message_id} is corrupt"))
        };
        let mut outputs = Vec::with_capacity(stored.outputs.len());
        for m in stored.outputs {
            outputs.push(Envelope {
                id: m.id,
                message_type: m.message_type,
                kind: if m.command {
                    Kind::Command
                } else {
                    Kind::Event
                },
                payload: payload(&m.payload)?,
                content_type: m.content_type,
                headers: m.headers,
                correlation_id: m.correlation_id,
                causation_id: m.causation_id,
                reply_to: None,
                partition_key: m.partition_key,
                created_at_ms: m.created_at_ms,
                attempt: 1,
                history: Vec::new(),
            });
        }
        let reply = match stored.reply {
            None => None,
            Some(r) => Some(Reply {
                payload: payload(&r.payload)?,
                address: r.address,
                in_reply_to: r.in_reply_to,
                correlation_id: r.correlation_id,
                content_type: r.content_type,
                headers: r.headers,
                created_at_ms: r.created_at_ms,
            }),
        };
        Ok(Done {
            message_id: message_id.to_owned(),
            outputs,
            reply,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_it_was_written() {
        let mut out = Envelope::new(
            "Shipped",
            Kind::Event,
            vec![0, 1, 255],
            "application/octet-stream",
        );
        out.headers = vec![("tenant".into(), "acme".into())];
        out.correlation_id = Some("flow".into());
        out.causation_id = Some("m-1".into());
        out.partition_key = Some("A-1".into());
        let done = Done {
            message_id: "m-1".into(),
            outputs: vec![out],
            reply: Some(Reply {
                address: "inbox".into(),
                in_reply_to: "m-1".into(),
                correlation_id: "flow".into(),
                payload: b"{}".to_vec(),
                content_type: "application/json".into(),
                headers: Vec::new(),
                created_at_ms: 7,
            }),
        };
        assert_eq!(Done::decode("m-1", &done.encode()).unwrap(), done);
        assert!(Done::decode("m-1", b"{").is_err());
    }
}
