//! Device identity: one-time enrollment tokens (`enroll_<id>_<secret>`, stored hashed, good
//! once until they expire), the certificate each enrolled device holds (issued by the
//! [`DeviceCa`]), renewal, and revocation. The gRPC layer hands every request the
//! [`PeerCert`] its TLS connection presented; [`DeviceAuthority::authorize`] says whether that
//! certificate may still act for its device.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ca::{CaError, DEVICE_URI_PREFIX, DeviceCa, Issued};
use super::tokens::{constant_time_eq, is_hex, random_hex, sha256_hex};
use crate::store::records::{RecordTable, RecordWrite};
use crate::store::{Store, StoreError};

const ENROLLMENTS: RecordTable = RecordTable::new("device_enrollments");
const IDENTITIES: RecordTable = RecordTable::new("device_identities");
const PREFIX: &str = "enroll_";

/// How long device certificates last and how late they may still be renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertPolicy {
    pub lifetime: Duration,
    /// A certificate expired less than this long ago may still renew itself (a device that
    /// was offline past its expiry), and nothing else.
    pub grace: Duration,
}

impl Default for CertPolicy {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(30 * 24 * 3600),
            grace: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// An enrollment as listed: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentInfo {
    pub id: String,
    /// The device id the enrolled device gets.
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
    pub created_ms: i64,
    pub created_by: String,
    pub expires_ms: i64,
    /// When a device used it; absent: unused.
    pub used_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEnrollment {
    #[serde(flatten)]
    info: EnrollmentInfo,
    secret_sha256: String,
}

/// What the hub knows of an enrolled device's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceIdentity {
    pub device_id: String,
    /// Serial (hex) of the certificate issued last.
    pub serial: String,
    /// The one before it, accepted until the device connects with the new one (a renewal
    /// whose answer was lost must not lock the device out).
    pub previous_serial: Option<String>,
    pub not_after_s: i64,
    pub enrolled_ms: i64,
    pub renewed_ms: Option<i64>,
    /// When it was revoked; absent: not revoked.
    pub revoked_ms: Option<i64>,
}

/// The certificate a TLS client presented, as the hub reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub device_id: String,
    pub serial: String,
    pub not_after_s: i64,
}

impl PeerCert {
    /// Reads a device certificate (DER): the id from its `urn:shoal:device:` URI SAN (else its
    /// CN), its serial and expiry. `None` for anything else.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let from_san = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => u.strip_prefix(DEVICE_URI_PREFIX).map(str::to_string),
                    _ => None,
                })
            });
        let device_id = from_san.or_else(|| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string)
        })?;
        Some(Self {
            device_id,
            serial: shoal_ml::dataset::hex(cert.raw_serial()),
            not_after_s: cert.validity().not_after.timestamp(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceAuthError {
    #[error("the enrollment token is not a Shoal enrollment token (enroll_<id>_<secret>)")]
    Malformed,
    #[error("the enrollment token is not known to this hub (a typo, or made for another hub)")]
    UnknownToken,
    #[error(
        "the enrollment token for {device:?} was already used; ask an admin for a new one (shoal devices enroll)"
    )]
    TokenUsed { device: String },
    #[error(
        "the enrollment token for {device:?} has expired; ask an admin for a new one (shoal devices enroll)"
    )]
    TokenExpired { device: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(
        "no client certificate: this hub accepts telemetry only from enrolled devices (shoal-agent enroll)"
    )]
    NoCertificate,
    #[error("the certificate is for device {cert:?}, not {claimed:?}")]
    WrongDevice { cert: String, claimed: String },
    #[error("device {device:?} was revoked; enroll it again to let it back in")]
    Revoked { device: String },
    #[error("device {device:?} is not enrolled on this hub")]
    NotEnrolled { device: String },
    #[error("this certificate of {device:?} was replaced by a newer one (or by a new enrollment)")]
    Superseded { device: String },
    #[error(
        "the certificate of {device:?} expired {ago_s} s ago: it may only renew itself (the agent does so on its own)"
    )]
    CertExpired { device: String, ago_s: i64 },
    #[error("invalid device id: {0}")]
    BadDeviceId(String),
    #[error("invalid ttl: {0}")]
    BadTtl(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DeviceAuthError {
    /// The reason label under which a refusal is counted in `/metrics`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed | Self::UnknownToken => "enrollment_unknown",
            Self::TokenUsed { .. } => "enrollment_used",
            Self::TokenExpired { .. } => "enrollment_expired",
            Self::Ca(CaError::BadCsr(_)) => "bad_csr",
            Self::NoCertificate => "no_certificate",
            Self::WrongDevice { .. } => "wrong_device",
            Self::Revoked { .. } => "revoked",
            Self::NotEnrolled { .. } | Self::Superseded { .. } => "unknown_certificate",
            Self::CertExpired { .. } => "expired_certificate",
            Self::BadDeviceId(_) | Self::BadTtl(_) => "bad_request",
            Self::Ca(_) | Self::Store(_) => "error",
        }
    }

    /// True for the hub's own failures (not the caller's fault).
    pub fn is_internal(&self) -> bool {
        matches!(self, Self::Store(_))
            || matches!(self, Self::Ca(e) if !matches!(e, CaError::BadCsr(_)))
    }
}

