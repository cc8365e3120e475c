//! Outbound HTTP for plugins: `wasi:http/outgoing-handler`, deny by
//! default.
//!
//! A plugin reaches only the origins of its `http` grant (scheme, host and
//! port; `*.` for subdomains). Anything else is answered with the WASI
//! error `HTTP-request-denied` before a connection is made, and the host
//! logs which plugin asked for what. A request is sent by the host on its
//! Tokio runtime: TCP, then TLS (rustls, the Mozilla roots built into the
//! host plus the grant's `http_roots`), then HTTP/1.1.
//!
//! Nothing a plugin waits for outlives its call's deadline: connecting,
//! TLS and the response's head are cut at the deadline here, and the
//! guest's waits on the response and its body go through the
//! deadline-bounded `poll` and stream functions of `waits`. A response body
//! larger than the grant's `http_max_response` is refused (at once when
//! its `content-length` says so, otherwise when the cap is passed), so a
//! peer cannot fill the plugin's memory.
//!
//! In contract tests ([`HttpSimulation`]) nothing goes on the network:
//! requests are answered from the test's stubs, and a request no stub
//! matches is refused and remembered, so the test can fail with it.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::Sandbox;
use crate::config::{Origin, Scheme, format_size};

/// What the host answers a plugin's request with: the response and the
/// future that drives its connection.
type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

/// A plugin's `http` grant, made ready once per loaded plugin.
pub struct Outbound {
    plugin: String,
    origins: Vec<Origin>,
    max_response: u64,
    /// Built once: reading the roots is the slow part of TLS setup.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Outbound {
    /// Reads the grant; a roots file that cannot be read is an error naming
    /// it.
    pub fn new(sandbox: &Sandbox) -> Result<Outbound> {
        let grants = &sandbox.grants;
        let needs_tls = grants.http.iter().any(|o| o.scheme == Scheme::Https);
        let tls = if needs_tls {
            Some(Arc::new(client_config(grants.http_roots.as_deref())?))
        } else {
            None
        };
        Ok(Outbound {
            plugin: sandbox.name.to_string(),
            origins: grants.http.clone(),
            max_response: grants.http_max_response,
            tls,
        })
    }

