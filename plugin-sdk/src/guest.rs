//! The WebAssembly side: wit-bindgen bindings and their conversion to the
//! SDK's plain Rust types. Only compiled for WebAssembly targets.

/// Generated from `wit/`; hidden behind the SDK's own types.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_switchyard_plugin",
        default_bindings_module: "switchyard_sdk::__guest::bindings",
    });
}

use bindings::switchyard::plugin::{host, saga, state, types as wit};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::context::Outbox;
use crate::message::Metadata;
use crate::{
    Context, ErrorKind, HandlerError, Kind, LogLevel, Message, Outgoing, Plugin, Response,
};

fn kind_to_wit(kind: Kind) -> wit::Kind {
    match kind {
        Kind::Command => wit::Kind::Command,
        Kind::Event => wit::Kind::Event,
    }
}

/// Calls the host imports directly: the host does the buffering.
struct HostImports;

impl Outbox for HostImports {
    fn publish(&mut self, event: Outgoing) {
        host::publish(&outgoing_to_wit(event));
    }

    fn send(&mut self, command: Outgoing) {
        host::send(&outgoing_to_wit(command));
    }

    fn reply(&mut self, answer: Response) {
        host::reply(&wit::Response {
            payload: answer.payload,
            content_type: answer.content_type,
            headers: answer.headers,
        });
    }

    fn log(&mut self, level: LogLevel, text: &str) {
        let level = match level {
            LogLevel::Trace => wit::LogLevel::Trace,
            LogLevel::Debug => wit::LogLevel::Debug,
            LogLevel::Info => wit::LogLevel::Info,
            LogLevel::Warn => wit::LogLevel::Warn,
            LogLevel::Error => wit::LogLevel::Error,
        };
        host::log(level, text);
    }

    fn span_attribute(&mut self, key: &str, value: &str) {
        host::span_attribute(key, value);
    }

    fn span_event(&mut self, name: &str, attributes: &[(String, String)]) {
        host::span_event(name, attributes);
    }

    fn state_get(&mut self, key: &str) -> Option<Vec<u8>> {
        state::get(key)
    }

    fn state_set(&mut self, key: &str, value: Vec<u8>) {
        state::set(key, &value);
    }

    fn state_delete(&mut self, key: &str) {
        state::delete(key);
    }

    fn state_keys(&mut self, prefix: &str, after: Option<&str>, limit: u32) -> Vec<String> {
        state::list_keys(prefix, after, limit)
    }

    fn state_increment(&mut self, key: &str, delta: i64) -> i64 {
        state::increment(key, delta)
    }

    fn saga_current(&mut self) -> Option<crate::SagaInstance> {
        saga::current().map(|i| crate::SagaInstance {
            id: i.id,
            version: i.version,
            started_at_ms: i.started_at_ms,
        })
    }

    fn saga_complete(&mut self) {
        saga::complete();
    }

    fn saga_request_timeout(&mut self, after_ms: u64, message_type: &str, payload: Vec<u8>) {
        saga::request_timeout(after_ms, message_type, &payload);
    }

    fn http(
        &mut self,
        request: &crate::http::Request,
    ) -> Result<crate::http::Response, crate::http::HttpError> {
        wasi_http::send(request)
    }
}

/// `Context::http` over `wasi:http/outgoing-handler`.
mod wasi_http {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{
        ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
    };
    use wasip2::io::streams::StreamError;

    use crate::http::{HttpError, HttpErrorKind, Request, Response};

    /// How much is written or read per stream call.
    const CHUNK: usize = 4096;

    fn invalid(what: impl Into<String>) -> HttpError {
        HttpError::new(HttpErrorKind::InvalidRequest, what)
    }

