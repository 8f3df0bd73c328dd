//! Whether the store takes writes now, and why not.
//!
//! Two things stop writes. The filesystem's free space falling under the low-disk watermark
//! (`--min-free-space`): the writer then refuses batches with a "store full" reason *before* the
//! disk is full, so a commit never half-fails for want of space. And a commit that failed (an
//! I/O error such as ENOSPC or EIO): redb refuses every later transaction of that handle
//! ("Previous I/O error occurred"), so the writer closes and reopens the database by itself, at
//! most once a second, until a write works again. Nothing is acknowledged in either state;
//! agents keep their samples in their spools and are told when to come back.

use std::path::Path;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

/// How soon a refused agent should try again: the writer re-checks the disk at least this often.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The store's write state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WriteState {
    /// Commits go through.
    Writable,
    /// Free space is under the watermark: new batches are refused until space is freed.
    Full {
        free_bytes: u64,
        min_free_bytes: u64,
    },
    /// The last commit failed; the store is reopened once writing works again.
    Failed { error: String },
}

impl WriteState {
    pub fn is_writable(&self) -> bool {
        matches!(self, WriteState::Writable)
    }

    /// Why writes are refused, for an operator; `None` when writable.
    pub fn reason(&self) -> Option<String> {
        match self {
            WriteState::Writable => None,
            WriteState::Full {
                free_bytes,
                min_free_bytes,
            } => Some(format!(
                "store full: {} free on the data directory's filesystem, under the {} minimum (--min-free-space); free space or run retention",
                human_bytes(*free_bytes),
                human_bytes(*min_free_bytes)
            )),
            WriteState::Failed { error } => Some(format!(
                "the store's last commit failed ({error}); it is reopened as soon as writing works again"
            )),
        }
    }
}

/// The write state and the watermark, shared by the writer (which sets the state) and the
/// readiness probe, the status endpoint and `/metrics` (which read it).
#[derive(Debug)]
pub struct Health {
    state: RwLock<(WriteState, Instant)>,
    min_free: std::sync::atomic::AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: RwLock::new((WriteState::Writable, Instant::now())),
            min_free: Default::default(),
        }
    }
}

impl Health {
    pub fn state(&self) -> WriteState {
        self.state.read().expect("health lock").0.clone()
    }

    /// Sets the state; logs when it changes.
    pub fn set(&self, new: WriteState) {
        let mut s = self.state.write().expect("health lock");
        if s.0 == new {
            return;
        }
        let same_kind = std::mem::discriminant(&s.0) == std::mem::discriminant(&new);
        if !same_kind {
            match new.reason() {
                None => tracing::warn!(after = ?s.1.elapsed(), "the store takes writes again"),
                Some(why) => tracing::error!("the store refuses writes: {why}"),
            }
            s.1 = Instant::now();
        }
        s.0 = new;
    }

    pub fn min_free_bytes(&self) -> u64 {
        self.min_free.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_min_free_bytes(&self, bytes: u64) {
        self.min_free
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Bytes available to the hub on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// `1.5 GB`, `12.0 MB`, `512 B` (decimal units, as `--min-free-space` and disks are sold).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if b < 1000 {
        return format!("{b} B");
    }
    let mut v = b as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(12_345_678), "12.3 MB");
    }

    #[test]
    fn state_reasons_say_what_to_do() {
        let full = WriteState::Full {
            free_bytes: 1_000_000,
            min_free_bytes: 64_000_000,
        };
        assert!(full.reason().unwrap().contains("store full"));
        assert!(full.reason().unwrap().contains("--min-free-space"));
        assert_eq!(WriteState::Writable.reason(), None);
        let h = Health::default();
        h.set(full.clone());
        assert_eq!(h.state(), full);
        assert!(!h.state().is_writable());
    }
}
