//! TLS to PostgreSQL as libpq's `sslmode` describes it, on rustls.
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` (default) | when the server offers TLS (plain otherwise) | no |
//! | `require` | yes | no |
//! | `verify-ca` | yes | chains to a trusted root |
//! | `verify-full` | yes | chains to a trusted root and names the host |
//!
//! The trusted roots are the PEM file `sslrootcert` names, or the Mozilla
//! roots built into the host when it names none (or says `system`).
//! tokio-postgres knows only `disable`, `prefer` and `require`, so the
//! verifying modes and `sslrootcert` are read here and taken out of the
//! connection string before it is parsed.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;

use crate::config::{KeyValuePart, key_values};

/// How to reach the server.
#[derive(Debug)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: TlsMode,
    /// `sslrootcert`: a PEM file of trusted roots.
    pub roots: Option<PathBuf>,
}

/// `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Reads a connection string (a `postgres://` URL or libpq key-value
/// pairs). Errors never quote the string: it may hold a password.
pub fn target(url: &str) -> Result<Target> {
    let (rest, taken) = take_params(url, &["sslmode", "sslrootcert"]);
    let get = |k: &str| taken.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v);
    let tls = match get("sslmode").map(String::as_str) {
        None | Some("prefer" | "allow") => TlsMode::Prefer,
        Some("disable") => TlsMode::Disable,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(other) => bail!(
            "sslmode `{}` is not one of disable, prefer, require, verify-ca, verify-full",
            crate::limits::quote(other)
        ),
    };
    let roots = get("sslrootcert")
        .filter(|r| r.as_str() != "system")
        .map(PathBuf::from);
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| anyhow!("the connection string is not valid: {e}"))?;
    config.ssl_mode(match tls {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    if config.get_application_name().is_none() {
        config.application_name("switchyard");
    }
    Ok(Target { config, tls, roots })
}

/// The connection string without the parameters named in `keys`, and
/// those parameters' values (unquoted, in order).
fn take_params(url: &str, keys: &[&str]) -> (String, Vec<(String, String)>) {
    let mut taken = Vec::new();
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), taken);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some((k, v)) if keys.contains(&k) => taken.push((k.to_owned(), percent_decode(v))),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, taken);
    }
    let mut rest = String::with_capacity(url.len());
    for part in key_values(url) {
        match part {
            KeyValuePart::Pair { key, value, .. } if keys.contains(&key) => {
                taken.push((key.to_owned(), unquote(value)));
            }
            KeyValuePart::Pair { text, .. } | KeyValuePart::Other(text) => rest.push_str(text),
        }
    }
    (rest, taken)
}

fn unquote(value: &str) -> String {
    let Some(inner) = value
        .strip_prefix('\'')
        .map(|v| v.strip_suffix('\'').unwrap_or(v))
    else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(h), Some(l)) if hex(*h).is_some() && hex(*l).is_some() => {
                let (h, l) = (hex(*h).unwrap_or(0), hex(*l).unwrap_or(0));
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The rustls client configuration for a mode other than `disable`.
pub fn client_config(tls: TlsMode, roots: Option<&PathBuf>) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("no TLS version in common with rustls")?;
    let config = match tls {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let mut store = rustls::RootCertStore::empty();
            match roots {
                Some(path) => crate::pem::add_roots(&mut store, path, "sslrootcert")?,
                None => {
                    store.add_parsable_certificates(
                        webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned(),
                    );
                }
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                provider,
            )
            .build()
            .context("cannot build the certificate verifier")?;
            let verifier: Arc<dyn ServerCertVerifier> = if tls == TlsMode::VerifyCa {
                Arc::new(AnyName(verifier))
            } else {
                verifier
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// `prefer` and `require`: the connection is encrypted, whoever the server
/// is (libpq's meaning). The handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the certificate must chain to a trusted root; the name in
/// it is not compared with the host.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_read_and_taken_out_in_both_forms() {
        let t = target("postgres://ada@db/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5").unwrap();
        assert_eq!(t.tls, TlsMode::VerifyFull);
        assert_eq!(t.roots, Some(PathBuf::from("/etc/ca.pem")));
        let t =
            target("host=db user=ada sslmode=verify-ca sslrootcert='/etc/my ca.pem' dbname=shop")
                .unwrap();
        assert_eq!(t.tls, TlsMode::VerifyCa);
        assert_eq!(t.roots, Some(PathBuf::from("/etc/my ca.pem")));
        assert_eq!(t.config.get_dbname(), Some("shop"));
        assert_eq!(target("postgres://db/shop").unwrap().tls, TlsMode::Prefer);
        assert_eq!(
            target("postgres://db/shop?sslmode=disable").unwrap().tls,
            TlsMode::Disable
        );
        assert_eq!(
            target("postgres://db/shop?sslmode=require&sslrootcert=system")
                .unwrap()
                .roots,
            None
        );
        let err = target("postgres://db/shop?sslmode=sometimes").unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        let err = target("host=db password=s3cret bogus=1").unwrap_err();
        assert!(!format!("{err:#}").contains("s3cret"), "{err:#}");
    }
}