    fn failed(request: &Request, code: &ErrorCode) -> HttpError {
        use ErrorCode as E;
        let kind = match code {
            E::HttpRequestDenied => HttpErrorKind::Denied,
            E::DnsTimeout
            | E::ConnectionTimeout
            | E::ConnectionReadTimeout
            | E::ConnectionWriteTimeout
            | E::HttpResponseTimeout => HttpErrorKind::Timeout,
            E::DnsError(_)
            | E::DestinationNotFound
            | E::DestinationUnavailable
            | E::DestinationIpProhibited
            | E::DestinationIpUnroutable
            | E::ConnectionRefused
            | E::ConnectionTerminated
            | E::ConnectionLimitReached => HttpErrorKind::Connect,
            E::TlsProtocolError | E::TlsCertificateError | E::TlsAlertReceived(_) => {
                HttpErrorKind::Tls
            }
            E::HttpResponseBodySize(_) => HttpErrorKind::TooLarge,
            E::HttpRequestMethodInvalid
            | E::HttpRequestUriInvalid
            | E::HttpRequestUriTooLong
            | E::HttpRequestHeaderSize(_)
            | E::HttpRequestHeaderSectionSize(_) => HttpErrorKind::InvalidRequest,
            _ => HttpErrorKind::Protocol,
        };
        let why = match kind {
            HttpErrorKind::Denied => {
                "refused by the host: the origin is not in the plugin's `http` grant".to_owned()
            }
            _ => format!("{code:?}"),
        };
        HttpError::new(kind, format!("{} {}: {why}", request.method, request.url))
    }

    pub(super) fn send(request: &Request) -> Result<Response, HttpError> {
        let (scheme, authority, path) = request.parts()?;
        let headers = Fields::new();
        for (name, value) in &request.headers {
            headers
                .append(name, value.as_bytes())
                .map_err(|e| invalid(format!("header `{name}`: {e:?}")))?;
        }
        // The length is known: said up front rather than sent chunked,
        // which some servers refuse.
        let told = request
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-length"));
        if !told
            && (!request.body.is_empty()
                || !matches!(request.method.to_ascii_uppercase().as_str(), "GET" | "HEAD"))
        {
            headers
                .append("content-length", request.body.len().to_string().as_bytes())
                .map_err(|e| invalid(format!("header `content-length`: {e:?}")))?;
        }
        let outgoing = OutgoingRequest::new(headers);
        let method = match request.method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            _ => Method::Other(request.method.clone()),
        };
        let scheme = if scheme == "https" {
            Scheme::Https
        } else {
            Scheme::Http
        };
        let set = outgoing
            .set_method(&method)
            .and_then(|()| outgoing.set_scheme(Some(&scheme)))
            .and_then(|()| outgoing.set_authority(Some(authority)))
            .and_then(|()| outgoing.set_path_with_query(Some(&path)));
        if set.is_err() {
            return Err(invalid(format!(
                "`{} {}` is not a valid request",
                request.method, request.url
            )));
        }
        let body = outgoing
            .body()
            .map_err(|()| invalid("the request body was taken twice"))?;
        let future = outgoing_handler::handle(outgoing, None).map_err(|e| failed(request, &e))?;
        // A request the host refuses or cannot send stops taking its body:
        // then the response's error says why, not the failed write.
        let mut sent = Ok(());
        {
            let stream = body
                .write()
                .map_err(|()| invalid("the request body stream was taken twice"))?;
            for chunk in request.body.chunks(CHUNK) {
                if let Err(e) = stream.blocking_write_and_flush(chunk) {
                    sent = Err(HttpError::new(
                        HttpErrorKind::Protocol,
                        format!(
                            "{} {}: sending the body failed: {e:?}",
                            request.method, request.url
                        ),
                    ));
                    break;
                }
            }
        }
        let finished = OutgoingBody::finish(body, None);
        future.subscribe().block();
        // A response wins over a body the server stopped reading (an
        // early 401 or 413): the handler decides what it means.
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(failed(request, &code)),
            Some(Err(())) | None => {
                sent?;
                finished.map_err(|e| failed(request, &e))?;
                return Err(HttpError::new(
                    HttpErrorKind::Protocol,
                    format!("{} {}: no response", request.method, request.url),
                ));
            }
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response
            .consume()
            .map_err(|()| invalid("the response body was taken twice"))?;
        let body = read_body(request, &incoming)?;
        drop(IncomingBody::finish(incoming));
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn read_body(request: &Request, incoming: &IncomingBody) -> Result<Vec<u8>, HttpError> {
        let stream = incoming
            .stream()
            .map_err(|()| invalid("the response body stream was taken twice"))?;
        let mut body = Vec::new();
        loop {
            match stream.blocking_read(CHUNK as u64 * 16) {
                Ok(bytes) => body.extend_from_slice(&bytes),
                Err(StreamError::Closed) => return Ok(body),
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(match wasip2::http::types::http_error_code(&e) {
                        Some(code) => failed(request, &code),
                        None => HttpError::new(
                            HttpErrorKind::Protocol,
                            format!(
                                "{} {}: reading the response failed: {}",
                                request.method,
                                request.url,
                                // The first line: a host may add a backtrace.
                                e.to_debug_string().lines().next().unwrap_or_default()
                            ),
                        ),
                    });
                }
            }
        }
    }
}

