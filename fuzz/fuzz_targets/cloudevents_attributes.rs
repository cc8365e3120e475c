//! The CloudEvents attribute decoder both brokers share, the attempt
//! history (`syhistory`) included: any attributes decode to a message or a
//! reason, and a message that passes the limits survives a round trip
//! through the attributes the host writes.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use switchyard::envelope::Kind;
use switchyard::transport::cloudevents::{self, Fallbacks};

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    attributes: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    id: Option<String>,
    message_type: Option<String>,
    payload: Vec<u8>,
    retry_state: bool,
}

fn kind_of(t: &str) -> Option<Kind> {
    match t {
        "PlaceOrder" => Some(Kind::Command),
        "OrderPlaced" => Some(Kind::Event),
        _ => None,
    }
}

fuzz_target!(|input: Input| {
    let attr = |name: &str| {
        input
            .attributes
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| Cow::Borrowed(v.as_str()))
    };
    let fallbacks = Fallbacks {
        id: input.id.clone(),
        message_type: input.message_type.clone(),
        ..Fallbacks::default()
    };
    let decoded = cloudevents::decode(
        attr,
        fallbacks,
        kind_of,
        input.payload.clone(),
        input.headers.clone(),
        input.retry_state,
    );
    let Ok(mut e) = decoded else { return };
    if !input.retry_state {
        assert_eq!((e.attempt, e.history.len()), (1, 0), "history from outside is ignored");
    }
    if switchyard::limits::check_inbound(&e, &kind_of, 1 << 20).is_err() {
        common::admit(&mut e, None, kind_of);
        return;
    }
    // What the host writes, read back, is the same message.
    let written = cloudevents::attributes(&e, "switchyard/shop");
    let again = cloudevents::decode(
        |name: &str| {
            written
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| Cow::Borrowed(v.as_ref()))
        },
        Fallbacks {
            content_type: Some(e.content_type.clone()),
            ..Fallbacks::default()
        },
        kind_of,
        e.payload.clone(),
        e.headers.clone(),
        true,
    )
    .expect("what the host writes, it reads");
    assert_eq!(again.id, e.id);
    assert_eq!(again.message_type, e.message_type);
    assert_eq!(again.kind, e.kind);
    assert_eq!(again.attempt, e.attempt);
    assert_eq!(again.history, e.history);
    assert_eq!(again.correlation_id, e.correlation_id);
    assert_eq!(again.reply_to, e.reply_to);
});

#[path = "common.rs"]
mod common;
