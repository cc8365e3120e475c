//! `[dead_letters]`: where failed messages go (the embedded store or
//! PostgreSQL), how often they may be replayed, and whether they are copied
//! to the broker; `[state]`: where plugins' state is kept on a broker.

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{
    DEFAULT_MAX_REPLAYS, DEFAULT_PROCESSED_RETENTION, DeadLetterConfig, StateConfig, StoreConfig,
    TransportConfig, UrlSource,
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
        let default_path = self.default_store(transport, "dead-letters");
        let mut config = DeadLetterConfig {
            store: StoreConfig::Embedded { path: default_path },
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
        if let Some(n) = d.count("max_replays", self.diags) {
            config.max_replays = u32::try_from(n.value).unwrap_or(u32::MAX);
        }
        if let Some(store) = self.store_keys(
            &mut d,
            "dead_letters",
            "keep dead letters in the embedded store",
        ) {
            config.store = store;
        }
        d.finish(self.diags);
        config
    }

    /// Where a store lives by default: in the embedded transport's own
    /// file, or for a broker `.switchyard/<pipeline>-<what>.db` next to the
    /// pipeline file.
    pub(super) fn default_store(
        &self,
        transport: &TransportConfig,
        what: &str,
    ) -> std::path::PathBuf {
        match transport {
            TransportConfig::Embedded(embedded) => embedded.path.clone(),
            TransportConfig::Amqp(_) | TransportConfig::Kafka(_) => self
                .base
                .join(".switchyard")
                .join(format!("{}-{what}.db", self.pipeline_name)),
        }
    }

    /// `[state]`: where plugins' state is kept on a broker transport.
    pub(super) fn state_section(
        &mut self,
        root: &mut Section<'_>,
        transport: &TransportConfig,
    ) -> StateConfig {
        let default_path = self.default_store(transport, "state");
        let mut config = StateConfig {
            store: StoreConfig::Embedded { path: default_path },
            processed_retention: DEFAULT_PROCESSED_RETENTION,
        };
        let Some(mut d) = root.table("state", self.diags) else {
            return config;
        };
        if let TransportConfig::Embedded(_) = transport {
            let span = d.span();
            self.diags.push(
                Diagnostic::error("`[state]` is for broker transports", span)
                .with_label("the embedded transport keeps state in its own file")
                .with_note("note: on the embedded transport, state commits in the same transaction as the message that wrote it; leave `[state]` out"),
            );
            return config;
        }
        if let Some(store) = self.store_keys(&mut d, "state", "keep state in a SQLite file") {
            config.store = store;
        }
        if let Some(t) = self.duration(&mut d, "processed_retention") {
            config.processed_retention = t.value;
        }
        d.finish(self.diags);
        config
    }

    /// `url`, `url_env`, `path` and `schema` of a store's table.
    pub(super) fn store_keys(
        &mut self,
        d: &mut Section<'_>,
        table: &str,
        what: &str,
    ) -> Option<StoreConfig> {
        let url = d.string("url", self.diags);
        let url_env = d.string("url_env", self.diags);
        let path = d.string("path", self.diags);
        let schema = d.string("schema", self.diags);
        let postgres = url.is_some() || url_env.is_some();
        let source = self.store_url(url, url_env, table, what);
        if postgres {
            self.postgres_store(path.as_ref(), schema, source)
        } else {
            self.embedded_store(path, schema.as_ref())
        }
    }

    /// `url` or `url_env`: where a PostgreSQL store's URL comes from.
    fn store_url(
        &mut self,
        url: Option<Spanned<String>>,
        url_env: Option<Spanned<String>>,
        table: &str,
        what: &str,
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
                    Diagnostic::error(format!("`{table}.url` must be a PostgreSQL URL"), u.span)
                        .with_label("expected postgres://user@host:port/database")
                        .with_note(format!("help: leave `url` out to {what} (`path`)")),
                );
            } else {
                if has_password(&u.value) {
                    self.diags.push(
                        Diagnostic::warning(format!("the `{table}.url` contains a password"), u.span.clone())
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
                        format!("`{table}.url_env` must name an environment variable"),
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
    ) -> Option<StoreConfig> {
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
        source.map(|url| StoreConfig::Postgres { url, schema })
    }

    /// The embedded store: its `path`, and no `schema`.
    fn embedded_store(
        &mut self,
        path: Option<Spanned<String>>,
        schema: Option<&Spanned<String>>,
    ) -> Option<StoreConfig> {
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
        Some(StoreConfig::Embedded {
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
