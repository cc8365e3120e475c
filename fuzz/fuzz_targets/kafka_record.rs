//! The Kafka decoder: a record with any topic, key, headers and value, as
//! another client could produce it, then everything a route does before a
//! plugin sees it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use switchyard::envelope::Kind;

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    topic: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Option<Vec<(String, Option<Vec<u8>>)>>,
    timestamp: i64,
    partition: i32,
    offset: i64,
}

fn kind_of(t: &str) -> Option<Kind> {
    match t {
        "PlaceOrder" => Some(Kind::Command),
        "OrderPlaced" => Some(Kind::Event),
        _ => None,
    }
}

fuzz_target!(|input: Input| {
    let headers = input.headers.map(|hs| {
        hs.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key: key.as_str(),
                value: value.as_deref(),
            })
        })
    });
    let record = OwnedMessage::new(
        input.value.clone(),
        input.key,
        input.topic,
        Timestamp::CreateTime(input.timestamp),
        input.partition,
        input.offset,
        headers,
    );
    let (mut envelope, malformed, _due) =
        switchyard::transport::kafka::receive(&record, "shop.", kind_of);
    assert_eq!(
        envelope.payload,
        input.value.unwrap_or_default(),
        "the value is never touched"
    );
    common::admit(&mut envelope, malformed, kind_of);
});

#[path = "common.rs"]
mod common;
