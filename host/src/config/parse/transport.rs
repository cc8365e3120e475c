//! `[transport]`: the embedded store, RabbitMQ (`kind = "amqp"`) or Kafka
//! (`kind = "kafka"`), and the settings of each.

use std::time::Duration;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{
    AmqpConfig, DEFAULT_AMQP_URL, DEFAULT_BATCH_SIZE, DEFAULT_KAFKA_SERVERS, DEFAULT_POLL_INTERVAL,
    EmbeddedConfig, KAFKA_RESERVED_PROPERTIES, KafkaConfig, TransportConfig, UrlSource,
};
use crate::config::reader::Section;
use crate::config::redact::has_password;

impl Parser<'_> {
    /// `[transport]`: its kind, and the embedded transport's keys when it is
    /// the one.
    pub(super) fn transport_section(
        &mut self,
        root: &mut Section<'_>,
        pipeline: &str,
    ) -> TransportConfig {
        let default_path = self.base.join(".switchyard").join(format!("{pipeline}.db"));
        let mut config = EmbeddedConfig {
            path: default_path,
            fsync: true,
            batch_size: DEFAULT_BATCH_SIZE as usize,
            poll_interval: DEFAULT_POLL_INTERVAL,
        };
        let Some(mut t) = root.table("transport", self.diags) else {
            return TransportConfig::Embedded(config);
        };
        let kind = t.choice(
            "kind",
            &["embedded", "amqp", "rabbitmq", "kafka"],
            Some("`embedded` keeps the queues in a SQLite file; `amqp` (or `rabbitmq`) is RabbitMQ; `kafka` is Kafka"),
            self.diags,
        );
        match kind.as_ref().map(|k| k.value.as_str()) {
            Some("amqp" | "rabbitmq") => return self.amqp_transport(t, pipeline),
            Some("kafka") => return self.kafka_transport(t, pipeline),
            // The embedded transport, or a kind already reported.
            _ => {}
        }
        if let Some(path) = t.string("path", self.diags) {
            if path.value.trim().is_empty() {
                self.diags
                    .error("`transport.path` must not be empty", path.span);
            } else {
                config.path = self.base.join(path.value);
            }
        }
        if let Some(sync) = t.choice(
            "sync",
            &["full", "normal"],
            Some("\"full\" survives power loss; \"normal\" survives a crash of the host process only"),
            self.diags,
        ) {
            config.fsync = sync.value == "full";
        }
        if let Some(n) = t.count_in("batch_size", 1..=10_000, self.diags) {
            config.batch_size = usize::try_from(n.value).unwrap_or(10_000);
        }
        if let Some(d) = self.duration(&mut t, "poll_interval") {
            config.poll_interval = d.value;
        }
        t.finish(self.diags);
        TransportConfig::Embedded(config)
    }

    /// `[transport]` with `kind = "amqp"`.
    fn amqp_transport(&mut self, mut t: Section<'_>, pipeline: &str) -> TransportConfig {
        let mut config = AmqpConfig {
            url: UrlSource::Literal(DEFAULT_AMQP_URL.into()),
            prefetch: DEFAULT_BATCH_SIZE as u16,
            exchange: format!("switchyard.{pipeline}"),
            connect_timeout: Duration::from_secs(10),
        };
        self.amqp_url(&mut t, &mut config);
        if let Some(n) = t.count_in("prefetch", 1..=65_535, self.diags) {
            config.prefetch = u16::try_from(n.value).unwrap_or(u16::MAX);
        }
        if let Some(x) = t.string("exchange", self.diags) {
            if x.value.is_empty() || x.value.len() > 200 {
                self.diags.push(
                    Diagnostic::error("`transport.exchange` must be 1 to 200 characters", x.span)
                        .with_label("invalid exchange name"),
                );
            } else {
                config.exchange = x.value;
            }
        }
        if let Some(d) = self.duration(&mut t, "connect_timeout") {
            config.connect_timeout = d.value;
        }
        t.finish(self.diags);
        TransportConfig::Amqp(config)
    }

    /// `url` or `url_env` of the AMQP transport.
    fn amqp_url(&mut self, t: &mut Section<'_>, config: &mut AmqpConfig) {
        let url = t.string("url", self.diags);
        let url_env = t.string("url_env", self.diags);
        match (url, url_env) {
            (Some(_), Some(e)) => self.diags.push(
                Diagnostic::error("give either `url` or `url_env`, not both", e.span)
                    .with_label("second URL"),
            ),
            (Some(u), None) => {
                if !(u.value.starts_with("amqp://") || u.value.starts_with("amqps://")) {
                    self.diags.push(
                        Diagnostic::error(
                            "`transport.url` must be an amqp:// or amqps:// URL",
                            u.span,
                        )
                        .with_label("expected e.g. \"amqp://127.0.0.1:5672/%2f\""),
                    );
                } else {
                    if has_password(&u.value) {
                        self.diags.push(
                            Diagnostic::warning("the broker URL contains a password", u.span.clone())
                                .with_label("password in clear text")
                                .with_note("help: put the URL in an environment variable and name it with `url_env`"),
                        );
                    }
                    config.url = UrlSource::Literal(u.value);
                }
            }
            (None, Some(e)) => {
                if e.value.is_empty() || e.value.contains('=') {
                    self.diags.push(
                        Diagnostic::error(
                            "`transport.url_env` must name an environment variable",
                            e.span,
                        )
                        .with_label("invalid name"),
                    );
                } else {
                    config.url = UrlSource::Env(e.value);
                }
            }
            (None, None) => {}
        }
    }

    /// `[transport]` with `kind = "kafka"`.
    fn kafka_transport(&mut self, mut t: Section<'_>, pipeline: &str) -> TransportConfig {
        let mut config = KafkaConfig {
            bootstrap_servers: DEFAULT_KAFKA_SERVERS.into(),
            topic_prefix: format!("{pipeline}."),
            group_prefix: format!("switchyard.{pipeline}"),
            partitions: 3,
            replication_factor: 1,
            create_topics: true,
            batch_size: DEFAULT_BATCH_SIZE as usize,
            timeout: Duration::from_secs(10),
            security_protocol: "plaintext".into(),
            sasl_mechanism: None,
            sasl_username_env: None,
            sasl_password_env: None,
            ssl_ca_location: None,
            properties: Vec::new(),
        };
        self.kafka_names(&mut t, &mut config);
        self.kafka_topics(&mut t, &mut config);
        if let Some(n) = t.count_in("batch_size", 1..=10_000, self.diags) {
            config.batch_size = usize::try_from(n.value).unwrap_or(10_000);
        }
        if let Some(d) = self.duration(&mut t, "timeout") {
            config.timeout = d.value;
        }
        self.kafka_security(&mut t, &mut config);
        self.kafka_properties(&mut t, &mut config);
        t.finish(self.diags);
        TransportConfig::Kafka(config)
    }

    /// Where the Kafka cluster is, and the prefixes of topic and group names.
    fn kafka_names(&mut self, t: &mut Section<'_>, config: &mut KafkaConfig) {
        if let Some(b) = t.string("bootstrap_servers", self.diags) {
            if b.value.trim().is_empty() || b.value.contains("://") {
                self.diags.push(
                    Diagnostic::error(
                        "`transport.bootstrap_servers` must be a list of host:port",
                        b.span,
                    )
                    .with_label("expected e.g. \"kafka1:9092,kafka2:9092\""),
                );
            } else {
                config.bootstrap_servers = b.value;
            }
        }
        let topic_chars = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if let Some(p) = t.string("topic_prefix", self.diags) {
            if p.value.len() > 100 || !topic_chars(&p.value) {
                self.diags.push(
                    Diagnostic::error(
                        "`transport.topic_prefix` may hold letters, digits, `.`, `_` and `-`, up to 100",
                        p.span,
                    )
                    .with_label("not usable in a topic name"),
                );
            } else {
                config.topic_prefix = p.value;
            }
        }
        if let Some(g) = t.string("group_prefix", self.diags) {
            if g.value.is_empty() || g.value.len() > 200 {
                self.diags.push(
                    Diagnostic::error(
                        "`transport.group_prefix` must be 1 to 200 characters",
                        g.span,
                    )
                    .with_label("invalid group name"),
                );
            } else {
                config.group_prefix = g.value;
            }
        }
    }

    /// The shape of the topics the host creates, and whether it does.
    fn kafka_topics(&mut self, t: &mut Section<'_>, config: &mut KafkaConfig) {
        if let Some(n) = t.count_in("partitions", 1..=10_000, self.diags) {
            config.partitions = i32::try_from(n.value).unwrap_or(10_000);
        }
        if let Some(n) = t.count_in("replication_factor", 1..=100, self.diags) {
            config.replication_factor = i32::try_from(n.value).unwrap_or(100);
        }
        if let Some(c) = t.bool("create_topics", self.diags) {
            config.create_topics = c.value;
        }
    }

    /// `security_protocol`, SASL and TLS: credentials only by environment
    /// variable.
    fn kafka_security(&mut self, t: &mut Section<'_>, config: &mut KafkaConfig) {
        let mut protocol_span = None;
        if let Some(p) = t.string("security_protocol", self.diags) {
            match p.value.to_ascii_lowercase().as_str() {
                v @ ("plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl") => {
                    config.security_protocol = v.to_owned();
                    protocol_span = Some(p.span);
                }
                _ => self.diags.push(
                    Diagnostic::error(format!("unknown security protocol `{}`", p.value), p.span)
                        .with_label("expected plaintext, ssl, sasl_plaintext or sasl_ssl"),
                ),
            }
        }
        let sasl = config.security_protocol.starts_with("sasl");
        if let Some(m) = t.string("sasl_mechanism", self.diags) {
            match m.value.as_str() {
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
                    config.sasl_mechanism = Some(m.value);
                }
                _ => self.diags.push(
                    Diagnostic::error(format!("unknown SASL mechanism `{}`", m.value), m.span)
                        .with_label("expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
                ),
            }
        }
        for (key, slot) in [
            ("sasl_username_env", &mut config.sasl_username_env),
            ("sasl_password_env", &mut config.sasl_password_env),
        ] {
            if let Some(v) = t.string(key, self.diags) {
                if v.value.is_empty() || v.value.contains('=') {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`transport.{key}` must name an environment variable"),
                            v.span,
                        )
                        .with_label("invalid name"),
                    );
                } else {
                    *slot = Some(v.value);
                }
            }
        }
        if sasl && (config.sasl_username_env.is_none() || config.sasl_password_env.is_none()) {
            self.diags.push(
                Diagnostic::error(
                    "a SASL security protocol needs `sasl_username_env` and `sasl_password_env`",
                    protocol_span.unwrap_or_else(|| t.span()),
                )
                .with_label("SASL without credentials")
                .with_note("note: credentials come from environment variables, never from the pipeline file"),
            );
        }
        if let Some(ca) = t.string("ssl_ca_location", self.diags) {
            config.ssl_ca_location = Some(self.base.join(ca.value));
        }
    }

    /// `[transport.properties]`: further librdkafka settings, none of them
    /// reserved or secret.
    fn kafka_properties(&mut self, t: &mut Section<'_>, config: &mut KafkaConfig) {
        if let Some(mut props) = t.table("properties", self.diags) {
            for (k, v) in props.string_map(self.diags) {
                if KAFKA_RESERVED_PROPERTIES.contains(&k.value.as_str()) {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`{}` is set by the transport and cannot be changed", k.value),
                            k.span,
                        )
                        .with_label("reserved")
                        .with_note("note: the transport relies on it for at-least-once delivery, or has its own key for it"),
                    );
                } else if k.value.contains("password") || k.value.contains("secret") {
                    self.diags.push(
                        Diagnostic::error(
                            format!(
                                "`{}` looks like a secret; it cannot be given in the pipeline file",
                                k.value
                            ),
                            k.span,
                        )
                        .with_label("secret"),
                    );
                } else {
                    config.properties.push((k.value, v.value));
                }
            }
        }
    }
}
