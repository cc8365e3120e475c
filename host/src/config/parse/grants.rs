//! `[plugins.NAME.grants]`: what a plugin may reach beyond its own memory
//! (environment, directories, clocks, stdio, network).

use std::net::SocketAddr;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{DirGrant, Grants};
use crate::config::origin::Origin;
use crate::config::reader::Section;

impl Parser<'_> {
    /// A `grants` table.
    pub(super) fn grants(&mut self, mut g: Section<'_>) -> Grants {
        let mut grants = Grants::default();
        self.grant_env(&mut g, &mut grants);
        grants.inherit_env = g
            .strings("inherit_env", self.diags)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.value)
            .collect();
        self.grant_dirs(&mut g, &mut grants);
        grants.clock = g.bool("clock", self.diags).is_some_and(|b| b.value);
        grants.stdio = g.bool("stdio", self.diags).is_some_and(|b| b.value);
        self.grant_network(&mut g, &mut grants);
        self.grant_http(&mut g, &mut grants);
        g.finish(self.diags);
        grants
    }

    /// `[grants.env]`: environment variables with fixed values.
    fn grant_env(&mut self, g: &mut Section<'_>, grants: &mut Grants) {
        if let Some(mut env) = g.table("env", self.diags) {
            for (k, v) in env.string_map(self.diags) {
                if k.value.is_empty() || k.value.contains('=') || k.value.contains('\0') {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`{}` is not a valid environment variable name", k.value),
                            k.span,
                        )
                        .with_label("invalid name"),
                    );
                } else {
                    grants.env.push((k.value, v.value));
                }
            }
        }
    }

    /// `[[grants.dirs]]`: host directories made visible to the plugin.
    fn grant_dirs(&mut self, g: &mut Section<'_>, grants: &mut Grants) {
        for mut d in g.tables("dirs", self.diags).unwrap_or_default() {
            let host = d.required_string("host", "\"path/on/host\"", self.diags);
            let guest = d.required_string("guest", "\"/data\"", self.diags);
            let writable = d.bool("writable", self.diags).is_some_and(|b| b.value);
            if let Some(guest) = &guest
                && !guest.value.starts_with('/')
            {
                self.diags.push(
                    Diagnostic::error(
                        format!(
                            "guest path `{}` must be absolute, like `/data`",
                            guest.value
                        ),
                        guest.span.clone(),
                    )
                    .with_label("relative path"),
                );
            }
            d.finish(self.diags);
            if let (Some(host), Some(guest)) = (host, guest)
                && guest.value.starts_with('/')
            {
                grants.dirs.push(DirGrant {
                    host: self.base.join(host.value),
                    guest: guest.value,
                    writable,
                });
            }
        }
    }

    /// `network`: addresses the plugin may connect to.
    fn grant_network(&mut self, g: &mut Section<'_>, grants: &mut Grants) {
        for addr in g.strings("network", self.diags).unwrap_or_default() {
            match addr.value.parse::<SocketAddr>() {
                Ok(a) => grants.network.push(a),
                Err(_) => self.diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` is not an IP address with a port, like \"127.0.0.1:6379\"",
                            addr.value
                        ),
                        addr.span,
                    )
                    .with_label("invalid address"),
                ),
            }
        }
    }

    /// `http`: origins the plugin may send requests to; `http_roots`: more
    /// trusted roots for HTTPS; `http_max_response`: the body cap.
    fn grant_http(&mut self, g: &mut Section<'_>, grants: &mut Grants) {
        for origin in g.strings("http", self.diags).unwrap_or_default() {
            match Origin::parse(&origin.value) {
                Ok(o) => grants.http.push(o),
                Err(why) => self.diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` is not an HTTP origin: {why}",
                            crate::text::clip(&origin.value, 64)
                        ),
                        origin.span,
                    )
                    .with_label("like \"https://api.example.com\""),
                ),
            }
        }
        if let Some(roots) = g.string("http_roots", self.diags) {
            grants.http_roots = Some(self.base.join(roots.value));
        }
        if let Some(bytes) = self.size_up_to(
            g,
            "http_max_response",
            "a size like \"1 MiB\"",
            MAX_HTTP_RESPONSE,
        ) {
            grants.http_max_response = bytes;
        }
    }
}

/// A response body lands in the plugin's memory, itself at most 4 GiB.
const MAX_HTTP_RESPONSE: u64 = 1 << 30;
