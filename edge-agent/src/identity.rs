//! The device's identity on a hub that requires one: a key made here (P-256; it never leaves
//! the device), the certificate the hub's device CA issued for it, and that CA. Kept as four
//! files in the identity directory (beside the agent's config by default):
//! `device.key` (mode 0600), `device.crt`, `ca.crt` and `identity.toml` (device id, validity,
//! labels). A new set is written beside the old one and the old replaced only once all of it
//! is on disk; `identity.toml` last, so a crash leaves the old identity or the new, whole.
//!
//! [`enroll`] trades an enrollment token for a first certificate, trusting the hub through
//! the CA fingerprint printed with the token (or a CA file); [`renew`] gets a new one over
//! the authenticated connection. [`tls_config`] is what the gRPC transport connects with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore};
use serde::{Deserialize, Serialize};
use shoal_proto::v1::enrollment_client::EnrollmentClient;
use shoal_proto::v1::{EnrollRequest, IssuedCertificate, RenewRequest};
use tonic::transport::{Channel, Endpoint, Uri};

const KEY: &str = "device.key";
const CERT: &str = "device.crt";
const CA: &str = "ca.crt";
const META: &str = "identity.toml";
const NEW: &str = "new";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "this device is not enrolled ({0} holds no identity): run shoal-agent enroll --hub URL --token TOKEN first (an admin makes the token with shoal devices enroll)"
    )]
    NotEnrolled(PathBuf),
    #[error(
        "{0} already holds an identity (device {1:?}); pass --force to replace it with a new enrollment"
    )]
    AlreadyEnrolled(PathBuf, String),
    #[error("cannot make a key: {0}")]
    Key(String),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("cannot connect to hub {hub}: {message}")]
    Connect { hub: String, message: String },
    #[error("the hub refused: {}", .0.message())]
    Refused(tonic::Status),
    #[error("the hub answered with an unusable certificate: {0}")]
    BadAnswer(String),
}

/// Who the device is, as `identity.toml` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub device_id: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl IdentityInfo {
    /// When to renew: at 2/3 of the certificate's lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = (self.not_after_unix - self.not_before_unix).max(0);
        let at = self.not_before_unix + life * 2 / 3;
        UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0))
    }
}

/// The identity as loaded: what it says, and its PEM files.
#[derive(Debug, Clone)]
pub struct Identity {
    pub info: IdentityInfo,
    pub dir: PathBuf,
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
}

/// How the agent trusts the hub it enrolls with.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The SHA-256 (hex) of the hub's device CA certificate, printed with the token: the hub
    /// sends that CA along with its own certificate.
    Fingerprint(String),
    /// CA certificates (PEM) that signed the hub's serving certificate.
    CaFile(PathBuf),
}

impl Identity {
    /// The identity in `dir`; `Ok(None)` if there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, IdentityError> {
        finish_replacement(dir)?;
        let meta = dir.join(META);
        let text = match std::fs::read_to_string(&meta) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Io { path: meta, source }),
        };
        let info: IdentityInfo = toml::from_str(&text).map_err(|e| IdentityError::Invalid {
            path: meta.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(Self {
            info,
            dir: dir.to_path_buf(),
            key_pem: read(&dir.join(KEY))?,
            cert_pem: read(&dir.join(CERT))?,
            ca_pem: read(&dir.join(CA))?,
        }))
    }

    /// The identity in `dir`, or an error telling how to enroll.
    pub fn require(dir: &Path) -> Result<Self, IdentityError> {
        Self::load(dir)?.ok_or_else(|| IdentityError::NotEnrolled(dir.to_path_buf()))
    }

    /// TLS settings that present this identity and trust the hub through its CA (or
    /// `server_ca`, the CA of an operator's own serving certificate).
    pub fn tls_config(&self, server_ca: Option<&Path>) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut roots = RootCertStore::empty();
        let ca_certs: Vec<CertificateDer<'static>> = match server_ca {
            Some(path) => CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| IdentityError::Invalid {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?,
            None => pem_certs(&self.ca_pem, &self.dir.join(CA))?,
        };
        for c in ca_certs {
            roots
                .add(c)
                .map_err(|e| IdentityError::Tls(e.to_string()))?;
        }
        let chain = pem_certs(&self.cert_pem, &self.dir.join(CERT))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            IdentityError::Invalid {
                path: self.dir.join(KEY),
                reason: e.to_string(),
            }
        })?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

