//! The embedded telemetry store: one redb file, `DATA_DIR/shoal.redb`.
//!
//! Why redb: a pure-Rust, single-file, copy-on-write B-tree with ACID transactions and
//! concurrent readers. Ingest is dominated by fsyncs, and the writer thread (see
//! [`writer`]) amortises them by committing every batch that arrived in the meantime in
//! one transaction (group commit), so one fsync'd commit carries thousands of samples. Reads
//! (REST, CLI) run on MVCC snapshots and never block ingest. Each device's samples are a table of
//! their own keyed by seq, which makes deduplication one key lookup, keeps them contiguous for
//! range scans, and appends every new sample at the end of its tree, where redb packs leaves
//! full. No C toolchain is needed to build it.
//!
//! Tables:
//! - `device_keys`: device id → small integer key
//! - `devices`: device key → registry record (JSON)
//! - `samples.{device key}`: seq → the sample, compact ([`codec`]): its shape's id and its
//!   numbers
//! - `sample_shapes`: shape id → a shape samples share (sections, names, counts)
//! - `outbox`, `sink_cursors`: what the sinks forward, in commit order ([`outbox`])
//! - record tables ([`RecordTable`]): string key → JSON, for other modules' records (jobs,
//!   runs), reached only through typed methods.
//!
//! This module is the only one that opens tables or transactions; [`writer`] (the ingest
//! writer thread) and [`series`] (time ranges, downsampling) belong to it.

pub mod codec;
pub mod health;
pub mod outbox;
pub mod readings;
pub mod records;
pub mod retention;
pub mod rollup;
pub mod series;
pub mod writer;

pub use records::{RecordTable, RecordWrite};

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use shoal_proto::v1::Sample;

use crate::registry::DeviceRecord;

pub(crate) const DEVICE_KEYS: TableDefinition<&str, u32> = TableDefinition::new("device_keys");
pub(crate) const DEVICES: TableDefinition<u32, &[u8]> = TableDefinition::new("devices");
/// Samples as stores before per-device tables kept them, all devices in one tree; moved into
/// [`DeviceSamples`] when such a store is opened.
pub(crate) const LEGACY_SAMPLES: TableDefinition<(u32, u64), &[u8]> =
    TableDefinition::new("samples");
