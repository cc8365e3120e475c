//! PostgreSQL connections for the host's own stores (dead letters, state):
//! TLS as the connection string's `sslmode` asks, a bounded wait for the
//! server, the connection driven in the background.

pub mod tls;

use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio_postgres::{Client, NoTls};

use tls::TlsMode;

/// How long to wait for the server before giving up on a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects with the TLS the connection string's `sslmode` asks for (see
/// [`tls`]). `prefer` falls back to a plain connection when the TLS
/// one fails, as libpq does.
pub async fn connect(url: &str, what: &'static str) -> Result<Client> {
    let target = tls::target(url)?;
    if target.tls == TlsMode::Disable {
        return open(target.config.connect(NoTls), what).await;
    }
    let config = tls::client_config(target.tls, target.roots.as_ref())?;
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    match open(target.config.connect(connector), what).await {
        Err(e) if target.tls == TlsMode::Prefer => {
            let mut plain = target.config.clone();
            plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
            open(plain.connect(NoTls), what)
                .await
                .map_err(|plain_error| anyhow!("{e:#}; without TLS: {plain_error:#}"))
        }
        other => other,
    }
}

/// Waits for a connection within [`CONNECT_TIMEOUT`] and drives it in the
/// background.
async fn open<S, T>(
    connecting: impl Future<
        Output = Result<(Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
    >,
    what: &'static str,
) -> Result<Client>
where
    tokio_postgres::Connection<S, T>:
        Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, store = what, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}