    /// Whether the grant covers `uri`; `Err` says why not.
    fn admit(&self, uri: &http::Uri) -> Result<(), String> {
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            _ => return Err("only http and https are supported".into()),
        };
        let Some(host) = uri.host() else {
            return Err("the request names no host".into());
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(scheme.default_port());
        if self.origins.is_empty() {
            return Err("the plugin has no `http` grant".into());
        }
        if self.origins.iter().any(|o| o.allows(scheme, host, port)) {
            Ok(())
        } else {
            Err(format!(
                "{}://{host}:{port} is not in the plugin's `http` grant ({})",
                scheme.as_str(),
                self.origins
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

/// The rustls client configuration: the Mozilla roots, plus the PEM file's.
fn client_config(extra_roots: Option<&std::path::Path>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    if let Some(path) = extra_roots {
        crate::pem::add_roots(&mut roots, path, "http_roots")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS version in common with rustls")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A stubbed response of a contract test.
#[derive(Clone, Debug, PartialEq)]
pub struct Stub {
    pub method: String,
    pub url: String,
    /// The request's body must contain this, when set.
    pub body_contains: Option<String>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// How a contract test answers HTTP: from stubs, nothing on the network.
#[derive(Debug, Default)]
pub struct HttpSimulation {
    pub stubs: Vec<Stub>,
    /// Requests no stub matched, as `METHOD URL`, for the test's verdict.
    unmatched: Mutex<Vec<String>>,
}

impl HttpSimulation {
    pub fn new(stubs: Vec<Stub>) -> Self {
        HttpSimulation {
            stubs,
            unmatched: Mutex::default(),
        }
    }

    /// The requests no stub answered so far, and forgets them.
    pub fn take_unmatched(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .unmatched
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn answer(&self, method: &str, url: &str, body: &[u8]) -> Option<&Stub> {
        let found = self.stubs.iter().find(|s| {
            s.method.eq_ignore_ascii_case(method)
                && s.url == url
                && s.body_contains.as_ref().is_none_or(|needle| {
                    body.windows(needle.len().max(1))
                        .any(|w| w == needle.as_bytes())
                })
        });
        if found.is_none() {
            self.unmatched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(format!("{method} {url}"));
        }
        found
    }
}

/// The largest request body a stub match reads (a contract test's bodies
/// are small; a larger one matches no `body_contains`).
const MAX_STUBBED_REQUEST: usize = 1 << 20;

/// How long a request that will not be sent is given to finish writing its
/// body (see [`refused`]).
const REFUSED_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The failure of a request that will not be sent, after its body is read
/// and dropped (up to [`MAX_STUBBED_REQUEST`] bytes, for up to
/// [`REFUSED_BODY_WAIT`] and never past the call's deadline). The guest's writes of the body then succeed and it
/// learns why from the response's error code. A guest whose write fails
/// instead would see only that, and the JavaScript engine traps on it.
async fn refused(body: WasiBody, why: Error, deadline: Option<tokio::time::Instant>) -> Sent {
    let drain = http_body_util::Limited::new(body, MAX_STUBBED_REQUEST).collect();
    let mut until = tokio::time::Instant::now() + REFUSED_BODY_WAIT;
    if let Some(d) = deadline {
        until = until.min(d);
    }
    let _ = tokio::time::timeout_at(until, drain).await;
    Err(why)
}

/// The `wasi:http` hooks of one instance.
pub struct Hooks {
    outbound: Arc<Outbound>,
    /// The current call's deadline, refreshed before each use.
    pub(super) deadline: Option<tokio::time::Instant>,
    network_down: bool,
    simulation: Option<Arc<HttpSimulation>>,
}

impl Hooks {
    pub fn new(
        outbound: Arc<Outbound>,
        network_down: bool,
        simulation: Option<Arc<HttpSimulation>>,
    ) -> Self {
        Hooks {
            outbound,
            deadline: None,
            network_down,
            simulation,
        }
    }
}

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let uri = request.uri().clone();
        let method = request.method().clone();
        if let Err(why) = self.outbound.admit(&uri) {
            tracing::warn!(
                plugin = %self.outbound.plugin,
                method = %method,
                url = %crate::limits::quote(&uri.to_string()),
                "refused an HTTP request: {why}"
            );
            return Box::new(refused(
                request.into_body(),
                Error::HttpRequestDenied,
                self.deadline,
            ));
        }
        if self.network_down {
            return Box::new(refused(
                request.into_body(),
                Error::ConnectionRefused,
                self.deadline,
            ));
        }
        let max = self.outbound.max_response;
        if let Some(sim) = self.simulation.clone() {
            return Box::new(async move { stubbed(&sim, request, max).await });
        }
        let tls = self.outbound.tls.clone();
        let deadline = self.deadline;
        Box::new(async move {
            let send = send(request, tls, max);
            match deadline {
                Some(at) => tokio::time::timeout_at(at, send)
                    .await
                    .unwrap_or(Err(Error::ConnectionTimeout)),
                None => send.await,
            }
        })
    }
}

/// Answers from the stubs; an unmatched request is refused (and noted).
async fn stubbed(sim: &HttpSimulation, request: http::Request<WasiBody>, max: u64) -> Sent {
    let method = request.method().to_string();
    let url = request.uri().to_string();
    let body = http_body_util::Limited::new(request.into_body(), MAX_STUBBED_REQUEST)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Some(stub) = sim.answer(&method, &url, &body) else {
        return Err(Error::HttpRequestDenied);
    };
    if stub.body.len() as u64 > max {
        return Err(Error::HttpResponseBodySize(Some(stub.body.len() as u64)));
    }
    let mut response = http::Response::builder().status(stub.status);
    for (k, v) in &stub.headers {
        response = response.header(k, v);
    }
    let body = http_body_util::Full::new(Bytes::from(stub.body.clone()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let response = response
        .body(body)
        .map_err(|e| Error::InternalError(Some(format!("stub response: {e}"))))?;
    Ok((response, Box::new(async { Ok(()) })))
}

/// A stream the request goes over, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A connection to the request's origin, with TLS for `https`, ready for
/// one HTTP/1.1 request.
async fn connect(
    uri: &http::Uri,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<WasiBody>,
        hyper::client::conn::http1::Connection<hyper_util::rt::TokioIo<Box<dyn Stream>>, WasiBody>,
    ),
    Error,
> {
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or(Error::HttpRequestUriInvalid)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(Error::Connect)?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Stream> = if https {
        let tls = tls.ok_or(Error::ConfigurationError)?;
        let name = ServerName::try_from(host)
            .map_err(|_| Error::HttpRequestUriInvalid)?
            .to_owned();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(Error::Tls)?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    Ok(hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?)
}

/// Sends `request` over a connection of its own.
async fn send(
    mut request: http::Request<WasiBody>,
    tls: Option<Arc<rustls::ClientConfig>>,
    max: u64,
) -> Sent {
    let (mut sender, connection) = match connect(request.uri(), tls).await {
        Ok(connected) => connected,
        // Inside the call's deadline already (see `send_request`).
        Err(why) => return refused(request.into_body(), why, None).await,
    };
    let uri = request.uri().clone();
    // The connection runs beside the request; dropping the handle (the
    // instance drops the response) stops it.
    let connection = wasmtime_wasi::runtime::spawn(connection);
    // On the wire the target is the path (`/` before a bare query); the
    // host is in `Host`.
    let target = uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let target = if target.starts_with('/') {
        target.to_owned()
    } else {
        format!("/{target}")
    };
    let head_only = request.method() == http::Method::HEAD;
    *request.uri_mut() = target
        .parse::<http::Uri>()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    let response = sender.send_request(request).await?;
    // A response that has no body may announce the length of one (HEAD,
    // 1xx, 204, 304): nothing to refuse there.
    let status = response.status();
    let bodiless = head_only
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED;
    if let Some(length) = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > max
        && !bodiless
    {
        return Err(Error::HttpResponseBodySize(Some(length)));
    }
    let response = response.map(|body| {
        Capped {
            body,
            left: max,
            max,
        }
        .boxed_unsync()
    });
    Ok((
        response,
        Box::new(async move { connection.await.map_err(Error::from) }),
    ))
}

/// A response body that fails once it passes `max` bytes.
struct Capped {
    body: hyper::body::Incoming,
    left: u64,
    max: u64,
}

impl http_body::Body for Capped {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                match self.left.checked_sub(n) {
                    Some(left) => {
                        self.left = left;
                        Poll::Ready(Some(Ok(frame)))
                    }
                    None => {
                        let max = self.max;
                        tracing::debug!(
                            "an HTTP response body passed the {} cap",
                            format_size(max)
                        );
                        Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(max + 1)))))
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Error::from(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
