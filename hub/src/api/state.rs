//! What every REST handler may read: the store, the fleet view, the scheduler, counters.

use std::sync::Arc;

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
}
