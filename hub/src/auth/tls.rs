//! TLS for the gRPC port: the hub's serving certificate, and client certificates checked
//! against the device CA. A client certificate is optional at the TLS layer (a device that
//! enrolls has none yet); what each request may do with or without one is decided above,
//! from its [`super::devices::PeerCert`].
//!
//! A certificate that expired less than the grace window ago still completes the handshake
//! (checked at its own last valid second) so that a device that was offline past its expiry
//! can renew; [`super::devices::DeviceAuthority::authorize`] refuses it everything else.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

use super::ca::{CaError, DeviceCa};

/// Where the hub's serving certificate comes from.
#[derive(Debug, Clone)]
pub enum ServingCert {
    /// Files given by the operator (`--grpc-tls-cert`, `--grpc-tls-key`).
    Files {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    },
    /// Issued by the device CA at each start for these names (DNS names or IP addresses).
    Issued { names: Vec<String> },
}

/// The rustls settings of the gRPC port: ALPN h2, device client certificates optional, and an
/// expired one accepted within `grace` (for renewal only).
pub fn grpc_server_config(
    ca: &DeviceCa,
    serving: &ServingCert,
    grace: Duration,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let inner = device_verifier(ca)?;
    let verifier = Arc::new(GraceVerifier { inner, grace });
    let mut config = server_config(ca, serving, verifier)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The rustls settings of the embedded MQTT broker: device client certificates optional (a
/// client may log in with a password instead), checked against the device CA.
pub fn mqtt_server_config(
    ca: &DeviceCa,
    serving: &ServingCert,
) -> Result<Arc<rustls::ServerConfig>, String> {
    Ok(Arc::new(server_config(ca, serving, device_verifier(ca)?)?))
}

/// Client certificates from the device CA, optional at the TLS layer.
fn device_verifier(ca: &DeviceCa) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .map_err(|e| format!("the device CA certificate: {e}"))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(
    ca: &DeviceCa,
    serving: &ServingCert,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, String> {
    let (chain, key) = match serving {
        ServingCert::Files { cert, key } => read_pair(cert, key)?,
        ServingCert::Issued { names } => {
            let (issued, key) = ca
                .issue_server(names, Duration::from_secs(365 * 24 * 3600))
                .map_err(|e: CaError| e.to_string())?;
            let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
                .map_err(|e| e.to_string())?;
            // The CA goes along: an agent that pins the CA's fingerprint finds it here.
            let chain = vec![leaf, CertificateDer::from(ca.cert_der().to_vec())];
            let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .map_err(|e| e.to_string())?;
            (chain, key)
        }
    };
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the serving certificate and key do not fit: {e}"))
}

/// A certificate chain (leaf first) and its private key, from PEM files.
pub fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok((chain, key))
}

/// The CA's verifier, but a certificate expired less than `grace` ago is checked as of its
/// last valid second.
#[derive(Debug)]
struct GraceVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    grace: Duration,
}

impl ClientCertVerifier for GraceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let expired = super::devices::PeerCert::from_der(end_entity)
                    .map(|p| p.not_after_s)
                    .and_then(|s| u64::try_from(s).ok())
                    .filter(|&not_after| now.as_secs() <= not_after + self.grace.as_secs());
                let Some(not_after) = expired else {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
                };
                let then = UnixTime::since_unix_epoch(Duration::from_secs(not_after));
                self.inner
                    .verify_client_cert(end_entity, intermediates, then)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
