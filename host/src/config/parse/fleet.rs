//! `[fleet]`: every host of a pipeline follows the plugin versions deployed
//! to a shared PostgreSQL database.

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{DEFAULT_FLEET_POLL, FleetConfig, StoreConfig, TransportConfig};
use crate::config::reader::Section;

/// The shortest and longest poll: a host must report several times
/// within the 30 s after which it is taken for gone.
const MIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_POLL: std::time::Duration = std::time::Duration::from_secs(10);

impl Parser<'_> {
    /// `[fleet]`, if the pipeline has one: a PostgreSQL `url` or `url_env`,
    /// its `schema`, and `poll_interval`. Only on a broker: on the embedded
    /// transport a pipeline has one host.
    pub(super) fn fleet_section(
        &mut self,
        root: &mut Section<'_>,
        transport: &TransportConfig,
    ) -> Option<FleetConfig> {
        let mut f = root.table("fleet", self.diags)?;
        let span = f.span();
        let store = self.store_keys(&mut f, "fleet", "use no fleet");
        let mut poll_interval = DEFAULT_FLEET_POLL;
        if let Some(d) = self.duration(&mut f, "poll_interval") {
            if (MIN_POLL..=MAX_POLL).contains(&d.value) {
                poll_interval = d.value;
            } else {
                self.diags.push(
                    Diagnostic::error("`fleet.poll_interval` must be between 100ms and 10s", d.span)
                        .with_label("out of range")
                        .with_note("note: a host not heard from for 30 s is taken for gone, so it must report well within that"),
                );
            }
        }
        f.finish(self.diags);
        if matches!(transport, TransportConfig::Embedded(_)) {
            self.diags.push(
                Diagnostic::error("`[fleet]` needs a broker transport", span)
                    .with_label("the embedded transport has one host")
                    .with_note("help: deploy to the one host with `switchyard deploy --host`, or run the pipeline on RabbitMQ or Kafka"),
            );
            return None;
        }
        match store {
            Some(StoreConfig::Postgres { url, schema }) => Some(FleetConfig {
                url,
                schema,
                poll_interval,
            }),
            Some(StoreConfig::Embedded { .. }) | None => {
                self.diags.push(
                    Diagnostic::error("`[fleet]` needs a PostgreSQL database", span)
                        .with_label("no `url` or `url_env`")
                        .with_note("help: set `url_env` to the variable holding the database's URL (the one the hosts' dead letters and state use is a good choice)"),
                );
                None
            }
        }
    }
}
