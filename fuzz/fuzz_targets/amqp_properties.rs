//! The RabbitMQ decoder from the bytes on the wire: an AMQP content header
//! (the basic properties, headers table included) as lapin receives it,
//! then everything a route does before a plugin sees the message. Whatever
//! the bytes, the result is a message or a malformed one with a reason,
//! whose id and labels are safe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::envelope::Kind;

#[derive(arbitrary::Arbitrary, Debug)]
struct Input<'a> {
    header: &'a [u8],
    exchange: &'a str,
    routing_key: &'a str,
    body: &'a [u8],
    tag: u64,
}

fn kind_of(t: &str) -> Option<Kind> {
    match t {
        "PlaceOrder" => Some(Kind::Command),
        "OrderPlaced" => Some(Kind::Event),
        _ => None,
    }
}

fuzz_target!(|input: Input<'_>| {
    let Ok((_, header)) = amq_protocol::frame::parsing::parse_content_header(input.header) else {
        return;
    };
    let (mut envelope, malformed) = switchyard::transport::amqp::receive(
        &header.properties,
        input.exchange,
        input.routing_key,
        input.body,
        input.tag,
        kind_of,
        "switchyard.shop",
    );
    assert_eq!(envelope.payload, input.body, "the payload is never touched");
    common::admit(&mut envelope, malformed, kind_of);
});

#[path = "common.rs"]
mod common;
