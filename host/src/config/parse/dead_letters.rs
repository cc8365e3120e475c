//! `[dead_letters]`: where failed messages go (the embedded store or
//! PostgreSQL), how often they may be replayed, and whether they are copied
//! to the broker.

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{
    DEFAULT_MAX_REPLAYS, DeadLetterConfig, DeadLetterStoreConfig, TransportConfig, UrlSource,
};
use crate::config::reader::{Section, Spanned};
use crate::config::redact::{has_password, redact};

impl Parser<'_> {
    /// `[dead_letters]`: where failed messages go.
    pub(super) fn dead_letters_section(
        &mut self,
        root: &mut Section<'_>,
        transport: &TransportConfig,
    ) -> DeadLetterConfig {
        let default_path = match transport {
            TransportConfig::Embedded(embedded) => embedded.path.clone(),
            TransportConfig::Amqp(_) | TransportConfig::Kafka(_) => self
                .base
                .join(".switchyard")
                .join(format!("{}-dead-letters.db", self.pipeline_name)),
        };
        let mut config = DeadLetterConfig {
            store: DeadLetterStoreConfig::Embedded { path: default_path },
            max_replays: DEFAULT_MAX_REPLAYS,
            broker: false,
        };
        let Some(mut d) = root.table("dead_letters", self.diags) else {
            return config;
        };
        if let Some(b) = d.bool("broker", self.diags) {
            if b.value && matches!(transport, TransportConfig::Embedded(_)) {
                self.diags.push(
                    Diagnostic::error(
                        "`dead_letters.broker` needs a broker transport",
                        b.span,
                    )
                    .with_label("the embedded transport has no broker")
                    .with_note("note: it copies dead letters to `<queue>.dlq` on RabbitMQ or `<topic>.dlq` on Kafka; on the embedded transport, `switchyard dlq` is the place to look"),
                );
            } else {
                config.broker = b.value;
            }
        }
        let url = d.string("url", self.diags);
        let url_env = d.string("url_env", self.diags);
        let path = d.string("path", self.diags);
        let schema = d.string("schema", self.diags);
        if let Some(n) = d.count("max_replays", self.diags) {
            config.max_replays = u32::try_from(n.value).unwrap_or(u32::MAX);
        }
        let postgres = url.is_some() || url_env.is_some();
        let source = self.dead_letters_url(url, url_env);
        let store = if postgres {
            self.postgres_store(path.as_ref(), schema, source)
        } else {
            self.embedded_store(path, schema.as_ref())
        };
        if let Some(store) = store {
            config.store = store;
        }
        d.finish(self.diags);
        config
    }

    /// `url` or `url_env`: where a PostgreSQL store's URL comes from.
    fn dead_letters_url(
        &mut self,
        url: Option<Spanned<String>>,
        url_env: Option<Spanned<String>>,
    ) -> Option<UrlSource> {
        if let (Some(u), Some(e)) = (&url, &url_env) {
            self.diags.push(
                Diagnostic::error("give either `url` or `url_env`, not both", e.span.clone())
                    .with_label("second URL")
                    .with_note(format!(
                        "note: `url` is already set to {}",
                        redact(&u.value)
                    )),
            );
        }
        let mut source = None;
        if let Some(u) = url {
            if !(u.value.starts_with("postgres://") || u.value.starts_with("postgresql://")) {
                self.diags.push(
                    Diagnostic::error("`dead_letters.url` must be a PostgreSQL URL", u.span)
                        .with_label("expected postgres://user@host:port/database")
                        .with_note("help: leave `url` out to keep dead letters in the embedded store (`path`)"),
                );
            } else {
                if has_password(&u.value) {
                    self.diags.push(
                        Diagnostic::warning("the dead-letter URL contains a password", u.span.clone())
                            .with_label("password in clear text")
                            .with_note("help: put the URL in an environment variable and name it with `url_env`"),
                    );
                }
                source = Some(UrlSource::Literal(u.value));
            }
        } else if let Some(e) = url_env {
            if e.value.is_empty() || e.value.contains('=') {
                self.diags.push(
                    Diagnostic::error(
                        "`dead_letters.url_env` must name an environment variable",
                        e.span,
                    )
                    .with_label("invalid name"),
                );
            } else {
                source = Some(UrlSource::Env(e.value));
            }
        }
        source
    }

    /// A PostgreSQL store: its `schema`, and no `path`.
    fn postgres_store(
        &mut self,
        path: Option<&Spanned<String>>,
        schema: Option<Spanned<String>>,
        source: Option<UrlSource>,
    ) -> Option<DeadLetterStoreConfig> {
        if let Some(p) = path {
            self.diags.push(
                Diagnostic::error(
                    "`path` is for the embedded store; this one is PostgreSQL",
                    p.span.clone(),
                )
                .with_label("not used with a PostgreSQL store"),
            );
        }
        let schema = match schema {
            Some(s) if valid_identifier(&s.value) => s.value,
            Some(s) => {
                self.diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` is not a valid schema name; use lowercase letters, digits and `_`",
                            s.value
                        ),
                        s.span,
                    )
                    .with_label("invalid schema"),
                );
                String::new()
            }
            None => "switchyard".into(),
        };
        source.map(|url| DeadLetterStoreConfig::Postgres { url, schema })
    }

    /// The embedded store: its `path`, and no `schema`.
    fn embedded_store(
        &mut self,
        path: Option<Spanned<String>>,
        schema: Option<&Spanned<String>>,
    ) -> Option<DeadLetterStoreConfig> {
        if let Some(s) = schema {
            self.diags.push(
                Diagnostic::error(
                    "`schema` is for a PostgreSQL store; set `url` or `url_env`",
                    s.span.clone(),
                )
                .with_label("not used without a URL"),
            );
        }
        let p = path?;
        Some(DeadLetterStoreConfig::Embedded {
            path: self.base.join(p.value),
        })
    }
}

/// A PostgreSQL schema name, unquoted.
fn valid_identifier(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
