//! The hub's certificate authority for devices: a P-256 key and a self-signed CA certificate
//! under `DATA_DIR/ca/` (made on first start, key mode 0600), or an operator's own CA given as
//! files. It signs device certificates from CSRs (the device id goes into the subject's CN and
//! a `urn:shoal:device:ID` URI SAN; the CSR contributes only its verified public key) and the
//! hub's own gRPC serving certificate.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use shoal_ml::dataset::hex;

use super::tokens::write_secret;

/// The URI SAN prefix that names a device in its certificate.
pub const DEVICE_URI_PREFIX: &str = "urn:shoal:device:";
const CA_DIR: &str = "ca";
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
/// A CA made by the hub lasts this long.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub serial: String,
    /// When it was issued (its notBefore is a minute earlier, for devices whose clock lags).
    pub issued_s: i64,
    pub not_after_s: i64,
}

/// The CA: its certificate (PEM and DER) and the key it signs with.
pub struct DeviceCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa")
            .field("sha256", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl DeviceCa {
    /// The CA under `DATA_DIR/ca/`, made there on first use.
    pub fn open_or_create(data_dir: &Path) -> Result<Self, CaError> {
        let dir = data_dir.join(CA_DIR);
        let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if cert.exists() || key.exists() {
            return Self::from_files(&cert, &key);
        }
        std::fs::create_dir_all(&dir).map_err(|source| CaError::Write {
            path: dir.clone(),
            source,
        })?;
        let key_pair = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("Shoal device CA {}", short_random()));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + CA_LIFETIME).into();
        let cert_pem = params
            .self_signed(&key_pair)
            .map_err(|e| CaError::Sign(e.to_string()))?
            .pem();
        write_secret(&key, &key_pair.serialize_pem()).map_err(|source| CaError::Write {
            path: key.clone(),
            source,
        })?;
        std::fs::write(&cert, &cert_pem).map_err(|source| CaError::Write {
            path: cert.clone(),
            source,
        })?;
        Self::from_files(&cert, &key)
    }

    /// An operator's own CA: its certificate and its private key (PEM; PKCS#8, P-256 or
    /// Ed25519).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let invalid = |path: &Path, reason: String| CaError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key, e.to_string()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert, format!("no PEM certificate: {e}")))?
            .to_vec();
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
            .map_err(|e| invalid(cert, e.to_string()))?;
        Ok(Self {
            cert_pem,
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate (DER), in hex: what an agent pins before it trusts a hub.
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(&self.cert_der))
    }

    /// Signs a device certificate for `device_id` over the public key of `csr_pem` (whose
    /// signature must verify), valid for `lifetime` from now.
    pub fn issue_device(
        &self,
        csr_pem: &str,
        device_id: &str,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(device_id);
        params.subject_alt_names = vec![SanType::URI(
            format!("{DEVICE_URI_PREFIX}{device_id}")
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, &csr.public_key, lifetime)
    }

    /// A serving certificate for the hub (and its key, made here) for these DNS names and IP
    /// addresses.
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Issued, KeyPair), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|e| CaError::Sign(e.to_string()))?;
        params.distinguished_name = name("shoal hub");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.sign(params, &key, lifetime)?;
        Ok((issued, key))
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let mut serial = [0u8; 16];
        SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| CaError::Sign("no randomness".into()))?;
        // Positive and without a leading zero byte, so the DER integer is these 16 bytes.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // A minute back: a device whose clock runs a little behind accepts it at once.
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(60);
        let not_after = now + lifetime;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: hex(&serial),
            issued_s: unix_s(now),
            not_after_s: unix_s(not_after),
        })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn short_random() -> String {
    let mut b = [0u8; 4];
    let _ = SystemRandom::new().fill(&mut b);
    hex(&b)
}

fn unix_s(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_with_a_private_key_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = DeviceCa::open_or_create(dir.path()).unwrap();
        let key = dir.path().join(CA_DIR).join(CA_KEY);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = DeviceCa::open_or_create(dir.path()).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 64);
        // An operator's own CA, from files.
        let own = DeviceCa::from_files(&dir.path().join(CA_DIR).join(CA_CERT), &key).unwrap();
        assert_eq!(own.fingerprint(), first.fingerprint());
        let missing = DeviceCa::from_files(&dir.path().join("nope.crt"), &key).unwrap_err();
        assert!(missing.to_string().contains("nope.crt"), "{missing}");
    }
}