impl Identity {
    /// The same settings for an `mqtts://` broker (no ALPN).
    pub fn mqtt_tls_config(
        &self,
        server_ca: Option<&Path>,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut config = (*self.tls_config(server_ca)?).clone();
        config.alpn_protocols.clear();
        Ok(Arc::new(config))
    }
}

/// Enrolls with the hub at `hub` (`https://HOST:PORT`): makes a key, sends a CSR with the
/// token, and stores what comes back in `dir`.
pub async fn enroll(
    hub: &str,
    token: &str,
    trust: &Trust,
    dir: &Path,
) -> Result<Identity, IdentityError> {
    let (key_pem, issued) = request_certificate(hub, token, trust).await?;
    store(dir, &key_pem, issued, None)
}

/// Makes a key and trades `token` and a CSR over it for a certificate; returns the key (PEM)
/// and the answer, stored nowhere (see [`enroll`]).
pub async fn request_certificate(
    hub: &str,
    token: &str,
    trust: &Trust,
) -> Result<(String, IssuedCertificate), IdentityError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut config = match trust {
        Trust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa {
                sha256: pin.to_ascii_lowercase(),
            }))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| IdentityError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            {
                roots
                    .add(c)
                    .map_err(|e| IdentityError::Tls(e.to_string()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let (key_pem, csr_pem) = new_key_and_csr()?;
    let mut client = EnrollmentClient::new(channel(hub, Arc::new(config)).await?);
    let issued = client
        .enroll(EnrollRequest {
            token: token.to_string(),
            csr_pem,
        })
        .await
        .map_err(IdentityError::Refused)?
        .into_inner();
    Ok((key_pem, issued))
}

impl Identity {
    /// An identity held in memory only (a load generator's simulated devices).
    pub fn in_memory(key_pem: String, issued: IssuedCertificate) -> Self {
        Self {
            info: IdentityInfo {
                device_id: issued.device_id,
                not_before_unix: issued.not_before_unix,
                not_after_unix: issued.not_after_unix,
                labels: issued.labels.into_iter().collect(),
            },
            dir: PathBuf::new(),
            key_pem,
            cert_pem: issued.cert_pem,
            ca_pem: issued.ca_pem,
        }
    }
}

/// Renews `current` over a connection that presents it; stores the new certificate (and its
/// new key) in place of the old.
pub async fn renew(
    hub: &str,
    current: &Identity,
    server_ca: Option<&Path>,
) -> Result<Identity, IdentityError> {
    let tls = current.tls_config(server_ca)?;
    let (key_pem, csr_pem) = new_key_and_csr()?;
    let mut client = EnrollmentClient::new(channel(hub, tls).await?);
    let issued = client
        .renew(RenewRequest { csr_pem })
        .await
        .map_err(IdentityError::Refused)?
        .into_inner();
    if issued.device_id != current.info.device_id {
        return Err(IdentityError::BadAnswer(format!(
            "issued for {:?}, this device is {:?}",
            issued.device_id, current.info.device_id
        )));
    }
    store(&current.dir, &key_pem, issued, Some(&current.info.labels))
}

/// TLS settings the gRPC transport connects with; replaced whole when the certificate is
/// renewed (the next connection presents the new one).
pub type SharedTls = Arc<std::sync::RwLock<Arc<ClientConfig>>>;

/// Renews `current` at 2/3 of its lifetime, again and again, until `shutdown`; a failed
/// renewal is retried with backoff (30 s doubling to 1 h), an expired certificate renews
/// within the grace window the hub allows.
pub async fn keep_renewed(
    hub: String,
    mut current: Identity,
    server_ca: Option<PathBuf>,
    tls: SharedTls,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    const FIRST_RETRY: Duration = Duration::from_secs(30);
    let mut retry = FIRST_RETRY;
    loop {
        let wait = current
            .info
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        let renewed = renew(&hub, &current, server_ca.as_deref())
            .await
            .and_then(|next| next.tls_config(server_ca.as_deref()).map(|c| (next, c)));
        match renewed {
            Ok((next, config)) => {
                *tls.write().expect("tls lock") = config;
                tracing::info!(
                    device_id = %next.info.device_id,
                    not_after_unix = next.info.not_after_unix,
                    "certificate renewed"
                );
                current = next;
                retry = FIRST_RETRY;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry, "certificate renewal failed");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = shutdown.changed() => return,
                }
                retry = (retry * 2).min(Duration::from_secs(3600));
            }
        }
    }
}

