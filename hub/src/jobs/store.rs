//! Job definitions and run history in the hub's store (tables `jobs` and `runs`), so both
//! survive a hub restart.

use serde::{Deserialize, Serialize};

use super::manifest::CronJob;
use crate::store::{Store, StoreError};

const JOBS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("jobs");
const RUNS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("runs");

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

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("record serialises")
}

fn parse<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl JobStore {
    pub fn new(store: Store) -> Result<Self, StoreError> {
        let txn = store.db().begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(RUNS)?;
        txn.commit()?;
        Ok(Self { store })
    }

    pub fn put_job(&self, name: &str, job: &JobRecord) -> Result<(), StoreError> {
        let txn = self.store.db().begin_write()?;
        txn.open_table(JOBS)?.insert(name, json(job).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn delete_job(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.store.db().begin_write()?;
        txn.open_table(JOBS)?.remove(name)?;
        txn.commit()?;
        Ok(())
    }

    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.store.db().begin_read()?;
        let table = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            out.push(parse(row?.1.value())?);
        }
        Ok(out)
    }

    pub fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let txn = self.store.db().begin_write()?;
        txn.open_table(RUNS)?
            .insert(run.id.as_str(), json(run).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Writes runs and jobs and deletes runs in one transaction (one fsync for a whole tick of
    /// the scheduler, however many jobs were due).
    pub fn write_batch(
        &self,
        runs: &[RunRecord],
        jobs: &[(&str, &JobRecord)],
        delete: &[String],
    ) -> Result<(), StoreError> {
        let txn = self.store.db().begin_write()?;
        {
            let mut run_table = txn.open_table(RUNS)?;
            for id in delete {
                run_table.remove(id.as_str())?;
            }
            for run in runs {
                run_table.insert(run.id.as_str(), json(run).as_slice())?;
            }
            let mut job_table = txn.open_table(JOBS)?;
            for (name, job) in jobs {
                job_table.insert(*name, json(*job).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn delete_runs(&self, ids: &[String]) -> Result<(), StoreError> {
        let txn = self.store.db().begin_write()?;
        {
            let mut table = txn.open_table(RUNS)?;
            for id in ids {
                table.remove(id.as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Runs, oldest schedule first; all jobs when `job` is `None`.
    pub fn runs(&self, job: Option<&str>) -> Result<Vec<RunRecord>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.store.db().begin_read()?;
        let table = txn.open_table(RUNS)?;
        let mut out: Vec<RunRecord> = Vec::new();
        for row in table.iter()? {
            let r: RunRecord = parse(row?.1.value())?;
            if job.is_none_or(|j| j == r.job) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.scheduled_ms, &a.id).cmp(&(b.scheduled_ms, &b.id)));
        Ok(out)
    }

    pub fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        use redb::ReadableDatabase;
        let txn = self.store.db().begin_read()?;
        let table = txn.open_table(RUNS)?;
        table.get(id)?.map(|v| parse(v.value())).transpose()
    }
}
