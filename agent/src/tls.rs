//! TLS client settings shared by every source: always verified, against a given CA file or the
//! system's roots, with the one crypto provider the workspace builds (ring).

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// A client config that trusts the PEM certificates in `ca_file`, or the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bad = |e: String| {
                Error::new(
                    ErrorKind::Credential,
                    format!("tls_ca_file {}: {e}", path.display()),
                )
            };
            let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                roots
                    .add(cert.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("it holds no PEM certificate".into()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::failed(format!("TLS set-up: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}
