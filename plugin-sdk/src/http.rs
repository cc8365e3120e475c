//! Outbound HTTP from a handler, with [`Context::http`](crate::Context::http).
//!
//! Inside WebAssembly the request goes through `wasi:http`: the host sends
//! it only to the origins of the plugin's `http` grant, ends every wait at
//! the message's deadline and caps the response body. In
//! [`TestHost`](crate::testing::TestHost) it is answered from stubs.
//!
//! ```
//! use switchyard_sdk::http::Request;
//! # fn charge(ctx: &mut switchyard_sdk::Context<'_>) -> Result<(), switchyard_sdk::HandlerError> {
//! let answer = ctx.http(Request::post("https://gateway.example.com/charges").json(&serde_json::json!({"cents": 1200}))?)?;
//! if answer.status >= 500 {
//!     return Err(switchyard_sdk::HandlerError::transient(format!("gateway answered {}", answer.status)));
//! }
//! # Ok(()) }
//! ```

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::HandlerError;

/// An HTTP request a handler sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// `https://host[:port]/path?query`.
    pub url: String,
    /// Header names and values, sent in this order.
    pub headers: Vec<(String, String)>,
    /// The body (empty: none).
    pub body: Vec<u8>,
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: &str, url: &str) -> Self {
        Request {
            method: method.to_owned(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `GET url`.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    /// `POST url`.
    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and its `content-type`.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, HandlerError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| HandlerError::permanent(format!("cannot encode the request body: {e}")))?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// The URL's parts: scheme, authority, path with query (always
    /// starting with `/`).
    pub(crate) fn parts(&self) -> Result<(&str, &str, std::borrow::Cow<'_, str>), HttpError> {
        let bad = || {
            HttpError::new(
                HttpErrorKind::InvalidRequest,
                format!("`{}` is not an http or https URL", self.url),
            )
        };
        let (scheme, rest) = self.url.split_once("://").ok_or_else(bad)?;
        if scheme != "http" && scheme != "https" {
            return Err(bad());
        }
        let cut = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(cut);
        if authority.is_empty() {
            return Err(bad());
        }
        let path = match path.chars().next() {
            None => "/".into(),
            Some('?') => format!("/{path}").into(),
            Some(_) => path.into(),
        };
        Ok((scheme, authority, path))
    }
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text (invalid bytes replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body read as JSON; a body that is not is a permanent failure.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HandlerError::permanent(format!(
                "the HTTP response body is not the expected JSON: {e}"
            ))
        })
    }
}

/// Why a request got no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpErrorKind {
    /// The host refused it: the origin is not in the plugin's `http` grant
    /// (or, in a test, no stub answers it).
    Denied,
    /// The request itself is wrong (its URL, a header).
    InvalidRequest,
    /// No connection: refused, unreachable, DNS.
    Connect,
    /// The connection or response took too long.
    Timeout,
    /// TLS failed: a certificate not trusted, a handshake error.
    Tls,
    /// The response body is larger than the grant's `http_max_response`.
    TooLarge,
    /// Anything else the HTTP exchange failed with.
    Protocol,
}

/// A request that got no response, with the host's reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    /// What kind of failure it is.
    pub kind: HttpErrorKind,
    /// The request and the host's reason, readable.
    pub message: String,
}

impl HttpError {
    pub(crate) fn new(kind: HttpErrorKind, message: impl Into<String>) -> Self {
        HttpError {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

/// A refused or malformed request is permanent (retrying changes
/// nothing); the others are transient. The code names the kind:
/// `http-denied`, `http-timeout`, ...
impl From<HttpError> for HandlerError {
    fn from(e: HttpError) -> Self {
        let code = match e.kind {
            HttpErrorKind::Denied => "http-denied",
            HttpErrorKind::InvalidRequest => "http-invalid-request",
            HttpErrorKind::Connect => "http-connect",
            HttpErrorKind::Timeout => "http-timeout",
            HttpErrorKind::Tls => "http-tls",
            HttpErrorKind::TooLarge => "http-too-large",
            HttpErrorKind::Protocol => "http-protocol",
        };
        let error = match e.kind {
            HttpErrorKind::Denied | HttpErrorKind::InvalidRequest => {
                HandlerError::permanent(e.message)
            }
            _ => HandlerError::transient(e.message),
        };
        error.with_code(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_into_scheme_authority_and_path() {
        let parts = |u: &str| {
            Request::get(u)
                .parts()
                .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.into_owned()))
        };
        assert_eq!(
            parts("https://api.example.com:8443/v1/charges?x=1").unwrap(),
            (
                "https".into(),
                "api.example.com:8443".into(),
                "/v1/charges?x=1".into()
            )
        );
        assert_eq!(parts("http://[::1]:80").unwrap().2, "/");
        assert_eq!(parts("http://h?q").unwrap().2, "/?q");
        for bad in ["ftp://h/", "https:///x", "nothing"] {
            assert_eq!(
                parts(bad).unwrap_err().kind,
                HttpErrorKind::InvalidRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn refusals_are_permanent_and_the_network_transient() {
        let denied: HandlerError = HttpError::new(HttpErrorKind::Denied, "no").into();
        assert!(!denied.is_transient());
        let slow: HandlerError = HttpError::new(HttpErrorKind::Timeout, "slow").into();
        assert!(slow.is_transient());
    }
}
