//! PostgreSQL connections for the host's own stores (dead letters, state):
//! TLS as the connection string's `sslmode` asks, a bounded wait for the
//! server, the connection driven in the background.

pub mod tls;

use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

use tls::TlsMode;

/// How long to wait for the server before giving up on a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to one of the host's stores, made again when it dropped.
/// Callers hold the guard for as long as they use the connection (a
/// transaction needs it whole).
pub struct Reconnecting {
    url: String,
    what: &'static str,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Reconnecting {
    /// Starts from `client`, connected to `url`; `what` names the store in
    /// errors and logs.
    pub fn new(url: &str, what: &'static str, client: Client) -> Self {
        Reconnecting {
            url: url.to_owned(),
            what,
            client: tokio::sync::Mutex::new(Some(client)),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection, re-established if it dropped.
    pub async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let client = connect(&self.url, self.what).await.map_err(|e| {
                e.context(format!(
                    "cannot reconnect to the {} {}",
                    self.what,
                    crate::config::redact(&self.url)
                ))
            })?;
            *guard = Some(client);
        }
        Ok(guard)
    }
}

/// Connects with the TLS the connection string's `sslmode` asks for (see
/// [`tls`]). `prefer` falls back to a plain connection when the TLS
/// one fails, as libpq does.
pub async fn connect(url: &str, what: &'static str) -> Result<Client> {
    connect_with(url, what, None).await
}

/// [`connect`], handing every notification the server sends (`LISTEN`)
/// to `notices`.
pub async fn connect_listening(
    url: &str,
    what: &'static str,
    notices: mpsc::UnboundedSender<Notification>,
) -> Result<Client> {
    connect_with(url, what, Some(notices)).await
}

async fn connect_with(
    url: &str,
    what: &'static str,
    notices: Option<mpsc::UnboundedSender<Notification>>,
) -> Result<Client> {
    let target = tls::target(url)?;
    if target.tls == TlsMode::Disable {
        return open(target.config.connect(NoTls), what, notices).await;
    }
    let config = tls::client_config(target.tls, target.roots.as_ref())?;
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    match open(target.config.connect(connector), what, notices.clone()).await {
        Err(e) if target.tls == TlsMode::Prefer => {
            let mut plain = target.config.clone();
            plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
            open(plain.connect(NoTls), what, notices)
                .await
                .map_err(|plain_error| anyhow!("{e:#}; without TLS: {plain_error:#}"))
        }
        other => other,
    }
}

/// Waits for a connection within [`CONNECT_TIMEOUT`] and drives it in the
/// background, handing notifications to `notices` if given.
async fn open<S, T>(
    connecting: impl Future<
        Output = Result<(Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
    >,
    what: &'static str,
    notices: Option<mpsc::UnboundedSender<Notification>>,
) -> Result<Client>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, mut connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))??;
    tokio::spawn(async move {
        let ended = match notices {
            None => connection.await,
            Some(notices) => loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        // Nobody listening any more: the connection may end.
                        if notices.send(n).is_err() {
                            break Ok(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                }
            },
        };
        if let Err(e) = ended {
            tracing::warn!(error = %e, store = what, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Runs `create` (`CREATE … IF NOT EXISTS` statements). Hosts that start
/// together race to create the same tables: `IF NOT EXISTS` does not stop
/// two from trying at once, and the loser is told the name is taken. The
/// second try finds them.
pub async fn create_tables(client: &Client, create: &str) -> Result<(), tokio_postgres::Error> {
    match client.batch_execute(create).await {
        Err(e)
            if e.code().is_some_and(|c| {
                *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                    || *c == tokio_postgres::error::SqlState::DUPLICATE_SCHEMA
                    || *c == tokio_postgres::error::SqlState::DUPLICATE_TABLE
                    || *c == tokio_postgres::error::SqlState::DUPLICATE_OBJECT
            }) =>
        {
            client.batch_execute(create).await
        }
        other => other,
    }
}
