//! What every REST handler may read: the store, the fleet view, the scheduler, counters.

use std::sync::Arc;

use super::access::MetricsAuth;
use crate::auth::{AuditLog, Tokens};
use crate::jobs::scheduler::Scheduler;
use crate::jobs::store::JobStore;
use crate::metrics::Metrics;
use crate::registry::StatusThresholds;
use crate::store::Store;
use crate::store::writer::Fleet;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<Metrics>,
    pub thresholds: StatusThresholds,
    pub jobs: Scheduler,
    pub job_store: JobStore,
    pub runs_dir: std::path::PathBuf,
    /// This hub's REST URL, given to runs.
    pub hub_url: String,
    pub auth: AuthState,
    /// Enrollment and revocation; `None` with `--device-auth none`.
    pub devices: Option<Arc<crate::auth::DeviceAuthority>>,
    /// The gRPC URL agents are told to use.
    pub grpc_url: String,
    /// Deployed models, the embedded V2 server's repository, per-device scores.
    pub models: Arc<crate::models::Models>,
    pub alerts: Arc<crate::models::alerts::Alerts>,
    /// The provenance ledger.
    pub ledger: Arc<crate::provenance::Ledger>,
    /// Anchors the ledger on chain, with `--chain-rpc`.
    pub anchorer: Option<Arc<crate::provenance::anchor::Anchorer>>,
    /// Where stored telemetry is forwarded (`--sink`).
    pub sinks: Arc<crate::platform::Sinks>,
    /// Consumer mode's counters, with `--ingest-from`.
    pub consumer: Option<Arc<crate::platform::consume::ConsumerStats>>,
}

/// What the access gate and the token routes use.
#[derive(Clone)]
pub struct AuthState {
    pub tokens: Tokens,
    pub audit: Arc<AuditLog>,
    /// False with `--insecure-no-auth`: every caller is an anonymous admin.
    pub enforce: bool,
    pub metrics: MetricsAuth,
    /// JWTs from an OpenID Connect issuer, when configured.
    pub oidc: Option<Arc<crate::auth::oidc::Oidc>>,
}
