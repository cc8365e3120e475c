//! PEM files the host reads for TLS (roots to trust, the ingress's
//! certificate chain), with errors that name the file and the pipeline key
//! that named it.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// Every certificate in the PEM file `path`; none is an error. `key` is
/// what named the file (`sslrootcert`, `http_roots`, ...).
pub fn certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .map_err(|e| {
            anyhow!(
                "cannot read the certificates in {} ({key}): {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate ({key})", path.display());
    }
    Ok(certs)
}

/// Adds the certificates of `path` to `store` as roots; at least one must
/// be usable as a root.
pub fn add_roots(store: &mut rustls::RootCertStore, path: &Path, key: &str) -> Result<()> {
    let (added, refused) = store.add_parsable_certificates(certificates(path, key)?);
    if added == 0 {
        bail!(
            "none of the {refused} certificates in {} can be a root ({key})",
            path.display()
        );
    }
    Ok(())
}