pub(crate) const SHAPES: TableDefinition<u32, &[u8]> = TableDefinition::new("sample_shapes");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("store: {0}")]
    Db(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// Writes are refused for now (the disk under the watermark, or the store reopening after
    /// a failed commit); nothing was written.
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// When the caller should try again, for refusals that pass by themselves.
    pub fn retry_after(&self) -> Option<Duration> {
        matches!(self, StoreError::Refused(_)).then_some(health::RETRY_AFTER)
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// How the store guards its disk (`--min-free-space`).
#[derive(Debug, Clone)]
pub struct StorePolicy {
    /// Writes are refused while the data directory's filesystem has less free space than
    /// this; 0 turns the watermark off.
    pub min_free_bytes: u64,
    /// How long, and how many bytes of, samples are kept.
    pub retention: retention::RetentionPolicy,
}

/// The default low-disk watermark: room for the store to finish what it is doing and for an
/// operator to act, small enough for an SD card.
pub const DEFAULT_MIN_FREE: &str = "256MB";

impl Default for StorePolicy {
    fn default() -> Self {
        Self {
            min_free_bytes: shoal_proto::size::parse(DEFAULT_MIN_FREE).expect("a size"),
            retention: retention::RetentionPolicy {
                rollups_1m: humantime::parse_duration(retention::DEFAULT_ROLLUPS_1M).ok(),
                rollups_1h: humantime::parse_duration(retention::DEFAULT_ROLLUPS_1H).ok(),
                ..Default::default()
            },
        }
    }
}

/// A loaded device: its key, record and highest stored seq.
#[derive(Debug, Clone)]
pub struct LoadedDevice {
    pub key: u32,
    pub record: DeviceRecord,
    pub max_seq: u64,
    /// Its newest sample in brief.
    pub latest: Option<readings::Readings>,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    path: PathBuf,
    /// `None` only while the database is being reopened.
    db: RwLock<Option<Arc<Database>>>,
    health: health::Health,
    holds: retention::Holds,
    retention: std::sync::Mutex<retention::RetentionStatus>,
    policy: RwLock<retention::RetentionPolicy>,
    rollups: rollup::State,
    shapes: codec::Shapes,
}

impl Store {
    /// Opens or creates `DATA_DIR/shoal.redb`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
            path: data_dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let path = data_dir.join("shoal.redb");
        let db = Database::create(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(DEVICE_KEYS)?;
        txn.open_table(DEVICES)?;
        txn.open_table(SHAPES)?;
        txn.commit()?;
        retention::ensure_meta(&db)?;
        move_legacy_samples(&db)?;
        let rollups = rollup::open(&db)?;
        let shapes = {
            let txn = db.begin_read()?;
            let table = txn.open_table(SHAPES)?;
            let rows = table
                .iter()?
                .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
                .collect::<Result<Vec<_>, _>>()?;
            codec::Shapes::load(rows)?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dir: data_dir.to_path_buf(),
                path,
                db: RwLock::new(Some(Arc::new(db))),
                health: health::Health::default(),
                holds: Default::default(),
                retention: Default::default(),
                policy: Default::default(),
                rollups,
                shapes,
            }),
        })
    }

    /// The database, for the storage layer's own modules only.
    pub(crate) fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.inner
            .db
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| StoreError::Refused("the store is being reopened".into()))
    }

    /// The directory holding the store.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether writes go through now, and the low-disk watermark.
    pub fn health(&self) -> &health::Health {
        &self.inner.health
    }

    /// Closes and reopens the database file, which is what redb needs after a failed commit.
    /// Called by the writer thread only, between transactions. Readers see
    /// [`StoreError::Refused`] for the moment it takes.
    pub(crate) fn reopen(&self) -> Result<(), StoreError> {
        let old = self.inner.db.write().expect("store lock").take();
        drop(old);
        // A reader may still hold the old handle for the length of its transaction; its file
        // lock goes with it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let db = loop {
            match Database::create(&self.inner.path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    return Err(StoreError::Open {
                        path: self.inner.path.clone(),
                        message: e.to_string(),
                    });
                }
            }
        };
        *self.inner.db.write().expect("store lock") = Some(Arc::new(db));
        tracing::warn!(path = %self.inner.path.display(), "reopened the store");
        Ok(())
    }

    /// Every known device, with the highest seq stored for it.
    pub fn load_devices(&self) -> Result<Vec<LoadedDevice>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for row in devices.iter()? {
            let (key, value) = row?;
            let key = key.value();
            let record: DeviceRecord = serde_json::from_slice(value.value())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (max_seq, latest) = match read_samples(&txn, key)? {
                Some(samples) => match samples.last()? {
                    // A newest sample that does not decode leaves the brief empty until the
                    // next one arrives; it does not keep the hub from starting.
                    Some((k, v)) => (
                        k.value(),
                        self.decode(v.value())
                            .inspect_err(|e| {
                                tracing::warn!(key, error = %e, "cannot read a device's newest sample")
                            })
                            .ok()
                            .map(|s| readings::Readings::of(&s)),
                    ),
                    None => (0, None),
                },
                None => (0, None),
            };
            out.push(LoadedDevice {
                key,
                record,
                max_seq,
                latest,
            });
        }
        Ok(out)
    }

    /// Samples of device `key` with seq > `after_seq`, at most `limit`.
    pub fn samples_after(
        &self,
        key: u32,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Sample>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let Some(samples) = read_samples(&txn, key)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in samples.range(after_seq.saturating_add(1)..)?.take(limit) {
            let (_, v) = row?;
            out.push(self.decode(v.value())?);
        }
        Ok(out)
    }

    /// The newest sample of device `key`.
    pub fn latest(&self, key: u32) -> Result<Option<Sample>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let Some(samples) = read_samples(&txn, key)? else {
            return Ok(None);
        };
        let last = samples.last()?;
        last.map(|(_, v)| self.decode(v.value())).transpose()
    }

    /// Device `key`'s newest sample, and the seqs it has stored: the first, the last and how
    /// many (fewer than `last - first + 1` when some between them never arrived); from one
    /// read, `None`s with none stored.
    #[allow(clippy::type_complexity)]
    pub fn newest_and_stored(
        &self,
        key: u32,
    ) -> Result<(Option<Sample>, Option<(u64, u64, u64)>), StoreError> {
        let txn = self.db()?.begin_read()?;
        let Some(samples) = read_samples(&txn, key)? else {
            return Ok((None, None));
        };
        let (Some((first, _)), Some((last, value))) = (samples.first()?, samples.last()?) else {
            return Ok((None, None));
        };
        let newest = self.decode(value.value())?;
        Ok((
            Some(newest),
            Some((first.value(), last.value(), samples.len()?)),
        ))
    }

    /// How many samples device `key` has in `[from_ms, to_ms)`, from two binary searches (exact
    /// when its seqs have no gaps; an estimate for progress otherwise).
    pub fn count_time_range(&self, key: u32, from_ms: i64, to_ms: i64) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read()?;
        let Some(samples) = read_samples(&txn, key)? else {
            return Ok(0);
        };
        let lo = self.first_seq_at_or_after(&samples, from_ms)?;
        let hi = self.first_seq_at_or_after(&samples, to_ms)?;
        Ok(hi.saturating_sub(lo))
    }

    /// Calls `f` on every sample of device `key` whose timestamp lies in `[from_ms, to_ms)`,
    /// in seq order. The start is found by binary search over seq (a device's timestamps rise
    /// with its seq), so a query over the last hour of a year of data reads the last hour only.
    pub fn scan_time_range(
        &self,
        key: u32,
        from_ms: i64,
        to_ms: i64,
        mut f: impl FnMut(&Sample),
    ) -> Result<(), StoreError> {
        let txn = self.db()?.begin_read()?;
        let Some(samples) = read_samples(&txn, key)? else {
            return Ok(());
        };
        let lo = self.first_seq_at_or_after(&samples, from_ms)?;
        for row in samples.range(lo..)? {
            let (_, v) = row?;
            let s = self.decode(v.value())?;
            if s.timestamp_ms >= to_ms {
                break;
            }
            if s.timestamp_ms >= from_ms {
                f(&s);
            }
        }
        Ok(())
    }
}