fn outgoing_to_wit(o: Outgoing) -> wit::Outgoing {
    wit::Outgoing {
        message_type: o.message_type,
        payload: o.payload,
        content_type: o.content_type,
        headers: o.headers,
        partition_key: o.partition_key,
    }
}

/// The metadata of the message delivered by `call`, from the host, if that
/// call is the one under way; none otherwise.
pub(crate) fn metadata(call: u64) -> Metadata {
    if call != CALL.load(Ordering::Relaxed) {
        return Metadata::default();
    }
    let m = host::metadata();
    Metadata {
        headers: m.headers,
        correlation_id: m.correlation_id,
        causation_id: m.causation_id,
        reply_to: m.reply_to,
    }
}

/// `describe` export, converting the plugin's declaration to the WIT record.
pub fn describe<P: Plugin>() -> wit::PluginInfo {
    let info = P::describe();
    wit::PluginInfo {
        name: info.name,
        version: info.version,
        handles: info
            .handles
            .into_iter()
            .map(|s| wit::Subscription {
                message_type: s.message_type,
                kind: kind_to_wit(s.kind),
            })
            .collect(),
        publishes: info.publishes,
        sends: info.sends,
    }
}

/// Numbers the `handle` calls, so a message read after its call has ended
/// does not pick up the metadata of the message being handled then.
static CALL: AtomicU64 = AtomicU64::new(0);

/// `handle` export: converts the message, runs the handler, converts the error.
pub fn handle<P: Plugin>(m: wit::Message) -> Result<(), wit::HandlerError> {
    let call = CALL.fetch_add(1, Ordering::Relaxed) + 1;
    let message = Message {
        id: m.id,
        message_type: m.message_type,
        kind: match m.kind {
            wit::Kind::Command => Kind::Command,
            wit::Kind::Event => Kind::Event,
        },
        payload: m.payload,
        content_type: m.content_type,
        created_at_ms: m.created_at_ms,
        attempt: m.attempt,
        // Fetched from the host on first use.
        metadata: OnceLock::new(),
        call,
    };
    let mut imports = HostImports;
    let mut ctx = Context::new(&mut imports);
    let outcome = P::handle(&mut ctx, message);
    // Whatever the handler kept of the message is past its call now.
    CALL.fetch_add(1, Ordering::Relaxed);
    outcome.map_err(|e: HandlerError| {
        let details = wit::ErrorDetails {
            message: e.message,
            code: e.code,
            details: e.details,
        };
        match e.kind {
            ErrorKind::Transient => wit::HandlerError::Transient(details),
            ErrorKind::Permanent => wit::HandlerError::Permanent(details),
        }
    })
}
