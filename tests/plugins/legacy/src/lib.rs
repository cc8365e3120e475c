//! A plugin built against `switchyard:plugin@0.2.0` (the copy of that
//! contract in `wit/`), without the SDK: a host that speaks a later 0.2.x
//! must still load and run it. It answers each `Ping` event with a `Pong`
//! event carrying the same payload.

// The generated bindings export the component's ABI functions: unsafe code.
#[cfg(target_family = "wasm")]
#[allow(unsafe_code)]
mod guest {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
    });

    use exports::switchyard::plugin::handler::Guest;
    use switchyard::plugin::host;
    use switchyard::plugin::types::{
        HandlerError, Kind, Message, Outgoing, PluginInfo, Subscription,
    };

    struct Legacy;

    impl Guest for Legacy {
        fn describe() -> PluginInfo {
            PluginInfo {
                name: "legacy".into(),
                version: "0.2.0".into(),
                handles: vec![Subscription {
                    message_type: "Ping".into(),
                    kind: Kind::Event,
                }],
                publishes: vec!["Pong".into()],
                sends: Vec::new(),
            }
        }

        fn handle(message: Message) -> Result<(), HandlerError> {
            host::publish(&Outgoing {
                message_type: "Pong".into(),
                payload: message.payload,
                content_type: message.content_type,
                headers: Vec::new(),
                partition_key: None,
            });
            Ok(())
        }
    }

    export!(Legacy);
}