/// The name of device `key`'s samples table: seq → the stored sample ([`codec`]).
///
/// One table per device, because redb packs a leaf full only when keys are appended at the
/// end of its tree: a device's samples appended in the middle of a shared tree (after its own,
/// before the next device's) split leaves in half and leave them about 57 % full.
pub(crate) struct DeviceSamples(String);

impl DeviceSamples {
    pub fn of(key: u32) -> Self {
        Self(format!("samples.{key}"))
    }

    pub fn def(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.0)
    }
}

/// Device `key`'s samples in a read transaction; `None` while it has none.
pub(crate) fn read_samples(
    txn: &redb::ReadTransaction,
    key: u32,
) -> Result<Option<redb::ReadOnlyTable<u64, &'static [u8]>>, StoreError> {
    match txn.open_table(DeviceSamples::of(key).def()) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Moves the samples of a store written before per-device tables into them, a transaction of
/// [`MOVE_STEP`] samples at a time (a crash in between leaves every sample in one place or
/// the other, and the next open goes on), then drops the old table.
fn move_legacy_samples(db: &Database) -> Result<(), StoreError> {
    const MOVE_STEP: usize = 50_000;
    if !table_exists(db, LEGACY_SAMPLES)? {
        return Ok(());
    }
    let mut moved = 0u64;
    loop {
        let txn = db.begin_write()?;
        let batch: Vec<((u32, u64), Vec<u8>)> = txn
            .open_table(LEGACY_SAMPLES)?
            .iter()?
            .take(MOVE_STEP)
            .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
            .collect::<Result<_, _>>()?;
        if batch.is_empty() {
            txn.delete_table(LEGACY_SAMPLES)?;
            txn.commit()?;
            if moved > 0 {
                tracing::info!(samples = moved, "moved the samples into a table per device");
            }
            return Ok(());
        }
        {
            let mut legacy = txn.open_table(LEGACY_SAMPLES)?;
            let mut at = 0;
            while at < batch.len() {
                let key = batch[at].0.0;
                let name = DeviceSamples::of(key);
                let mut table = txn.open_table(name.def())?;
                while at < batch.len() && batch[at].0.0 == key {
                    let ((_, seq), v) = &batch[at];
                    table.insert(*seq, v.as_slice())?;
                    legacy.remove((key, *seq))?;
                    at += 1;
                }
            }
        }
        txn.commit()?;
        moved += batch.len() as u64;
    }
}

/// Whether `table` exists, asked without a write transaction (which would create it, and
/// fsync at every open).
pub(crate) fn table_exists<K: redb::Key + 'static, V: redb::Value + 'static>(
    db: &Database,
    table: TableDefinition<'_, K, V>,
) -> Result<bool, StoreError> {
    match db.begin_read()?.open_table(table) {
        Ok(_) => Ok(true),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Store {
    /// The sample stored as `value`.
    pub(crate) fn decode(&self, value: &[u8]) -> Result<Sample, StoreError> {
        self.inner.shapes.decode(value)
    }

    /// The timestamp of the sample stored as `value`.
    pub(crate) fn timestamp_of(&self, value: &[u8]) -> Result<i64, StoreError> {
        self.inner.shapes.timestamp(value)
    }

    /// The smallest seq of a device's `samples` whose sample is at or after `ts_ms` (one past
    /// the last seq when none is), by binary search over seq.
    pub(crate) fn first_seq_at_or_after(
        &self,
        samples: &impl ReadableTable<u64, &'static [u8]>,
        ts_ms: i64,
    ) -> Result<u64, StoreError> {
        let first_from = |seq: u64| -> Result<Option<(u64, i64)>, StoreError> {
            match samples.range(seq..)?.next().transpose()? {
                Some((k, v)) => Ok(Some((k.value(), self.timestamp_of(v.value())?))),
                None => Ok(None),
            }
        };
        let Some((mut lo, _)) = first_from(0)? else {
            return Ok(0);
        };
        let mut hi = samples.last()?.map_or(lo, |(k, _)| k.value()) + 1;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match first_from(mid)? {
                Some((s, ts)) if ts < ts_ms => lo = s + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }
}
