//! Job definitions and run history in the hub's store (tables `jobs` and `runs`), so both
//! survive a hub restart.

use serde::{Deserialize, Serialize};

use super::manifest::CronJob;
use crate::store::{RecordTable, RecordWrite, Store, StoreError};

const JOBS: RecordTable = RecordTable::new("jobs");
const RUNS: RecordTable = RecordTable::new("runs");

/// A job as stored: its manifest and the scheduler's bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    pub manifest: CronJob,
    /// When it was first applied (epoch ms): the start of the schedule before any run.
    pub created_ms: i64,
    /// The schedule time of the last start, skip or miss (epoch ms).
    pub last_schedule_ms: Option<i64>,
}

/// What became of a run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    DeadlineExceeded,
    /// Stopped by `concurrencyPolicy: Replace` or a delete.
    Cancelled,
    /// Not started: Forbid with a run active, or its starting deadline passed.
    Skipped,
    /// The hub stopped while it ran; its outcome is unknown.
    Interrupted,
    StartFailed,
}

impl RunStatus {
    pub fn finished(self) -> bool {
        !matches!(self, RunStatus::Running)
    }

    pub fn succeeded(self) -> bool {
        matches!(self, RunStatus::Succeeded)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub job: String,
    /// The schedule time it is for (epoch ms); manual runs carry the trigger time.
    pub scheduled_ms: i64,
    pub manual: bool,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Exit code of each attempt (`null`: killed).
    #[serde(default)]
    pub attempts: Vec<Option<i32>>,
}

#[derive(Clone)]
pub struct JobStore {
    store: Store,
}

impl JobStore {
    pub fn new(store: Store) -> Result<Self, StoreError> {
        store.create_record_tables(&[JOBS, RUNS])?;
        Ok(Self { store })
    }

    pub fn put_job(&self, name: &str, job: &JobRecord) -> Result<(), StoreError> {
        self.store
            .write_records(&[RecordWrite::put(JOBS, name, job)])
    }

    pub fn delete_job(&self, name: &str) -> Result<(), StoreError> {
        self.store.write_records(&[RecordWrite::Remove(JOBS, name)])
    }

    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.store.records(JOBS)
    }

    pub fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.store
            .write_records(&[RecordWrite::put(RUNS, &run.id, run)])
    }

    /// Writes runs and jobs and deletes runs in one transaction (one fsync for a whole tick of
    /// the scheduler, however many jobs were due).
    pub fn write_batch(
        &self,
        runs: &[RunRecord],
        jobs: &[(&str, &JobRecord)],
        delete: &[String],
    ) -> Result<(), StoreError> {
        let writes: Vec<RecordWrite<'_>> = delete
            .iter()
            .map(|id| RecordWrite::Remove(RUNS, id))
            .chain(runs.iter().map(|r| RecordWrite::put(RUNS, &r.id, r)))
            .chain(
                jobs.iter()
                    .map(|(name, j)| RecordWrite::put(JOBS, name, *j)),
            )
            .collect();
        self.store.write_records(&writes)
    }

    pub fn delete_runs(&self, ids: &[String]) -> Result<(), StoreError> {
        let writes: Vec<_> = ids.iter().map(|id| RecordWrite::Remove(RUNS, id)).collect();
        self.store.write_records(&writes)
    }

    /// Runs, oldest schedule first; all jobs when `job` is `None`.
    pub fn runs(&self, job: Option<&str>) -> Result<Vec<RunRecord>, StoreError> {
        let mut out: Vec<RunRecord> = self.store.records(RUNS)?;
        out.retain(|r| job.is_none_or(|j| j == r.job));
        out.sort_by(|a, b| (a.scheduled_ms, &a.id).cmp(&(b.scheduled_ms, &b.id)));
        Ok(out)
    }

    pub fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        self.store.record(RUNS, id)
    }
}
