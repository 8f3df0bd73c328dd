//! The audit log: who did what to which object, when, from where, allowed or denied. One JSON
//! object per line in `DATA_DIR/audit.jsonl`, only ever appended to; an allowed change is on
//! disk (fsync) before its answer leaves the hub. A line torn by a crash is closed when the log
//! is next opened and skipped on reading.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Role;

/// The log's file name in the data dir.
pub const FILE: &str = "audit.jsonl";

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub time_ms: i64,
    /// Who: `token:NAME`, `anonymous` (authentication off), or `unauthenticated`.
    pub actor: String,
    /// The actor's role, when known.
    pub role: Option<Role>,
    /// Method and route template, e.g. `POST /api/v1/jobs/{name}/run`.
    pub action: String,
    /// The path requested, e.g. `/api/v1/jobs/hrdump/run`.
    pub object: String,
    /// The client's address, when known.
    pub from: Option<String>,
    /// `allowed` or `denied`.
    pub outcome: Outcome,
    /// The HTTP status answered.
    pub status: u16,
    /// Why it was denied.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
}

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join(FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        // A line torn by a crash is closed, so that the next entry starts on a line of its own.
        if ends_mid_line(&mut file)? {
            file.write_all(b"\n")?;
            file.sync_data()?;
        }
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends `entry` as one line; with `durable`, on disk before returning.
    pub fn append(&self, entry: &AuditEntry, durable: bool) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).expect("an audit entry serialises");
        line.push(b'\n');
        let mut file = self.file.lock().expect("audit log lock");
        file.write_all(&line)?;
        if durable {
            file.sync_data()?;
        }
        Ok(())
    }

    /// The last `limit` entries that `keep`, oldest first.
    pub fn read(
        &self,
        limit: usize,
        keep: impl Fn(&AuditEntry) -> bool,
    ) -> std::io::Result<Vec<AuditEntry>> {
        let reader = BufReader::new(File::open(&self.path)?);
        let mut out = std::collections::VecDeque::with_capacity(limit.min(10_000));
        for line in reader.lines() {
            let Ok(entry) = serde_json::from_str::<AuditEntry>(&line?) else {
                continue;
            };
            if keep(&entry) {
                if out.len() == limit {
                    out.pop_front();
                }
                if limit > 0 {
                    out.push_back(entry);
                }
            }
        }
        Ok(out.into())
    }
}

fn ends_mid_line(file: &mut File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: i64, outcome: Outcome) -> AuditEntry {
        AuditEntry {
            time_ms: n,
            actor: "token:ci".into(),
            role: Some(Role::Scientist),
            action: "POST /api/v1/jobs".into(),
            object: "/api/v1/jobs".into(),
            from: Some("127.0.0.1:5000".into()),
            outcome,
            status: 200,
            reason: None,
        }
    }

    #[test]
    fn appends_survive_reopening_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append(&entry(1, Outcome::Allowed), true).unwrap();
        log.append(&entry(2, Outcome::Denied), false).unwrap();
        drop(log);
        // A crash in the middle of a line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"time_ms\":3,\"act").unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append(&entry(4, Outcome::Allowed), true).unwrap();
        let all = log.read(100, |_| true).unwrap();
        let times: Vec<i64> = all.iter().map(|e| e.time_ms).collect();
        assert_eq!(times, vec![1, 2, 4]);
        let denied = log.read(100, |e| e.outcome == Outcome::Denied).unwrap();
        assert_eq!(denied, vec![entry(2, Outcome::Denied)]);
        assert_eq!(log.read(1, |_| true).unwrap()[0].time_ms, 4);
    }
}
