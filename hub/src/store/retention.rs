//! Retention: old samples are deleted by age (`--retention 30d`) and by size
//! (`--retention-size 50GB`), continuously, in small transactions that never hold the writer
//! for long.
//!
//! **Space is reused, not returned.** redb is copy-on-write with a free-page allocator: pages a
//! deletion frees are the ones later commits fill, so a store under a size policy stops growing
//! instead of shrinking. The size policy therefore watches the *file*: once it passes 90 % of the
//! limit, the oldest samples are deleted until the bytes held in samples are below the same
//! fraction of what they were, which frees enough pages for new data to land in. The accounting
//! of sample bytes (`store_meta`) is kept by the writer in the same transactions as the samples.
//!
//! **What is never deleted:**
//! - each device's newest sample (the registry's latest values and the dedup high-water mark
//!   come from it);
//! - samples the sinks have not forwarded yet (anything an outbox entry still names);
//! - samples at or after the start of a dataset export in progress ([`Store::hold`]).
//!
//! Each step re-reads the holds in its own write transaction, so a late sample (a gap filled
//! after a reconnect) committed during a pass is never deleted under a sink that still needs it,
//! and a crash between steps leaves a store that is merely less trimmed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use utoipa::ToSchema;

use super::outbox::OUTBOX;
use super::rollup::{self, Level, ROLLUP_FRONTIER, ROLLUP_LATE};
use super::{DEVICES, DeviceSamples, LEGACY_SAMPLES, Store, StoreError, read_samples};

/// How often retention looks at the store.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Runs retention every [`PERIOD`] until shutdown (nothing with no policy).
pub async fn run(
    store: Store,
    policy: RetentionPolicy,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    *store.inner.policy.write().expect("policy lock") = policy.clone();
    if policy.is_off() {
        return;
    }
    let mut retention = Retention::new(policy);
    let mut last: Option<std::time::Instant> = None;
    loop {
        // Every PERIOD, and every second while the disk is under the watermark: a pass may
        // free what the policy allows before the store takes writes again.
        let full = matches!(
            store.health().state(),
            super::health::WriteState::Full { .. }
        );
        if last.is_none_or(|t| t.elapsed() >= PERIOD || full) {
            last = Some(std::time::Instant::now());
            let s = store.clone();
            let (r, result) = tokio::task::spawn_blocking(move || {
                let result = retention.pass(&s, super::series::now_ms());
                (retention, result)
            })
            .await
            .expect("retention task");
            retention = r;
            match result {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "retention deleted old samples"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention pass failed; will try again"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Counters kept with the samples: `sample_bytes`, `samples`.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("store_meta");
pub(crate) const SAMPLE_BYTES: &str = "sample_bytes";
pub(crate) const SAMPLE_COUNT: &str = "samples";

/// Rows deleted per transaction: a few milliseconds of the writer's time.
const STEP: usize = 2_000;
/// The size policy acts above this fraction of `--retention-size`.
const SIZE_HIGH: f64 = 0.9;

/// How long samples are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Samples older than this (by their own timestamp) are deleted.
    pub max_age: Option<Duration>,
    /// The store file is kept under this many bytes.
    pub max_size: Option<u64>,
    /// Minute rollups older than this are deleted.
    pub rollups_1m: Option<Duration>,
    /// Hour rollups older than this are deleted.
    pub rollups_1h: Option<Duration>,
}

/// How long minute rollups are kept by default.
pub const DEFAULT_ROLLUPS_1M: &str = "30d";
/// How long hour rollups are kept by default.
pub const DEFAULT_ROLLUPS_1H: &str = "730d";

impl RetentionPolicy {
    pub fn is_off(&self) -> bool {
        self.max_age.is_none()
            && self.max_size.is_none()
            && self.rollups_1m.is_none()
            && self.rollups_1h.is_none()
    }
}

/// Something that needs samples kept from `from_ms` on.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Hold {
    /// What holds them, e.g. `dataset export fleet-2026-11`.
    pub what: String,
    /// Samples at or after this time (epoch ms) are kept.
    pub from_ms: i64,
}

/// The holds in force; [`HoldGuard`] removes its own on drop.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    next: AtomicU64,
    held: Mutex<BTreeMap<u64, Hold>>,
}

impl Holds {
    pub(crate) fn all(&self) -> Vec<Hold> {
        self.held
            .lock()
            .expect("holds lock")
            .values()
            .cloned()
            .collect()
    }

    fn earliest(&self) -> Option<i64> {
        self.held
            .lock()
            .expect("holds lock")
            .values()
            .map(|h| h.from_ms)
            .min()
    }
}

/// Keeps samples from a time on while it lives.
#[must_use = "the hold ends when this is dropped"]
pub struct HoldGuard {
    store: Store,
    id: u64,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.store
            .inner
            .holds
            .held
            .lock()
            .expect("holds lock")
            .remove(&self.id);
    }
}