/// A gRPC channel to `hub` over TLS with `tls`.
pub async fn channel(hub: &str, tls: Arc<ClientConfig>) -> Result<Channel, IdentityError> {
    let connect_error = |message: String| IdentityError::Connect {
        hub: hub.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(hub.to_string())
        .map_err(|e| connect_error(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    endpoint
        .connect_with_connector(connector(tls))
        .await
        .map_err(|e| connect_error(crate::transport::causes(&e)))
}

/// Connects TCP, then TLS with `tls`, to the host and port of each URI.
pub fn connector(
    tls: Arc<ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ Clone
+ 'static {
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let invalid =
                |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
            let host = uri
                .host()
                .ok_or_else(|| invalid("the hub URL names no host"))?;
            let port = uri.port_u16().unwrap_or(443);
            let bare = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let tcp = tokio::net::TcpStream::connect((bare.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(bare).map_err(|_| invalid("not a valid host name"))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn new_key_and_csr() -> Result<(String, String), IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "shoal-agent");
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), csr))
}

/// Writes the new identity beside the old (`*.new`), then replaces the old.
fn store(
    dir: &Path,
    key_pem: &str,
    issued: IssuedCertificate,
    keep_labels: Option<&BTreeMap<String, String>>,
) -> Result<Identity, IdentityError> {
    let info = IdentityInfo {
        device_id: issued.device_id,
        not_before_unix: issued.not_before_unix,
        not_after_unix: issued.not_after_unix,
        labels: match keep_labels {
            Some(l) => l.clone(),
            None => issued.labels.into_iter().collect(),
        },
    };
    shoal_proto::device_id::validate(&info.device_id)
        .map_err(|e| IdentityError::BadAnswer(e.to_string()))?;
    if PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).is_err()
        || CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).is_err()
        || CertificateDer::from_pem_slice(issued.ca_pem.as_bytes()).is_err()
    {
        return Err(IdentityError::BadAnswer("not PEM".into()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let meta = toml::to_string(&info).expect("identity serialises");
    for (name, text) in [
        (KEY, key_pem),
        (CERT, issued.cert_pem.as_str()),
        (CA, issued.ca_pem.as_str()),
        (META, meta.as_str()),
    ] {
        let path = dir.join(format!("{name}.{NEW}"));
        write_private(&path, text).map_err(io(&path))?;
    }
    finish_replacement(dir)?;
    Identity::require(dir)
}

/// Completes a replacement that a crash interrupted: once `identity.toml.new` is on disk the
/// whole new set is, and each `*.new` takes the place of its file (meta last).
fn finish_replacement(dir: &Path) -> Result<(), IdentityError> {
    if !dir.join(format!("{META}.{NEW}")).exists() {
        return Ok(());
    }
    for name in [KEY, CERT, CA, META] {
        let from = dir.join(format!("{name}.{NEW}"));
        if from.exists() {
            std::fs::rename(&from, dir.join(name)).map_err(|source| IdentityError::Io {
                path: from.clone(),
                source,
            })?;
        }
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `text` to `path`, owner-only (0600), on disk before returning.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Trusts the hub when its chain holds the CA with the pinned fingerprint and its certificate
/// verifies against that CA for the name connected to.
#[derive(Debug)]
struct PinnedCa {
    sha256: String,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.sha256)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the hub did not present the CA with fingerprint {} (a wrong --ca-sha256, or not the hub that made the token)",
                    self.sha256
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn sha256_hex(der: &[u8]) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
