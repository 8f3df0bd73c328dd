//! The gRPC `shoal.v1.Enrollment` service over the [`DeviceAuthority`]: a device trades its
//! enrollment token and CSR for a certificate, and later renews it over its authenticated
//! connection. Every answer, given or refused, is audited; refusals are counted in `/metrics`.

use std::sync::Arc;

use shoal_proto::v1::enrollment_server::Enrollment;
use shoal_proto::v1::{EnrollRequest, IssuedCertificate, RenewRequest};
use tonic::{Request, Response, Status};

use crate::auth::audit::{AuditEntry, AuditLog, Outcome};
use crate::auth::ca::Issued;
use crate::auth::{DeviceAuthError, DeviceAuthority, PeerCert};
use crate::metrics::Metrics;

/// Largest CSR the hub reads (a P-256 or Ed25519 CSR is well under 1 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

pub struct EnrollmentService {
    devices: Arc<DeviceAuthority>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    /// Where enrollments are recorded as device events for the sinks.
    events: Option<crate::ingest::Ingestor>,
}

impl EnrollmentService {
    pub fn new(devices: Arc<DeviceAuthority>, audit: Arc<AuditLog>, metrics: Arc<Metrics>) -> Self {
        Self {
            devices,
            audit,
            metrics,
            events: None,
        }
    }

    /// Records every enrollment as a device event through `ingestor`.
    pub fn with_events(mut self, ingestor: crate::ingest::Ingestor) -> Self {
        self.events = Some(ingestor);
        self
    }

    /// Audits the outcome; a refusal is counted and turned into its gRPC status.
    fn answer(
        &self,
        action: &str,
        actor: String,
        from: Option<String>,
        result: Result<
            (Issued, String, std::collections::BTreeMap<String, String>),
            DeviceAuthError,
        >,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let (outcome, status, reason) = match &result {
            Ok(_) => (Outcome::Allowed, 200, None),
            Err(e) if e.is_internal() => (Outcome::Denied, 503, Some(e.to_string())),
            Err(e) => (Outcome::Denied, 403, Some(e.to_string())),
        };
        let object = match &result {
            Ok((_, device, _)) => device.clone(),
            Err(_) => String::new(),
        };
        let entry = AuditEntry {
            time_ms: crate::now_ms(),
            actor,
            role: None,
            action: format!("gRPC shoal.v1.Enrollment/{action}"),
            object,
            from,
            outcome,
            status,
            reason,
        };
        if let Err(e) = self.audit.append(&entry, outcome == Outcome::Allowed) {
            tracing::error!(error = %e, "cannot append to the audit log");
            return Err(Status::unavailable("the hub cannot write its audit log"));
        }
        match result {
            Ok((issued, device_id, labels)) => Ok(Response::new(IssuedCertificate {
                device_id,
                cert_pem: issued.cert_pem,
                ca_pem: self.devices.ca().cert_pem().to_string(),
                not_before_unix: issued.issued_s,
                not_after_unix: issued.not_after_s,
                labels: labels.into_iter().collect(),
            })),
            Err(e) => {
                self.metrics.deny_device(e.reason());
                tracing::info!(action, reason = e.reason(), error = %e, "device request refused");
                Err(status_of(&e))
            }
        }
    }
}

/// The gRPC status a refusal is answered with.
pub fn status_of(e: &DeviceAuthError) -> Status {
    use DeviceAuthError as E;
    match e {
        E::Malformed | E::UnknownToken | E::NoCertificate | E::CertExpired { .. } => {
            Status::unauthenticated(e.to_string())
        }
        E::Ca(crate::auth::ca::CaError::BadCsr(_)) | E::BadDeviceId(_) | E::BadTtl(_) => {
            Status::invalid_argument(e.to_string())
        }
        _ if e.is_internal() => Status::unavailable(e.to_string()),
        _ => Status::permission_denied(e.to_string()),
    }
}

fn from_addr<T>(r: &Request<T>) -> Option<String> {
    r.remote_addr().map(|a| a.to_string())
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let from = from_addr(&request);
        let req = request.into_inner();
        let actor = format!(
            "enrollment:{}",
            req.token
                .strip_prefix("enroll_")
                .and_then(|r| r.split('_').next())
                .unwrap_or("?")
        );
        let result = if req.csr_pem.len() > MAX_CSR_BYTES {
            Err(DeviceAuthError::Ca(crate::auth::ca::CaError::BadCsr(
                format!("larger than {MAX_CSR_BYTES} bytes"),
            )))
        } else {
            let devices = self.devices.clone();
            tokio::task::spawn_blocking(move || devices.enroll(&req.token, &req.csr_pem))
                .await
                .expect("enrollment task")
                .map(|(issued, info)| (issued, info.device_id, info.labels))
        };
        if let (Ok((issued, device_id, _)), Some(events)) = (&result, &self.events) {
            let event = shoal_proto::v1::DeviceEvent {
                device_id: device_id.clone(),
                timestamp_ms: crate::now_ms(),
                event: Some(shoal_proto::v1::device_event::Event::Enrolled(
                    shoal_proto::v1::Enrolled {
                        not_after_unix: issued.not_after_s,
                    },
                )),
            };
            if let Err(e) = events.events(vec![event]).await {
                tracing::warn!(device_id = %device_id, error = %e, "could not record the enrollment for the sinks");
            }
        }
        self.answer("Enroll", actor, from, result)
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let from = from_addr(&request);
        let peer = request.extensions().get::<PeerCert>().cloned();
        let req = request.into_inner();
        let actor = peer.as_ref().map_or_else(
            || "unauthenticated".into(),
            |p| format!("device:{}", p.device_id),
        );
        let result = match peer {
            None => Err(DeviceAuthError::NoCertificate),
            Some(_) if req.csr_pem.len() > MAX_CSR_BYTES => Err(DeviceAuthError::Ca(
                crate::auth::ca::CaError::BadCsr(format!("larger than {MAX_CSR_BYTES} bytes")),
            )),
            Some(peer) => {
                let devices = self.devices.clone();
                tokio::task::spawn_blocking(move || {
                    devices
                        .renew(&peer, &req.csr_pem)
                        .map(|issued| (issued, peer.device_id, Default::default()))
                })
                .await
                .expect("renewal task")
            }
        };
        self.answer("Renew", actor, from, result)
    }
}
