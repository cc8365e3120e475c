//! `[host]` and `[admin]`: the host process's own settings (caches, state,
//! watching, message size, crash-loop guard) and its admin listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_CRASH_LOOP_LIMIT, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_WATCH_INTERVAL,
};
use crate::config::reader::Section;

/// The most `[host] max_message_size` may allow: a plugin's whole output
/// for one message is capped at 64 MiB.
const MAX_MESSAGE_SIZE: u64 = 64 << 20;

/// `[host]` as read.
pub(super) struct HostSection {
    pub(super) cache_dir: Option<PathBuf>,
    pub(super) watch: bool,
    pub(super) watch_interval: Duration,
    pub(super) state_dir: PathBuf,
    pub(super) max_message_size: u64,
    pub(super) crash_loop_limit: u32,
}

impl Parser<'_> {
    /// `[host]`: where the host keeps its caches and state, and whether it
    /// watches its files.
    pub(super) fn host_section(&mut self, root: &mut Section<'_>) -> HostSection {
        let mut host = HostSection {
            cache_dir: None,
            watch: false,
            watch_interval: DEFAULT_WATCH_INTERVAL,
            state_dir: self.base.join(".switchyard"),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            crash_loop_limit: DEFAULT_CRASH_LOOP_LIMIT,
        };
        let Some(mut h) = root.table("host", self.diags) else {
            return host;
        };
        host.cache_dir = h
            .string("cache_dir", self.diags)
            .map(|s| self.base.join(s.value));
        if let Some(dir) = h.string("state_dir", self.diags) {
            if dir.value.trim().is_empty() {
                self.diags
                    .error("`host.state_dir` must not be empty", dir.span);
            } else {
                host.state_dir = self.base.join(dir.value);
            }
        }
        if let Some(w) = h.bool("watch", self.diags) {
            host.watch = w.value;
        }
        if let Some(d) = self.duration(&mut h, "watch_interval") {
            host.watch_interval = d.value;
        }
        if let Some(bytes) = self.size_up_to(
            &mut h,
            "max_message_size",
            "a size like \"16 MiB\"",
            MAX_MESSAGE_SIZE,
        ) {
            host.max_message_size = bytes;
        }
        if let Some(n) = h.count("crash_loop_limit", self.diags) {
            match u32::try_from(n.value) {
                Ok(v) if v >= 1 => host.crash_loop_limit = v,
                _ => self.diags.push(
                    Diagnostic::error("`host.crash_loop_limit` must be at least 1", n.span)
                        .with_label("out of range"),
                ),
            }
        }
        h.finish(self.diags);
        host
    }

    /// `[admin]`: the HTTP listener for `/metrics`, `/healthz` and the
    /// plugin endpoints, and the token its changing endpoints require.
    pub(super) fn admin_section(
        &mut self,
        root: &mut Section<'_>,
    ) -> (Option<SocketAddr>, Option<String>) {
        let default = DEFAULT_ADMIN_LISTEN.parse().ok();
        let Some(mut a) = root.table("admin", self.diags) else {
            return (default, None);
        };
        let token_env = self.env_name(&mut a, "token_env", "SWITCHYARD_ADMIN_TOKEN");
        let listen = match a.string("listen", self.diags) {
            None => default,
            Some(l) if l.value == "off" => None,
            Some(l) => match l.value.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`{}` is not an address with a port", l.value),
                            l.span,
                        )
                        .with_label("expected e.g. \"127.0.0.1:9464\" or \"off\""),
                    );
                    default
                }
            },
        };
        a.finish(self.diags);
        (listen, token_env)
    }
}