impl Store {
    /// Keeps every sample at or after `from_ms` until the guard is dropped (a dataset export
    /// reading them, for one).
    pub fn hold(&self, what: impl Into<String>, from_ms: i64) -> HoldGuard {
        let id = self.inner.holds.next.fetch_add(1, Ordering::Relaxed);
        self.inner.holds.held.lock().expect("holds lock").insert(
            id,
            Hold {
                what: what.into(),
                from_ms,
            },
        );
        HoldGuard {
            store: self.clone(),
            id,
        }
    }

    /// Bytes and count of the samples stored, as the writer and retention account them.
    pub fn sample_totals(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.db()?.begin_read()?;
        let meta = txn.open_table(META)?;
        let get = |k| -> Result<u64, StoreError> { Ok(meta.get(k)?.map_or(0, |v| v.value())) };
        Ok((get(SAMPLE_BYTES)?, get(SAMPLE_COUNT)?))
    }

    /// The oldest and newest sample timestamps (epoch ms) over all devices.
    pub fn sample_time_bounds(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let mut bounds: Option<(i64, i64)> = None;
        for row in devices.iter()? {
            let key = row?.0.value();
            let Some(samples) = read_samples(&txn, key)? else {
                continue;
            };
            let mut range = samples.iter()?;
            let first = range.next().transpose()?;
            let last = range.next_back().transpose()?;
            let ts = |v: &[u8]| self.timestamp_of(v);
            if let Some((_, v)) = first {
                let lo = ts(v.value())?;
                let hi = match last {
                    Some((_, v)) => ts(v.value())?,
                    None => lo,
                };
                bounds = Some(match bounds {
                    Some((a, b)) => (a.min(lo), b.max(hi)),
                    None => (lo, hi),
                });
            }
        }
        Ok(bounds)
    }

    /// Bytes of the store file in use (allocated pages); the rest is free pages that later
    /// commits reuse. redb counts them by walking its trees, in a write transaction: the
    /// size policy asks once a pass (see `docs/store.md` for what that costs).
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_write()?;
        let stats = txn.stats()?;
        txn.abort()?;
        Ok(stats.allocated_pages() * stats.page_size() as u64)
    }

    /// Pages in use and bytes stored of the samples and the rollups, the two tables that grow
    /// with history: `(table, page bytes, stored bytes)`. Walks both trees.
    pub fn table_bytes(&self) -> Result<Vec<(&'static str, u64, u64)>, StoreError> {
        use redb::ReadableTableMetadata;
        let txn = self.db()?.begin_read()?;
        let mut out = Vec::new();
        // redb's page size, which the store leaves at its default.
        let page = 4096;
        let (mut pages, mut stored) = (0, 0);
        for row in txn.open_table(DEVICES)?.iter()? {
            if let Some(t) = read_samples(&txn, row?.0.value())? {
                let s = t.stats()?;
                pages += (s.leaf_pages() + s.branch_pages()) * page;
                stored += s.stored_bytes();
            }
        }
        out.push(("samples", pages, stored));
        let (mut pages, mut stored) = (0, 0);
        for row in txn.open_table(DEVICES)?.iter()? {
            let key = row?.0.value();
            for level in super::rollup::Level::ALL {
                if let Some(t) = super::rollup::read_rollups(&txn, key, level)? {
                    let s = t.stats()?;
                    pages += (s.leaf_pages() + s.branch_pages()) * page;
                    stored += s.stored_bytes();
                }
            }
        }
        out.push(("rollups", pages, stored));
        Ok(out)
    }

    /// Size of the store file on disk.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.inner.path).map_or(0, |m| m.len())
    }

    /// The retention policy in force.
    pub fn retention_policy(&self) -> RetentionPolicy {
        self.inner.policy.read().expect("policy lock").clone()
    }

    /// The holds in force (dataset exports reading).
    pub fn holds(&self) -> Vec<Hold> {
        self.inner.holds.all()
    }

    /// What retention has done, and what holds data back.
    pub fn retention_status(&self) -> RetentionStatus {
        self.inner.retention.lock().expect("retention lock").clone()
    }
}

