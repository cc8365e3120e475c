//! `[ingress]`: commands and events over HTTP.

use std::net::SocketAddr;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{
    DEFAULT_INGRESS_DEDUPE_WINDOW, DEFAULT_INGRESS_LISTEN, DEFAULT_INGRESS_MAX_BODY,
    DEFAULT_INGRESS_MAX_WAIT, DEFAULT_INGRESS_WAIT, IngressConfig,
};
use crate::config::names::parse_size;
use crate::config::reader::Section;

impl Parser<'_> {
    /// `[ingress]`, if the pipeline has one. A listener that other machines
    /// can reach must have a token: without one, anyone on the network
    /// could send commands.
    pub(super) fn ingress_section(
        &mut self,
        root: &mut Section<'_>,
        max_message_size: u64,
    ) -> Option<IngressConfig> {
        let mut s = root.table("ingress", self.diags)?;
        let mut config = IngressConfig {
            listen: DEFAULT_INGRESS_LISTEN.parse().ok()?,
            token_env: self.env_name(&mut s, "token_env", "SWITCHYARD_INGRESS_TOKEN"),
            max_body: DEFAULT_INGRESS_MAX_BODY.min(max_message_size),
            wait: DEFAULT_INGRESS_WAIT,
            max_wait: DEFAULT_INGRESS_MAX_WAIT,
            dedupe_window: DEFAULT_INGRESS_DEDUPE_WINDOW,
        };
        if let Some(l) = s.string("listen", self.diags) {
            match l.value.parse::<SocketAddr>() {
                Ok(addr) => config.listen = addr,
                Err(_) => self.diags.push(
                    Diagnostic::error(
                        format!("`{}` is not an address with a port", l.value),
                        l.span,
                    )
                    .with_label("expected e.g. \"127.0.0.1:9465\""),
                ),
            }
        }
        if !config.listen.ip().is_loopback() && config.token_env.is_none() {
            self.diags.push(
                Diagnostic::error(
                    format!(
                        "[ingress] listens on {}, which other machines can reach, without a token",
                        config.listen
                    ),
                    s.span(),
                )
                .with_label("anyone who can reach it could send commands")
                .with_note("help: set `token_env` to the environment variable holding the bearer token, or listen on 127.0.0.1"),
            );
        }
        if let Some(m) = s.string_or_int("max_body", "a size like \"1 MiB\"", self.diags) {
            match parse_size(&m.value) {
                Ok(bytes) if (1..=max_message_size).contains(&bytes) => config.max_body = bytes,
                Ok(_) => self.diags.push(
                    Diagnostic::error(
                        "`ingress.max_body` must be between 1 byte and `[host] max_message_size`",
                        m.span,
                    )
                    .with_label("out of range"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, m.span).with_label("not a size")),
            }
        }
        if let Some(d) = self.duration(&mut s, "wait") {
            config.wait = d.value;
        }
        if let Some(d) = self.duration(&mut s, "max_wait") {
            config.max_wait = d.value;
        }
        if let Some(d) = self.duration(&mut s, "dedupe_window") {
            config.dedupe_window = d.value;
        }
        if config.wait > config.max_wait {
            self.diags.push(
                Diagnostic::error("`ingress.wait` is longer than `ingress.max_wait`", s.span())
                    .with_label("the default wait must be one a request may ask for"),
            );
        }
        s.finish(self.diags);
        Some(config)
    }

    /// A key naming an environment variable (a token's, a URL's): a valid
    /// variable name, never the secret itself.
    pub(super) fn env_name(
        &mut self,
        s: &mut Section<'_>,
        key: &'static str,
        example: &str,
    ) -> Option<String> {
        let t = s.string(key, self.diags)?;
        let valid = !t.value.is_empty()
            && !t.value.starts_with(|c: char| c.is_ascii_digit())
            && t.value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            return Some(t.value);
        }
        self.diags.push(
            Diagnostic::error(
                format!("`{}` is not an environment variable name", t.value),
                t.span,
            )
            .with_label(format!("expected e.g. \"{example}\""))
            .with_note("note: the token itself never goes in the pipeline file"),
        );
        None
    }
}
