//! HTTPS for the ingress: the certificate chain and key of `[ingress]
//! tls_cert` and `tls_key`, read once when the host starts.

use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;

use crate::config::IngressTls;

/// The rustls server configuration, HTTP/1.1 only. A file that cannot be
/// read, holds no certificate or key, or a key that does not belong to the
/// certificate, is an error naming the file.
pub fn server_config(files: &IngressTls) -> Result<rustls::ServerConfig> {
    let chain = crate::pem::certificates(&files.cert, "[ingress] tls_cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        anyhow!(
            "cannot read a private key in {} ([ingress] tls_key): {e}",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS version in common with rustls")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "the key in {} does not go with the certificate in {} ([ingress] tls_key, tls_cert)",
                files.key.display(),
                files.cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