/// Fills `store_meta` on a store written before it existed (one scan, once).
pub(crate) fn ensure_meta(db: &redb::Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        if meta.get(SAMPLE_BYTES)?.is_none() {
            let samples = txn.open_table(LEGACY_SAMPLES)?;
            let (mut bytes, mut count) = (0u64, 0u64);
            for row in samples.iter()? {
                let (_, v) = row?;
                bytes += row_bytes(v.value().len());
                count += 1;
            }
            if count > 0 {
                tracing::info!(
                    samples = count,
                    bytes,
                    "counted the stored samples for retention"
                );
            }
            meta.insert(SAMPLE_BYTES, bytes)?;
            meta.insert(SAMPLE_COUNT, count)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Bytes a sample row accounts for: its value and its 12-byte key.
pub(crate) fn row_bytes(value_len: usize) -> u64 {
    value_len as u64 + 12
}

/// What the last retention pass did, and what held it back.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct RetentionStatus {
    /// When the last pass ended (epoch ms); absent before the first.
    pub last_pass_ms: Option<i64>,
    /// Samples the last pass deleted.
    pub last_pass_deleted: u64,
    /// How long the last pass took, in milliseconds.
    pub last_pass_took_ms: u64,
    /// Samples deleted since the hub started.
    pub deleted_total: u64,
    /// What kept samples the policy would otherwise have deleted, in the last pass.
    pub held_back_by: Vec<String>,
    /// Sample bytes written per day, measured over up to the last hour; absent until measured.
    pub growth_bytes_per_day: Option<f64>,
}

/// redb grows its file by doubling up to one region (4 GiB), then a region at a time.
const REGION: u64 = 4 << 30;

/// The largest size the store file can grow to without passing `max`, from `file` now: the
/// size policy keeps the store's pages under 90 % of it, so the next growth never happens.
pub fn reachable_size(file: u64, max: u64) -> u64 {
    let mut size = file.max(1 << 20);
    loop {
        let next = if size < REGION {
            size * 2
        } else {
            size + REGION
        };
        if next > max {
            return size.min(max);
        }
        size = next;
    }
}

/// The retention loop's memory between passes.
#[derive(Default)]
pub struct Retention {
    policy: RetentionPolicy,
    /// (when, sample bytes ever written) observations, for the growth rate.
    written: VecDeque<(Instant, u64)>,
    /// Sample bytes deleted since start, so that growth counts what was written.
    deleted_bytes: u64,
}

impl Retention {
    pub fn new(policy: RetentionPolicy) -> Self {
        Self {
            policy,
            ..Default::default()
        }
    }

    /// One pass: deletes what the policy allows, a step at a time.
    pub fn pass(&mut self, store: &Store, now_ms: i64) -> Result<u64, StoreError> {
        let started = Instant::now();
        // Samples go only once they are in the rollups: roll up to now first.
        rollup::roll(store, now_ms)?;
        let mut held = Vec::new();
        let mut deleted = 0u64;
        let hold_from = store.inner.holds.earliest();
        let mut pending = Pending::scan(store)?;

        if let Some(age) = self.policy.max_age {
            let cut = now_ms - age.as_millis() as i64;
            let (n, why) = self.delete_before(store, cut, hold_from, &mut pending)?;
            deleted += n;
            held.extend(why);
        }
        for (level, keep) in [
            (Level::Minute, self.policy.rollups_1m),
            (Level::Hour, self.policy.rollups_1h),
        ] {
            if let Some(keep) = keep {
                let cut = now_ms - keep.as_millis() as i64;
                while rollup::trim(store, level, cut, STEP)? == STEP as u64 {}
            }
        }
        if let Some(max) = self.policy.max_size {
            let capacity = reachable_size(store.file_bytes(), max);
            let high = (capacity as f64 * SIZE_HIGH) as u64;
            let used = store.used_bytes()?;
            if used > high
                && let Some((oldest, newest)) = store.sample_time_bounds()?
            {
                // Free what is over the mark, and 5 % more so that this is not every pass.
                let (bytes, _) = store.sample_totals()?;
                let target = bytes.saturating_sub(used - high + capacity / 20);
                let mut bytes_now = bytes;
                let slice = ((newest - oldest) / 50).max(60_000);
                let mut cut = oldest;
                while bytes_now > target && cut <= newest {
                    cut += slice;
                    let (n, why) = self.delete_before(store, cut, hold_from, &mut pending)?;
                    deleted += n;
                    held.extend(why);
                    bytes_now = store.sample_totals()?.0;
                }
                if bytes_now > target && held.is_empty() {
                    held.push(
                        "each device's newest sample is kept: the size limit is below what the fleet's latest samples take"
                            .into(),
                    );
                }
            }
        }
        held.sort();
        held.dedup();
        let (bytes, _) = store.sample_totals()?;
        let now = Instant::now();
        self.written.push_back((now, bytes + self.deleted_bytes));
        while self
            .written
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(3600))
        {
            self.written.pop_front();
        }
        let growth = match (self.written.front(), self.written.back()) {
            (Some((t0, b0)), Some((t1, b1)))
                if t1.duration_since(*t0) >= Duration::from_secs(5) =>
            {
                Some((b1 - b0) as f64 / t1.duration_since(*t0).as_secs_f64() * 86_400.0)
            }
            _ => None,
        };
        let mut status = store.inner.retention.lock().expect("retention lock");
        status.last_pass_ms = Some(now_ms);
        status.last_pass_deleted = deleted;
        status.last_pass_took_ms = started.elapsed().as_millis() as u64;
        status.deleted_total += deleted;
        status.held_back_by = held;
        status.growth_bytes_per_day = growth;
        Ok(deleted)
    }

    /// Deletes, device by device, the samples older than `cut_ms`, short of the holds. Returns
    /// how many it deleted and what held some back.
    fn delete_before(
        &mut self,
        store: &Store,
        cut_ms: i64,
        hold_from: Option<i64>,
        pending: &mut Pending,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut why = Vec::new();
        let mut cut = cut_ms;
        if let Some(h) = hold_from
            && h < cut
        {
            cut = h;
            for hold in store.inner.holds.all() {
                if hold.from_ms < cut_ms {
                    why.push(hold.what);
                }
            }
        }
        // Only the devices with something older than the cut take a write transaction.
        let keys: Vec<u32> = {
            let txn = store.db()?.begin_read()?;
            let devices = txn.open_table(DEVICES)?;
            let mut keys = Vec::new();
            for row in devices.iter()? {
                let key = row?.0.value();
                let Some(samples) = read_samples(&txn, key)? else {
                    continue;
                };
                let first = samples.first()?;
                if let Some((_, v)) = first
                    && store.timestamp_of(v.value())? < cut
                {
                    keys.push(key);
                }
            }
            keys
        };
        let mut deleted = 0;
        for key in keys {
            loop {
                let (n, by_sinks) = self.step(store, key, cut, pending)?;
                deleted += n;
                if by_sinks {
                    why.push("sinks: samples not forwarded yet".into());
                }
                if n < STEP as u64 {
                    break;
                }
            }
        }
        Ok((deleted, why))
    }

    /// Deletes up to [`STEP`] samples of device `key` before `cut_ms` in one transaction; says
    /// whether the sinks' outbox held some back.
    fn step(
        &mut self,
        store: &Store,
        key: u32,
        cut_ms: i64,
        pending: &mut Pending,
    ) -> Result<(u64, bool), StoreError> {
        let txn = store.db()?.begin_write()?;
        let (n, bytes, held_by_sinks);
        {
            pending.catch_up(&txn)?;
            let name = DeviceSamples::of(key);
            let mut samples = txn.open_table(name.def())?;
            let Some(newest) = samples.last()?.map(|(k, _)| k.value()) else {
                return Ok((0, false));
            };
            let by_time = store.first_seq_at_or_after(&samples, cut_ms)?;
            let mut end = by_time.min(newest);
            // Samples not yet in the rollups stay until they are.
            let frontier = txn
                .open_table(ROLLUP_FRONTIER)?
                .get(key)?
                .map(|v| v.value());
            end = match frontier {
                Some(f) => end.min(store.first_seq_at_or_after(&samples, f)?),
                None => 0,
            };
            if let Some((k, _)) = txn
                .open_table(ROLLUP_LATE)?
                .range((key, 0)..(key, end))?
                .next()
                .transpose()?
            {
                end = k.value().1;
            }
            held_by_sinks = pending.min_seq.get(&key).is_some_and(|&s| s < end);
            if let Some(&s) = pending.min_seq.get(&key) {
                end = end.min(s);
            }
            let doomed: Vec<u64> = samples
                .range(0..end)?
                .take(STEP)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            let mut freed = 0;
            for seq in &doomed {
                if let Some(v) = samples.remove(*seq)? {
                    freed += row_bytes(v.value().len());
                }
            }
            n = doomed.len() as u64;
            bytes = freed;
            if n > 0 {
                let mut meta = txn.open_table(META)?;
                let b = meta.get(SAMPLE_BYTES)?.map_or(0, |v| v.value());
                let c = meta.get(SAMPLE_COUNT)?.map_or(0, |v| v.value());
                meta.insert(SAMPLE_BYTES, b.saturating_sub(bytes))?;
                meta.insert(SAMPLE_COUNT, c.saturating_sub(n))?;
            }
        }
        if n == 0 {
            txn.abort()?;
        } else {
            txn.commit()?;
            self.deleted_bytes += bytes;
        }
        Ok((n, held_by_sinks))
    }
}

