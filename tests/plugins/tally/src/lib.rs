//! Appends the id of every `Tick` and `Published` event it handles to
//! `/out/tally.log`, so a test can count which messages were handled and how
//! often. Needs the pipeline to grant a writable directory at `/out`.

use std::io::Write;

use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};

pub struct Tally;

impl Plugin for Tally {
    fn describe() -> PluginInfo {
        PluginInfo::new("tally", env!("CARGO_PKG_VERSION"))
            .consumes_event("Tick")
            .consumes_event("Published")
    }

    fn handle(_ctx: &mut Context<'_>, msg: Message) -> Result<(), HandlerError> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/out/tally.log")
            .map_err(|e| HandlerError::transient(format!("cannot open /out/tally.log: {e}")))?;
        // One write per line: with O_APPEND a killed host never leaves half
        // a line behind.
        file.write_all(format!("{}\n", msg.id).as_bytes())
            .map_err(|e| HandlerError::transient(format!("cannot append to /out/tally.log: {e}")))
    }
}

switchyard_sdk::export_plugin!(Tally);
