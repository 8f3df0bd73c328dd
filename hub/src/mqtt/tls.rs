//! TLS for the embedded broker: a certificate chain and its private key from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

/// Server settings from `cert_file` (chain, leaf first) and `key_file` (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, String> {
    let (certs, key) = crate::auth::tls::read_pair(cert_file, key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{} does not fit {}: {e}",
                key_file.display(),
                cert_file.display()
            )
        })?;
    Ok(Arc::new(config))
}