/// The lowest seq per device that an outbox entry still names (what the sinks have not
/// forwarded yet), and how far into the outbox that was read.
struct Pending {
    min_seq: HashMap<u32, u64>,
    read_to: u64,
}

impl Pending {
    fn scan(store: &Store) -> Result<Self, StoreError> {
        let mut p = Pending {
            min_seq: HashMap::new(),
            read_to: 0,
        };
        let txn = store.db()?.begin_read()?;
        match txn.open_table(OUTBOX) {
            Ok(outbox) => {
                for row in outbox.range(1..)? {
                    let (k, v) = row?;
                    p.note(k.value(), v.value());
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(p)
    }

    /// Adds what the writer appended since the last read (in the step's write transaction,
    /// so nothing committed before the step's deletions is missed).
    fn catch_up(&mut self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        // The outbox exists only on hubs with sinks; opening it here would create it.
        let exists = txn.list_tables()?.any(|t| t.name() == OUTBOX_NAME);
        if exists {
            let outbox = txn.open_table(OUTBOX)?;
            for row in outbox.range(self.read_to + 1..)? {
                let (k, v) = row?;
                self.note(k.value(), v.value());
            }
        }
        Ok(())
    }

    fn note(&mut self, offset: u64, entry: &[u8]) {
        self.read_to = self.read_to.max(offset);
        if let Some((key, seq)) = super::outbox::sample_ref(entry) {
            let e = self.min_seq.entry(key).or_insert(seq);
            *e = (*e).min(seq);
        }
    }
}

const OUTBOX_NAME: &str = "outbox";

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shoal_proto::v1::{Cpu, DeviceHello, Sample};

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::writer::{Fleet, Row, Writer};

    const MIN: i64 = 60_000;

    fn row(seq: u64, ts: i64) -> Row {
        let s = Sample {
            seq,
            timestamp_ms: ts,
            cpu: Some(Cpu {
                total_percent: seq as f64,
                core_percent: vec![1.0, 2.0],
            }),
            ..Default::default()
        };
        Row::new(s)
    }

    async fn open(dir: &std::path::Path, outbox: bool) -> (Store, Writer) {
        let store = Store::open(dir).unwrap();
        let fleet = Arc::new(Fleet::from_loaded(&store).unwrap());
        let (writer, _thread) =
            Writer::start_with(store.clone(), fleet, Arc::new(Metrics::default()), outbox).unwrap();
        (store, writer)
    }

    /// `device`'s samples one minute apart: seq 1 at `start`, up to `n`.
    async fn fill(writer: &Writer, device: &str, start: i64, n: u64) {
        writer
            .hello(
                DeviceHello {
                    device_id: device.into(),
                    ..Default::default()
                },
                start,
            )
            .await
            .unwrap();
        writer
            .write(
                device.into(),
                (1..=n)
                    .map(|s| row(s, start + (s as i64 - 1) * MIN))
                    .collect(),
                start,
            )
            .await
            .unwrap();
    }

    fn seqs(store: &Store, device: &str) -> Vec<u64> {
        let fleet = Fleet::from_loaded(store).unwrap();
        let key = fleet.get(device).unwrap().key;
        store
            .samples_after(key, 0, usize::MAX)
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect()
    }

    /// The accounting the writer and retention keep, against a count of what is stored.
    fn check_totals(store: &Store) {
        let txn = store.db().unwrap().begin_read().unwrap();
        let (mut bytes, mut count) = (0, 0);
        for d in txn.open_table(DEVICES).unwrap().iter().unwrap() {
            let Some(samples) = read_samples(&txn, d.unwrap().0.value()).unwrap() else {
                continue;
            };
            for r in samples.iter().unwrap() {
                bytes += row_bytes(r.unwrap().1.value().len());
                count += 1;
            }
        }
        assert_eq!(store.sample_totals().unwrap(), (bytes, count));
    }

    #[tokio::test]
    async fn a_store_with_all_samples_in_one_table_is_moved_into_a_table_per_device() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, writer) = open(dir.path(), false).await;
            fill(&writer, "a", 10 * MIN, 120).await;
            fill(&writer, "b", 10 * MIN, 7).await;
            drop((store, writer));
        }
        // As an older hub left it: every sample in `samples`, keyed (device key, seq), in the
        // protobuf form.
        // The writer thread lets go of the file once it sees its channel closed.
        let db = loop {
            match redb::Database::create(dir.path().join("shoal.redb")) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                other => break other.unwrap(),
            }
        };
        let txn = db.begin_write().unwrap();
        {
            let mut legacy = txn.open_table(LEGACY_SAMPLES).unwrap();
            for key in [1u32, 2] {
                let name = DeviceSamples::of(key);
                let mut table = txn.open_table(name.def()).unwrap();
                let rows: Vec<(u64, i64)> = table
                    .iter()
                    .unwrap()
                    .map(|r| {
                        let (k, v) = r.unwrap();
                        (k.value(), codec_ts(v.value()))
                    })
                    .collect();
                for (seq, ts) in rows {
                    let old = prost::Message::encode_to_vec(&Sample {
                        seq,
                        timestamp_ms: ts,
                        ..Default::default()
                    });
                    legacy.insert((key, seq), old.as_slice()).unwrap();
                    table.remove(seq).unwrap();
                }
            }
        }
        txn.commit().unwrap();
        drop(db);
        let (store, writer) = open(dir.path(), false).await;
        assert_eq!(seqs(&store, "a"), (1..=120).collect::<Vec<_>>());
        assert_eq!(seqs(&store, "b"), (1..=7).collect::<Vec<_>>());
        let fleet = Fleet::from_loaded(&store).unwrap();
        assert_eq!(fleet.get("a").unwrap().max_seq, 120);
        let txn = store.db().unwrap().begin_read().unwrap();
        assert!(matches!(
            txn.open_table(LEGACY_SAMPLES),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
        drop(txn);
        // And it goes on: a resent sample is a duplicate, a new one is stored.
        let out = writer
            .write(
                "a".into(),
                vec![row(120, 130 * MIN), row(121, 131 * MIN)],
                131 * MIN,
            )
            .await
            .unwrap();
        assert_eq!((out.accepted, out.duplicates), (1, 1));
    }

    fn codec_ts(v: &[u8]) -> i64 {
        crate::store::codec::Shapes::default().timestamp(v).unwrap()
    }

    #[tokio::test]
    async fn age_retention_deletes_old_samples_but_keeps_each_devices_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path(), false).await;
        let now = 1_000 * MIN;
        // Samples over the last 10,000 minutes (more than a step of deletions).
        fill(&writer, "busy", now - 9_999 * MIN, 10_000).await;
        // A device silent for longer than the retention keeps its last sample.
        fill(&writer, "silent", now - 5_000 * MIN, 3).await;
        check_totals(&store);
        let mut r = Retention::new(RetentionPolicy {
            max_age: Some(Duration::from_secs(60 * 60)),
            max_size: None,
            ..Default::default()
        });
        let deleted = r.pass(&store, now).unwrap();
        assert_eq!(seqs(&store, "busy"), (9_940..=10_000).collect::<Vec<_>>());
        assert_eq!(seqs(&store, "silent"), vec![3]);
        assert_eq!(deleted, 9_939 + 2);
        check_totals(&store);
        let status = store.retention_status();
        assert_eq!(status.last_pass_deleted, deleted);
        assert!(status.held_back_by.is_empty());
        // A second pass finds nothing more to do.
        assert_eq!(r.pass(&store, now).unwrap(), 0);
    }

    #[tokio::test]
    async fn holds_and_unforwarded_samples_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path(), true).await;
        let now = 1_000 * MIN;
        fill(&writer, "d", now - 99 * MIN, 100).await;
        let policy = RetentionPolicy {
            max_age: Some(Duration::from_secs(10 * 60)),
            max_size: None,
            ..Default::default()
        };
        let mut r = Retention::new(policy);
        // Nothing is forwarded yet: the outbox names every sample.
        assert_eq!(r.pass(&store, now).unwrap(), 0);
        assert_eq!(seqs(&store, "d").len(), 100);
        assert!(
            store.retention_status().held_back_by[0].contains("sinks"),
            "{:?}",
            store.retention_status()
        );
        // The sinks forward up to seq 50 (outbox offset 1 is the hello).
        store.trim_outbox(51, 1_000).unwrap();
        assert_eq!(r.pass(&store, now).unwrap(), 50);
        assert_eq!(seqs(&store, "d")[0], 51);
        // A dataset export reading from seq 60's time on holds the rest.
        store.trim_outbox(u64::MAX, 1_000).unwrap();
        let hold = store.hold("a dataset export", now - 40 * MIN);
        assert_eq!(r.pass(&store, now).unwrap(), 9);
        assert_eq!(seqs(&store, "d")[0], 60);
        assert_eq!(
            store.retention_status().held_back_by,
            vec!["a dataset export".to_string()]
        );
        drop(hold);
        assert_eq!(r.pass(&store, now).unwrap(), 30);
        assert_eq!(seqs(&store, "d")[0], 90);
        check_totals(&store);
    }

    #[tokio::test]
    async fn a_late_sample_committed_during_a_pass_is_held_for_the_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path(), true).await;
        let now = 1_000 * MIN;
        let at = |s: u64| now - 99 * MIN + (s as i64 - 1) * MIN;
        writer
            .hello(
                DeviceHello {
                    device_id: "d".into(),
                    ..Default::default()
                },
                now,
            )
            .await
            .unwrap();
        // Seq 5 is missing: the agent resends it later, after a reconnect.
        let rows = (1..=100)
            .filter(|s| *s != 5)
            .map(|s| row(s, at(s)))
            .collect();
        writer.write("d".into(), rows, now).await.unwrap();
        store.trim_outbox(u64::MAX, 1_000).unwrap();
        rollup::roll(&store, now).unwrap();
        // The pass has read the outbox (empty) when the late sample commits.
        let mut pending = Pending::scan(&store).unwrap();
        writer
            .write("d".into(), vec![row(5, at(5))], now)
            .await
            .unwrap();
        assert_eq!(rollup::roll(&store, now).unwrap().late, 1);
        let mut r = Retention::new(RetentionPolicy::default());
        let key = Fleet::from_loaded(&store).unwrap().get("d").unwrap().key;
        let (n, held) = r.step(&store, key, now - 10 * MIN, &mut pending).unwrap();
        assert!(
            held,
            "the step read the new outbox entry in its own transaction"
        );
        assert_eq!(n, 4, "only seqs 1-4, below the seq the sinks still need");
        assert_eq!(seqs(&store, "d")[0], 5);
        check_totals(&store);
    }

    #[test]
    fn the_size_policy_stops_before_a_growth_step_would_pass_the_limit() {
        const G: u64 = 1 << 30;
        assert_eq!(reachable_size(G, 50 * G), 48 * G);
        assert_eq!(reachable_size(G, 6 * G), 4 * G);
        assert_eq!(reachable_size(8 * G, 50 * G), 48 * G);
        assert_eq!(
            reachable_size(60 * G, 50 * G),
            50 * G,
            "a limit lowered later"
        );
        assert_eq!(reachable_size(4_460_544, 12_000_000), 8_921_088);
    }

    #[tokio::test]
    async fn size_retention_keeps_the_file_under_the_limit_while_ingest_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path(), false).await;
        let limit = 12_000_000;
        let mut r = Retention::new(RetentionPolicy {
            max_age: None,
            max_size: Some(limit),
            ..Default::default()
        });
        let big = |seq: u64, ts: i64| {
            let s = Sample {
                seq,
                timestamp_ms: ts,
                cpu: Some(Cpu {
                    total_percent: 1.0,
                    core_percent: (0..64).map(|c| (seq * 64 + c) as f64).collect(),
                }),
                ..Default::default()
            };
            Row::new(s)
        };
        writer
            .hello(
                DeviceHello {
                    device_id: "d".into(),
                    ..Default::default()
                },
                0,
            )
            .await
            .unwrap();
        let mut largest = 0;
        // About 40 MB of samples in all, more than three times the limit.
        for batch in 0..80u64 {
            let rows = (1..=1_000)
                .map(|i| big(batch * 1_000 + i, ((batch * 1_000 + i) * 1_000) as i64))
                .collect();
            writer.write("d".into(), rows, 0).await.unwrap();
            r.pass(&store, 100_000_000).unwrap();
            largest = largest.max(store.file_bytes());
        }
        let kept = seqs(&store, "d");
        assert_eq!(*kept.last().unwrap(), 80_000, "the newest are kept");
        assert!(kept[0] > 40_000, "the oldest went first: {}", kept[0]);
        assert_eq!(
            kept,
            (kept[0]..=80_000).collect::<Vec<_>>(),
            "oldest first, no holes"
        );
        assert!(
            largest <= limit,
            "the file grew to {largest} bytes, over the {limit} limit"
        );
        check_totals(&store);
    }
}
