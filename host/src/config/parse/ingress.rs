//! `[ingress]`: commands and events over HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{
    DEFAULT_INGRESS_DEDUPE_WINDOW, DEFAULT_INGRESS_LISTEN, DEFAULT_INGRESS_MAX_BODY,
    DEFAULT_INGRESS_MAX_WAIT, DEFAULT_INGRESS_WAIT, IngressConfig, IngressTls,
};
use crate::config::names::{MessageType, parse_size};
use crate::config::reader::Section;

impl Parser<'_> {
    /// `[ingress]`, if the pipeline has one. A listener that other machines
    /// can reach must have a token: without one, anyone on the network
    /// could send commands.
    pub(super) fn ingress_section(
        &mut self,
        root: &mut Section<'_>,
        max_message_size: u64,
        routed: &BTreeSet<&str>,
    ) -> Option<IngressConfig> {
        let mut s = root.table("ingress", self.diags)?;
        let mut config = IngressConfig {
            listen: DEFAULT_INGRESS_LISTEN.parse().ok()?,
            token_env: self.env_name(&mut s, "token_env", "SWITCHYARD_INGRESS_TOKEN"),
            type_tokens: BTreeMap::new(),
            tls: None,
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
        if let Some(mut t) = s.table("tokens", self.diags) {
            config.type_tokens = self.type_tokens(&mut t, routed);
        }
        config.tls = self.ingress_tls(&mut s);
        if !config.listen.ip().is_loopback()
            && config.token_env.is_none()
            && config.type_tokens.is_empty()
        {
            self.diags.push(
                Diagnostic::error(
                    format!(
                        "[ingress] listens on {}, which other machines can reach, without a token",
                        config.listen
                    ),
                    s.span(),
                )
                .with_label("anyone who can reach it could send commands")
                .with_note("help: set `token_env` (or `[ingress.tokens]`) to the environment variable holding the bearer token, or listen on 127.0.0.1"),
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

    /// `[ingress.tokens]`: message type = the environment variable of a
    /// token good for that type only.
    /// A type no plugin takes is refused: its token could never be used,
    /// and the sender it was meant for would be turned away.
    fn type_tokens(
        &mut self,
        t: &mut Section<'_>,
        routed: &BTreeSet<&str>,
    ) -> BTreeMap<MessageType, String> {
        let mut out = BTreeMap::new();
        for (k, v) in t.string_map(self.diags) {
            let ty = match MessageType::try_from(k.value.as_str()) {
                Ok(ty) => ty,
                Err(e) => {
                    self.diags
                        .push(Diagnostic::error(e, k.span).with_label("not a message type"));
                    continue;
                }
            };
            if !routed.contains(ty.as_str()) {
                let known: Vec<&str> = routed.iter().copied().collect();
                self.diags.push(
                    Diagnostic::error(
                        format!(
                            "[ingress.tokens] names `{ty}`, which no plugin of the pipeline takes"
                        ),
                        k.span,
                    )
                    .with_label("unknown type")
                    .with_note(format!(
                        "note: the types the plugins take are {}",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    )),
                );
                continue;
            }
            if valid_env_name(&v.value) {
                out.insert(ty, v.value);
            } else {
                self.diags
                    .push(not_an_env_name(&v.value, v.span, "PSP_WEBHOOK_TOKEN"));
            }
        }
        out
    }

    /// `tls_cert` and `tls_key`: both or neither.
    fn ingress_tls(&mut self, s: &mut Section<'_>) -> Option<IngressTls> {
        let cert = s.string("tls_cert", self.diags);
        let key = s.string("tls_key", self.diags);
        match (cert, key) {
            (Some(c), Some(k)) => Some(IngressTls {
                cert: self.base.join(c.value),
                key: self.base.join(k.value),
            }),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                self.diags.push(
                    Diagnostic::error("[ingress] TLS needs both `tls_cert` and `tls_key`", one.span)
                        .with_label("the other one is missing")
                        .with_note("note: `tls_cert` is the PEM certificate chain (the server's own first), `tls_key` its PEM private key"),
                );
                None
            }
        }
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
        if valid_env_name(&t.value) {
            return Some(t.value);
        }
        self.diags.push(not_an_env_name(&t.value, t.span, example));
        None
    }
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn not_an_env_name(name: &str, span: Option<std::ops::Range<usize>>, example: &str) -> Diagnostic {
    Diagnostic::error(
        format!("`{name}` is not an environment variable name"),
        span,
    )
    .with_label(format!("expected e.g. \"{example}\""))
    .with_note("note: the token itself never goes in the pipeline file")
}