/// Enrollment, certificates and revocation for the hub's devices.
pub struct DeviceAuthority {
    store: Store,
    ca: DeviceCa,
    policy: CertPolicy,
    /// Revoked device ids, read on every batch.
    revoked: RwLock<HashSet<String>>,
    /// One enrollment or renewal at a time: a token is used once even when raced.
    issuing: Mutex<()>,
}

impl std::fmt::Debug for DeviceAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthority")
            .field("ca", &self.ca)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl DeviceAuthority {
    pub fn open(store: Store, ca: DeviceCa, policy: CertPolicy) -> Result<Arc<Self>, StoreError> {
        store.create_record_tables(&[ENROLLMENTS, IDENTITIES])?;
        let revoked = store
            .records::<DeviceIdentity>(IDENTITIES)?
            .into_iter()
            .filter(|i| i.revoked_ms.is_some())
            .map(|i| i.device_id)
            .collect();
        Ok(Arc::new(Self {
            store,
            ca,
            policy,
            revoked: RwLock::new(revoked),
            issuing: Mutex::new(()),
        }))
    }

    pub fn ca(&self) -> &DeviceCa {
        &self.ca
    }

    pub fn policy(&self) -> CertPolicy {
        self.policy
    }

    /// Makes a one-time token that enrolls a device as `device_id` with `labels`, good for
    /// `ttl`; returns what is listed and the token, which is never shown again.
    pub fn create_enrollment(
        &self,
        device_id: &str,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        created_by: &str,
    ) -> Result<(EnrollmentInfo, String), DeviceAuthError> {
        shoal_proto::device_id::validate(device_id)
            .map_err(|e| DeviceAuthError::BadDeviceId(e.to_string()))?;
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(365 * 24 * 3600) {
            return Err(DeviceAuthError::BadTtl(
                "must be between 1s and 365d".into(),
            ));
        }
        let now = crate::now_ms();
        let id = random_hex(6);
        let secret = random_hex(32);
        let info = EnrollmentInfo {
            id: id.clone(),
            device_id: device_id.into(),
            labels,
            created_ms: now,
            created_by: created_by.into(),
            expires_ms: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            used_ms: None,
        };
        let stored = StoredEnrollment {
            info: info.clone(),
            secret_sha256: sha256_hex(&secret),
        };
        self.store
            .write_records(&[RecordWrite::put(ENROLLMENTS, &id, &stored)])?;
        Ok((info, format!("{PREFIX}{id}_{secret}")))
    }

    /// Every enrollment token, used and expired ones included, oldest first.
    pub fn enrollments(&self) -> Result<Vec<EnrollmentInfo>, DeviceAuthError> {
        let mut all: Vec<EnrollmentInfo> = self
            .store
            .records::<StoredEnrollment>(ENROLLMENTS)?
            .into_iter()
            .map(|s| s.info)
            .collect();
        all.sort_by_key(|e| (e.created_ms, e.id.clone()));
        Ok(all)
    }

    /// Every enrolled device's certificate record.
    pub fn identities(&self) -> Result<Vec<DeviceIdentity>, DeviceAuthError> {
        let mut all = self.store.records::<DeviceIdentity>(IDENTITIES)?;
        all.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(all)
    }

    pub fn identity(&self, device_id: &str) -> Result<Option<DeviceIdentity>, DeviceAuthError> {
        Ok(self.store.record(IDENTITIES, device_id)?)
    }

    /// Trades an enrollment token and a CSR for a certificate; the token is then used up. A
    /// device enrolled before under the same id (revoked or not) gets a fresh identity: its
    /// older certificates stop working.
    pub fn enroll(
        &self,
        token: &str,
        csr_pem: &str,
    ) -> Result<(Issued, EnrollmentInfo), DeviceAuthError> {
        self.enroll_at(token, csr_pem, crate::now_ms())
    }

    fn enroll_at(
        &self,
        token: &str,
        csr_pem: &str,
        now: i64,
    ) -> Result<(Issued, EnrollmentInfo), DeviceAuthError> {
        let (id, secret) = token
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .filter(|(id, secret)| is_hex(id, 12) && is_hex(secret, 64))
            .ok_or(DeviceAuthError::Malformed)?;
        let _one = self.issuing.lock().expect("issuing lock");
        let mut stored: StoredEnrollment = self
            .store
            .record(ENROLLMENTS, id)?
            .ok_or(DeviceAuthError::UnknownToken)?;
        if !constant_time_eq(
            sha256_hex(secret).as_bytes(),
            stored.secret_sha256.as_bytes(),
        ) {
            return Err(DeviceAuthError::UnknownToken);
        }
        let device = stored.info.device_id.clone();
        if stored.info.used_ms.is_some() {
            return Err(DeviceAuthError::TokenUsed { device });
        }
        if stored.info.expires_ms <= now {
            return Err(DeviceAuthError::TokenExpired { device });
        }
        let issued = self
            .ca
            .issue_device(csr_pem, &device, self.policy.lifetime)?;
        stored.info.used_ms = Some(now);
        let identity = DeviceIdentity {
            device_id: device.clone(),
            serial: issued.serial.clone(),
            previous_serial: None,
            not_after_s: issued.not_after_s,
            enrolled_ms: now,
            renewed_ms: None,
            revoked_ms: None,
        };
        self.store.write_records(&[
            RecordWrite::put(ENROLLMENTS, id, &stored),
            RecordWrite::put(IDENTITIES, &device, &identity),
        ])?;
        self.revoked.write().expect("revoked lock").remove(&device);
        Ok((issued, stored.info))
    }

    /// A new certificate for the device whose (current, possibly expired within the grace
    /// window) certificate is `peer`.
    pub fn renew(&self, peer: &PeerCert, csr_pem: &str) -> Result<Issued, DeviceAuthError> {
        let _one = self.issuing.lock().expect("issuing lock");
        let mut identity = self.current(peer)?;
        let issued = self
            .ca
            .issue_device(csr_pem, &peer.device_id, self.policy.lifetime)?;
        identity.previous_serial = Some(peer.serial.clone());
        identity.serial = issued.serial.clone();
        identity.not_after_s = issued.not_after_s;
        identity.renewed_ms = Some(crate::now_ms());
        self.store
            .write_records(&[RecordWrite::put(IDENTITIES, &peer.device_id, &identity)])?;
        Ok(issued)
    }

    /// Whether `peer` may send telemetry as `claimed` now: enrolled, not revoked, not
    /// superseded, not expired, and naming that device.
    pub fn authorize(&self, peer: Option<&PeerCert>, claimed: &str) -> Result<(), DeviceAuthError> {
        let peer = peer.ok_or(DeviceAuthError::NoCertificate)?;
        if peer.device_id != claimed {
            return Err(DeviceAuthError::WrongDevice {
                cert: peer.device_id.clone(),
                claimed: claimed.into(),
            });
        }
        self.current(peer)?;
        let now_s = crate::now_ms() / 1000;
        if peer.not_after_s < now_s {
            return Err(DeviceAuthError::CertExpired {
                device: peer.device_id.clone(),
                ago_s: now_s - peer.not_after_s,
            });
        }
        Ok(())
    }

    /// Whether `device_id` has been revoked (read on every batch; no store access).
    pub fn is_revoked(&self, device_id: &str) -> bool {
        self.revoked
            .read()
            .expect("revoked lock")
            .contains(device_id)
    }

    /// Revokes a device: its certificates stop working at its next request. What it stored
    /// stays; so does its spool on the device.
    pub fn revoke(&self, device_id: &str) -> Result<DeviceIdentity, DeviceAuthError> {
        let _one = self.issuing.lock().expect("issuing lock");
        let mut identity =
            self.identity(device_id)?
                .ok_or_else(|| DeviceAuthError::NotEnrolled {
                    device: device_id.into(),
                })?;
        if identity.revoked_ms.is_none() {
            identity.revoked_ms = Some(crate::now_ms());
            self.store
                .write_records(&[RecordWrite::put(IDENTITIES, device_id, &identity)])?;
        }
        self.revoked
            .write()
            .expect("revoked lock")
            .insert(device_id.into());
        Ok(identity)
    }

    /// The device's record, if `peer` is one of its live certificates.
    fn current(&self, peer: &PeerCert) -> Result<DeviceIdentity, DeviceAuthError> {
        let device = peer.device_id.clone();
        let identity = self
            .identity(&device)?
            .ok_or_else(|| DeviceAuthError::NotEnrolled {
                device: device.clone(),
            })?;
        if identity.revoked_ms.is_some() {
            return Err(DeviceAuthError::Revoked { device });
        }
        if identity.serial != peer.serial && identity.previous_serial.as_ref() != Some(&peer.serial)
        {
            return Err(DeviceAuthError::Superseded { device });
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(policy: CertPolicy) -> (tempfile::TempDir, Arc<DeviceAuthority>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ca = DeviceCa::open_or_create(dir.path()).unwrap();
        (dir, DeviceAuthority::open(store, ca, policy).unwrap())
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        // What the device asks for does not matter: the hub names it.
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "someone-else");
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn peer_of(issued: &Issued) -> PeerCert {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        PeerCert::from_der(&der).unwrap()
    }

    fn enroll(a: &DeviceAuthority, device: &str) -> Issued {
        let (_, token) = a
            .create_enrollment(device, BTreeMap::new(), Duration::from_secs(60), "test")
            .unwrap();
        a.enroll(&token, &csr()).unwrap().0
    }

    #[test]
    fn a_token_enrolls_once_and_the_certificate_names_the_device() {
        let (_dir, a) = authority(CertPolicy::default());
        let labels = BTreeMap::from([("site".to_string(), "lab".to_string())]);
        let (_, token) = a
            .create_enrollment("pi-7", labels.clone(), Duration::from_secs(60), "test")
            .unwrap();
        let (issued, info) = a.enroll(&token, &csr()).unwrap();
        assert_eq!(info.labels, labels);
        let peer = peer_of(&issued);
        assert_eq!(peer.device_id, "pi-7", "the CSR's own name is ignored");
        assert_eq!(peer.serial, issued.serial);
        assert_eq!(peer.not_after_s, issued.not_after_s);
        a.authorize(Some(&peer), "pi-7").unwrap();
        assert!(matches!(
            a.enroll(&token, &csr()),
            Err(DeviceAuthError::TokenUsed { .. })
        ));
        let mut wrong = token.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        for bad in [wrong.as_str(), "enroll_", "shoal_abc_def", ""] {
            let e = a.enroll(bad, &csr()).unwrap_err();
            assert_eq!(e.reason(), "enrollment_unknown", "{bad}: {e}");
        }
    }

    #[test]
    fn an_expired_token_and_a_bad_csr_are_refused_and_leave_the_token_unused() {
        let (_dir, a) = authority(CertPolicy::default());
        let (info, token) = a
            .create_enrollment("pi-8", BTreeMap::new(), Duration::from_secs(60), "test")
            .unwrap();
        let later = info.expires_ms + 1;
        assert!(matches!(
            a.enroll_at(&token, &csr(), later),
            Err(DeviceAuthError::TokenExpired { .. })
        ));
        let e = a
            .enroll(
                &token,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            )
            .unwrap_err();
        assert_eq!(e.reason(), "bad_csr");
        assert!(a.enrollments().unwrap()[0].used_ms.is_none());
        a.enroll(&token, &csr()).unwrap();
        assert!(matches!(
            a.create_enrollment("bad id!", BTreeMap::new(), Duration::from_secs(60), "t"),
            Err(DeviceAuthError::BadDeviceId(_))
        ));
    }

    #[test]
    fn a_certificate_acts_only_for_its_device_until_revoked_or_replaced() {
        let (_dir, a) = authority(CertPolicy::default());
        let first = peer_of(&enroll(&a, "pi-a"));
        let other = peer_of(&enroll(&a, "pi-b"));
        let e = a.authorize(Some(&first), "pi-b").unwrap_err();
        assert_eq!(e.reason(), "wrong_device");
        assert_eq!(
            a.authorize(None, "pi-a").unwrap_err().reason(),
            "no_certificate"
        );
        // Renewed: the new and the previous certificate work, the one before stops.
        let second = peer_of(&a.renew(&first, &csr()).unwrap());
        a.authorize(Some(&second), "pi-a").unwrap();
        a.authorize(Some(&first), "pi-a").unwrap();
        let third = peer_of(&a.renew(&second, &csr()).unwrap());
        a.authorize(Some(&third), "pi-a").unwrap();
        assert_eq!(
            a.authorize(Some(&first), "pi-a").unwrap_err().reason(),
            "unknown_certificate"
        );
        // A new enrollment replaces every earlier certificate.
        let again = peer_of(&enroll(&a, "pi-a"));
        a.authorize(Some(&again), "pi-a").unwrap();
        assert!(a.authorize(Some(&third), "pi-a").is_err());
        // Revoked: refused everything, renewal included; others unaffected.
        a.revoke("pi-a").unwrap();
        assert!(a.is_revoked("pi-a"));
        assert_eq!(
            a.authorize(Some(&again), "pi-a").unwrap_err().reason(),
            "revoked"
        );
        assert_eq!(a.renew(&again, &csr()).unwrap_err().reason(), "revoked");
        a.authorize(Some(&other), "pi-b").unwrap();
        assert!(matches!(
            a.revoke("nope"),
            Err(DeviceAuthError::NotEnrolled { .. })
        ));
        // Enrolling it again lets it back in.
        let back = peer_of(&enroll(&a, "pi-a"));
        assert!(!a.is_revoked("pi-a"));
        a.authorize(Some(&back), "pi-a").unwrap();
    }

    #[test]
    fn an_expired_certificate_may_only_renew() {
        let (_dir, a) = authority(CertPolicy::default());
        let mut peer = peer_of(&enroll(&a, "pi-c"));
        peer.not_after_s = crate::now_ms() / 1000 - 10;
        assert_eq!(
            a.authorize(Some(&peer), "pi-c").unwrap_err().reason(),
            "expired_certificate"
        );
        let renewed = peer_of(&a.renew(&peer, &csr()).unwrap());
        a.authorize(Some(&renewed), "pi-c").unwrap();
    }

    #[test]
    fn revocations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let ca = DeviceCa::open_or_create(dir.path()).unwrap();
            let a = DeviceAuthority::open(store, ca, CertPolicy::default()).unwrap();
            enroll(&a, "pi-d");
            a.revoke("pi-d").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let ca = DeviceCa::open_or_create(dir.path()).unwrap();
        let a = DeviceAuthority::open(store, ca, CertPolicy::default()).unwrap();
        assert!(a.is_revoked("pi-d"));
    }
}
