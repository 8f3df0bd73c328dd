//! Rollups: per device and metric, the count, min, max, sum and last value of every minute and
//! every hour, so that a chart of a week reads 168 hourly rows instead of 60,000 samples.
//!
//! **Built as samples commit, exactly once each.** Each device has a *frontier*: every sample
//! timestamped before it is in the rollups. A pass every few seconds rolls the samples between
//! the frontier and the last settled minute (now − 30 s, floored), or the minute of the
//! device's newest sample if that is earlier, into minute and hour rows and moves the frontier
//! on, in the same transaction. (Stopping at the newest sample means a spool drained in order
//! after an outage arrives ahead of the frontier and rolls in bulk.) A sample that commits later
//! with a timestamp behind the frontier (a gap filled after a reconnect) is
//! marked by the writer in `rollup_late`, in the sample's own transaction, and the next pass
//! merges it into its minute and hour. Dedup happens before either, so a resent sample never
//! counts twice. The frontier in memory moves inside the pass's write transaction, so the writer
//! (which can only run before or after it) never misses marking a late sample.
//!
//! **Rows merge.** A row holds, per metric, `count, min, max, sum, last` (and the last value's
//! timestamp and seq, so that the latest sample wins whatever order merges come in). Minute
//! rows, hour rows and late samples all combine by the same [`Agg::merge`].
//!
//! Tables:
//! - `rollups.{1m|1h}.{device key}`: bucket start ms → the row's metrics ([`encode_row`])
//! - `rollup_frontier`: device key → frontier (ms)
//! - `rollup_late`: (device key, seq) of samples to merge
//! - `metric_ids`: metric name → the small id rows use

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::codec;
use super::series::{Agg, Bucket, Downsampler};
use super::{DEVICES, DeviceSamples, Store, StoreError, read_samples};

/// Rows as stores before a table per device and level kept them; moved on open.
const LEGACY_ROLLUPS: TableDefinition<(u32, u8, i64), &[u8]> = TableDefinition::new("rollups");

/// The name of device `key`'s rows of one level: bucket start (ms) → row. A table per device
/// and level, like the samples ([`super::DeviceSamples`]), so that new rows are appended at the
/// end of a tree and pack its leaves.
pub(crate) struct DeviceRollups(String);

impl DeviceRollups {
    pub fn of(key: u32, level: Level) -> Self {
        Self(format!("rollups.{}.{key}", level.name()))
    }

    pub fn def(&self) -> TableDefinition<'_, i64, &'static [u8]> {
        TableDefinition::new(&self.0)
    }
}

/// A device's rows of one level, open for writing.
type RowsTable<'t> = redb::Table<'t, i64, &'static [u8]>;

/// Device `key`'s rows of `level` in a read transaction; `None` while it has none.
pub(crate) fn read_rollups(
    txn: &redb::ReadTransaction,
    key: u32,
    level: Level,
) -> Result<Option<redb::ReadOnlyTable<i64, &'static [u8]>>, StoreError> {
    match txn.open_table(DeviceRollups::of(key, level).def()) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Moves the rows of a store written before [`DeviceRollups`] into them, then drops the old
/// table (in one transaction: rows are few beside samples).
fn move_legacy_rollups(db: &redb::Database) -> Result<(), StoreError> {
    if !super::table_exists(db, LEGACY_ROLLUPS)? {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let legacy = txn.open_table(LEGACY_ROLLUPS)?;
        let mut current: Option<((u32, u8), RowsTable<'_>)> = None;
        for row in legacy.iter()? {
            let (k, v) = row?;
            let (key, level, t) = k.value();
            let level = match level {
                1 => Level::Minute,
                2 => Level::Hour,
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "a rollup row has level {other}"
                    )));
                }
            };
            if current
                .as_ref()
                .is_none_or(|(c, _)| *c != (key, level as u8))
            {
                let name = DeviceRollups::of(key, level);
                current = Some(((key, level as u8), txn.open_table(name.def())?));
            }
            current
                .as_mut()
                .expect("opened above")
                .1
                .insert(t, v.value())?;
        }
    }
    txn.delete_table(LEGACY_ROLLUPS)?;
    txn.commit()?;
    Ok(())
}
pub(crate) const ROLLUP_LATE: TableDefinition<(u32, u64), ()> = TableDefinition::new("rollup_late");
pub(crate) const ROLLUP_FRONTIER: TableDefinition<u32, i64> =
    TableDefinition::new("rollup_frontier");
const METRIC_IDS: TableDefinition<&str, u32> = TableDefinition::new("metric_ids");

/// A minute is rolled up this long after it ends; samples later than that are merged one by one.
pub const SETTLE_MS: i64 = 30_000;
/// How often the pass runs.
pub const PERIOD: Duration = Duration::from_secs(5);
/// Samples rolled per write transaction: a few milliseconds of the writer's time.
const SAMPLES_PER_TXN: usize = 20_000;

/// A rollup resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    Minute = 1,
    Hour = 2,
}

impl Level {
    pub const ALL: [Level; 2] = [Level::Minute, Level::Hour];

    pub fn ms(self) -> i64 {
        match self {
            Level::Minute => 60_000,
            Level::Hour => 3_600_000,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Minute => "1m",
            Level::Hour => "1h",
        }
    }

    fn floor(self, t: i64) -> i64 {
        t.div_euclid(self.ms()) * self.ms()
    }
}

/// The frontiers and metric ids, in memory; the tables are the truth.
#[derive(Debug, Default)]
pub(crate) struct State {
    frontier: RwLock<HashMap<u32, i64>>,
    ids: RwLock<HashMap<String, u32>>,
    pass: std::sync::Mutex<()>,
}

/// Creates the tables and loads the state.
pub(crate) fn open(db: &redb::Database) -> Result<State, StoreError> {
    move_legacy_rollups(db)?;
    let txn = db.begin_write()?;
    let state = State::default();
    {
        txn.open_table(ROLLUP_LATE)?;
        let frontier = txn.open_table(ROLLUP_FRONTIER)?;
        let ids = txn.open_table(METRIC_IDS)?;
        let mut f = state.frontier.write().expect("rollup lock");
        for row in frontier.iter()? {
            let (k, v) = row?;
            f.insert(k.value(), v.value());
        }
        let mut m = state.ids.write().expect("rollup lock");
        for row in ids.iter()? {
            let (k, v) = row?;
            m.insert(k.value().to_string(), v.value());
        }
    }
    txn.commit()?;
    Ok(state)
}

impl Store {
    /// Every sample of device `key` timestamped before this is in the rollups.
    pub(crate) fn rollup_frontier(&self, key: u32) -> Option<i64> {
        self.inner
            .rollups
            .frontier
            .read()
            .expect("rollup lock")
            .get(&key)
            .copied()
    }
}

/// One row: metric id → summary.
type Row = BTreeMap<u32, Agg>;

/// How far a stored sum may be from the one added up: the noise of adding decimals in binary
/// (`30.1 + 30.2` is `60.300000000000004`), far under what a mean shows.
const SUM_TOLERANCE: f64 = 1e-12;

/// A row starts with these bytes; rows written before it are 56-byte records that start with
/// a metric id, never 0.
const ROW_MARK: [u8; 4] = [0; 4];
const OLD_RECORD: usize = 56;

// A record's flags.
const MAX_IS_MIN: u8 = 1;
const LAST_IS_MAX: u8 = 2;
const LAST_IS_MIN: u8 = 4;
const MAX_FROM_MIN: u8 = 8;
const LAST_FROM_MIN: u8 = 16;
const SUM_FROM_MIN: u8 = 32;
const OWN_LAST_AT: u8 = 64;

/// Writes `v` as its distance from `base` when that reads back as `v`, and says so.
fn put_from(out: &mut Vec<u8>, base: f64, v: f64, tolerance: f64) -> bool {
    let d = v - base;
    let back = base + d;
    if d.is_finite() && (back.to_bits() == v.to_bits()) {
        codec::put_f64_within(out, d, tolerance);
        return true;
    }
    codec::put_f64_within(out, v, tolerance);
    false
}

/// Writes `a`'s sum as its distance from `count × min` where that reads back within
/// [`SUM_TOLERANCE`] (and says so), else as itself, within the same.
fn put_sum(out: &mut Vec<u8>, a: &Agg) -> bool {
    let base = a.min * a.count as f64;
    let d = a.sum - base;
    if d.is_finite() && base.is_finite() {
        let mut bytes = Vec::with_capacity(10);
        // The distance may be off by the sum's tolerance, not its own.
        let tolerance = if d == 0.0 {
            0.0
        } else {
            (SUM_TOLERANCE * a.sum.abs() / d.abs()).min(SUM_TOLERANCE * 1e6)
        };
        codec::put_f64_within(&mut bytes, d, tolerance);
        let back = codec::Reader { bytes: &bytes }.f64().map(|d| base + d);
        if back.is_ok_and(|b| {
            b.to_bits() == a.sum.to_bits() || (b - a.sum).abs() <= a.sum.abs() * SUM_TOLERANCE
        }) {
            out.extend_from_slice(&bytes);
            return true;
        }
    }
    codec::put_f64_within(out, a.sum, SUM_TOLERANCE);
    false
}

/// Encodes a row: the latest `(timestamp, seq)` once, then per metric its id (as the step from
/// the last), count, flags and values, each as a decimal varint ([`codec::put_f64`]) and most
/// as the distance from the minimum. A minute of a server's 37 metrics takes about 400 bytes.
fn encode_row(bucket: i64, row: &Row) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + row.len() * 12);
    out.extend_from_slice(&ROW_MARK);
    let latest = row.values().map(|a| a.last_at).max().unwrap_or((bucket, 0));
    codec::put_varint(&mut out, codec::zigzag(latest.0.wrapping_sub(bucket)));
    codec::put_varint(&mut out, latest.1);
    codec::put_varint(&mut out, row.len() as u64);
    let mut prev = 0;
    for (id, a) in row {
        codec::put_varint(&mut out, u64::from(id.wrapping_sub(prev)));
        prev = *id;
        codec::put_varint(&mut out, a.count);
        let at = out.len();
        out.push(0);
        let mut flags = 0;
        codec::put_f64(&mut out, a.min);
        if a.max.to_bits() == a.min.to_bits() {
            flags |= MAX_IS_MIN;
        } else if put_from(&mut out, a.min, a.max, 0.0) {
            flags |= MAX_FROM_MIN;
        }
        if a.last.to_bits() == a.max.to_bits() {
            flags |= LAST_IS_MAX;
        } else if a.last.to_bits() == a.min.to_bits() {
            flags |= LAST_IS_MIN;
        } else if put_from(&mut out, a.min, a.last, 0.0) {
            flags |= LAST_FROM_MIN;
        }
        if put_sum(&mut out, a) {
            flags |= SUM_FROM_MIN;
        }
        if a.last_at != latest {
            flags |= OWN_LAST_AT;
            codec::put_varint(&mut out, codec::zigzag(a.last_at.0.wrapping_sub(bucket)));
            codec::put_varint(&mut out, a.last_at.1);
        }
        out[at] = flags;
    }
    out
}

/// Calls `each` on every record of a stored row until it returns `false`.
fn read_row(
    bucket: i64,
    bytes: &[u8],
    mut each: impl FnMut(u32, Agg) -> bool,
) -> Result<(), StoreError> {
    if bytes.get(..4) != Some(&ROW_MARK[..]) {
        if !bytes.len().is_multiple_of(OLD_RECORD) {
            return Err(StoreError::Corrupt("a rollup row has a torn record".into()));
        }
        for r in bytes.chunks_exact(OLD_RECORD) {
            let (id, agg) = old_record(r);
            if !each(id, agg) {
                break;
            }
        }
        return Ok(());
    }
    let mut r = codec::Reader { bytes: &bytes[4..] };
    let latest = (
        bucket.wrapping_add(codec::unzigzag(r.varint()?)),
        r.varint()?,
    );
    let n = r.varint()?;
    let mut id = 0u32;
    for _ in 0..n {
        id = id.wrapping_add(r.varint()? as u32);
        let count = r.varint()?;
        let flags = r.take(1)?[0];
        let min = r.f64()?;
        let max = if flags & MAX_IS_MIN != 0 {
            min
        } else if flags & MAX_FROM_MIN != 0 {
            min + r.f64()?
        } else {
            r.f64()?
        };
        let last = if flags & LAST_IS_MAX != 0 {
            max
        } else if flags & LAST_IS_MIN != 0 {
            min
        } else if flags & LAST_FROM_MIN != 0 {
            min + r.f64()?
        } else {
            r.f64()?
        };
        let sum = if flags & SUM_FROM_MIN != 0 {
            min * count as f64 + r.f64()?
        } else {
            r.f64()?
        };
        let last_at = if flags & OWN_LAST_AT != 0 {
            (
                bucket.wrapping_add(codec::unzigzag(r.varint()?)),
                r.varint()?,
            )
        } else {
            latest
        };
        let agg = Agg {
            count,
            min,
            max,
            sum,
            last,
            last_at,
        };
        if !each(id, agg) {
            return Ok(());
        }
    }
    if !r.bytes.is_empty() {
        return Err(StoreError::Corrupt(
            "a rollup row has bytes after its last record".into(),
        ));
    }
    Ok(())
}

fn decode_row(bucket: i64, bytes: &[u8]) -> Result<Row, StoreError> {
    let mut row = Row::new();
    read_row(bucket, bytes, |id, agg| {
        row.insert(id, agg);
        true
    })?;
    Ok(row)
}

/// The summary of metric `id` in a stored row, reading no further than it.
fn find(bucket: i64, bytes: &[u8], id: u32) -> Result<Option<Agg>, StoreError> {
    let mut found = None;
    read_row(bucket, bytes, |i, agg| {
        if i == id {
            found = Some(agg);
        }
        i < id
    })?;
    Ok(found)
}

fn old_record(r: &[u8]) -> (u32, Agg) {
    let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().expect("4 bytes"));
    let f64_at = |i: usize| f64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
    let i64_at = |i: usize| i64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
    (
        u32_at(0),
        Agg {
            count: u64::from(u32_at(4)),
            min: f64_at(8),
            max: f64_at(16),
            sum: f64_at(24),
            last: f64_at(32),
            last_at: (i64_at(40), i64_at(48) as u64),
        },
    )
}

/// Rows being built in one pass's transaction: per row, the summaries by metric id.
#[derive(Default)]
struct Pending {
    rows: HashMap<(u32, Level, i64), Vec<Option<Agg>>>,
    samples: usize,
}

impl Pending {
    fn add(&mut self, key: u32, seq: u64, t: i64, points: &[(u32, f64)]) {
        self.samples += 1;
        let top = points.iter().map(|(id, _)| *id as usize).max().unwrap_or(0);
        for level in Level::ALL {
            let row = self.rows.entry((key, level, level.floor(t))).or_default();
            if row.len() <= top {
                row.resize(top + 1, None);
            }
            for (id, v) in points {
                row[*id as usize]
                    .get_or_insert_with(Agg::default)
                    .push(t, seq, *v);
            }
        }
    }

    /// Merges the rows into their tables, a device and level at a time.
    fn write(self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut rows: Vec<_> = self.rows.into_iter().collect();
        rows.sort_unstable_by_key(|((key, level, t), _)| (*key, *level as u8, *t));
        let mut at = 0;
        while at < rows.len() {
            let (key, level, _) = rows[at].0;
            let name = DeviceRollups::of(key, level);
            let mut table = txn.open_table(name.def())?;
            while at < rows.len() && (rows[at].0.0, rows[at].0.1) == (key, level) {
                let (_, _, t) = rows[at].0;
                let mut merged = match table.get(t)? {
                    Some(v) => decode_row(t, v.value())?,
                    None => Row::new(),
                };
                for (id, a) in rows[at].1.iter().enumerate() {
                    if let Some(a) = a {
                        merged.entry(id as u32).or_default().merge(a);
                    }
                }
                table.insert(t, encode_row(t, &merged).as_slice())?;
                at += 1;
            }
        }
        Ok(())
    }
}

/// Reads stored samples' points as `(metric id, value)`: straight from the numbers of a
/// compact sample whose shape maps its points ([`super::codec::Shape::points`]), else from the whole
/// sample. Lives for one transaction, like the ids it hands out.
#[derive(Default)]
struct PointReader {
    by_shape: HashMap<u32, Option<Vec<(usize, u32)>>>,
    numbers: Vec<f64>,
    points: Vec<(u32, f64)>,
}

impl PointReader {
    fn read(
        &mut self,
        store: &Store,
        ids: &mut Ids<'_>,
        value: &[u8],
    ) -> Result<&[(u32, f64)], StoreError> {
        self.points.clear();
        if let Some((shape, numbers)) = store.inner.shapes.parts(value)? {
            let mapped = self.by_shape.entry(shape.id).or_insert_with(|| {
                shape.points().map(|m| {
                    m.points
                        .iter()
                        .map(|(i, name)| (*i, ids.id(name)))
                        .collect()
                })
            });
            if let (Some(mapped), Some(map)) = (mapped, shape.points()) {
                map.numbers(numbers, &mut self.numbers)?;
                self.points
                    .extend(mapped.iter().map(|(i, id)| (*id, self.numbers[*i])));
                return Ok(&self.points);
            }
        }
        let sample = store.decode(value)?;
        let points = &mut self.points;
        shoal_proto::metrics::for_each_point(&sample, |name, v| points.push((ids.id(name), v)));
        Ok(&self.points)
    }
}

/// Metric ids, assigned as new names appear, in the pass's transaction.
struct Ids<'a> {
    known: std::sync::RwLockWriteGuard<'a, HashMap<String, u32>>,
    new: Vec<(String, u32)>,
}

impl Ids<'_> {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.known.get(name) {
            return *id;
        }
        let id = self.known.len() as u32 + 1;
        self.known.insert(name.to_string(), id);
        self.new.push((name.to_string(), id));
        id
    }
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rolled {
    /// Samples rolled past the frontier.
    pub samples: u64,
    /// Late samples merged.
    pub late: u64,
}

/// One pass: merges the late samples, then rolls every device up to the last settled minute.
pub fn roll(store: &Store, now_ms: i64) -> Result<Rolled, StoreError> {
    // One pass at a time (the rollup task and retention both roll).
    let _one = store.inner.rollups.pass.lock().expect("rollup pass lock");
    let mut done = Rolled::default();
    done.late += merge_all_late(store)?;
    let settled = Level::Minute.floor(now_ms - SETTLE_MS);
    let keys: Vec<u32> = {
        let txn = store.db()?.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        devices
            .iter()?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?
    };
    let mut at = 0;
    while at < keys.len() {
        let (n, next) = roll_devices(store, &keys[at..], settled)?;
        done.samples += n;
        if next == 0 && n == 0 {
            break;
        }
        at += next;
    }
    // Marks the frontier has just passed.
    done.late += merge_all_late(store)?;
    Ok(done)
}

/// [`merge_late`] until a transaction finds less than its fill; returns how many it merged.
fn merge_all_late(store: &Store) -> Result<u64, StoreError> {
    let mut merged = 0;
    loop {
        let n = merge_late(store)?;
        merged += n;
        if n < SAMPLES_PER_TXN as u64 {
            return Ok(merged);
        }
    }
}

/// Merges up to [`SAMPLES_PER_TXN`] late samples in one transaction: those behind their device's
/// stored frontier (a mark ahead of it waits until the frontier passes; the frontier pass skips
/// marked samples, so each is counted once, here).
fn merge_late(store: &Store) -> Result<u64, StoreError> {
    let db = store.db()?;
    let txn = db.begin_write()?;
    let state = &store.inner.rollups;
    let mut ids = Ids {
        known: state.ids.write().expect("rollup lock"),
        new: Vec::new(),
    };
    let mut n = 0;
    {
        let mut late = txn.open_table(ROLLUP_LATE)?;
        let frontiers = txn.open_table(ROLLUP_FRONTIER)?;
        let marks: Vec<(u32, u64)> = late
            .iter()?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        let mut pending = Pending::default();
        let mut reader = PointReader::default();
        // Marks come in device order: one device's samples open at a time.
        let mut samples: Option<(u32, redb::Table<'_, u64, &'static [u8]>)> = None;
        for (key, seq) in &marks {
            if pending.samples >= SAMPLES_PER_TXN {
                break;
            }
            let frontier = frontiers.get(*key)?.map(|v| v.value());
            if samples.as_ref().is_none_or(|(k, _)| k != key) {
                samples = Some((*key, txn.open_table(DeviceSamples::of(*key).def())?));
            }
            let table = &samples.as_ref().expect("opened above").1;
            // Gone already when retention took it first: nothing to merge then.
            if let Some(v) = table.get(*seq)? {
                let t = store.timestamp_of(v.value())?;
                if frontier.is_none_or(|f| t >= f) {
                    continue;
                }
                let points = reader.read(store, &mut ids, v.value())?;
                pending.add(*key, *seq, t, points);
            }
            late.remove((*key, *seq))?;
            n += 1;
        }
        pending.write(&txn)?;
        save_ids(&txn, &ids.new)?;
    }
    let new = std::mem::take(&mut ids.new);
    drop(ids);
    if n == 0 {
        txn.abort()?;
        return Ok(0);
    }
    if let Err(e) = txn.commit() {
        forget_ids(store, &new);
        return Err(e.into());
    }
    Ok(n)
}

/// Devices one round of the frontier pass takes.
const DEVICES_PER_ROUND: usize = 1_000;

/// Rolls devices from the front of `keys` up to `settled`, stopping after about
/// [`SAMPLES_PER_TXN`] samples; returns the samples rolled and how many devices it finished.
///
/// The summing runs on a read snapshot, beside the writer; only merging the rows and moving the
/// frontiers takes a write transaction. To miss nothing committed after the snapshot, the
/// frontiers in memory move to `settled` first (so the writer marks anything behind them as
/// late) and an empty write transaction lets every writer transaction that read the old ones
/// finish before the snapshot is taken. Samples marked late are skipped here and merged by
/// [`merge_late`] once the stored frontier has passed them.
fn roll_devices(store: &Store, keys: &[u32], settled: i64) -> Result<(u64, usize), StoreError> {
    let db = store.db()?;
    let state = &store.inner.rollups;
    let chunk = &keys[..keys.len().min(DEVICES_PER_ROUND)];
    // Where each device's frontier goes: the settled minute, but not past the minute of its
    // newest sample while the device is sending (it sent since the settled minute began). A
    // device draining a backlog of old samples (a spool after an outage) then sends them ahead
    // of its frontier, to be rolled here in bulk, rather than behind it, where each would be
    // merged alone as late. Once it has gone quiet, its newest sample's minute is rolled too.
    let (stored, target): (Vec<Option<i64>>, Vec<i64>) = {
        let txn = db.begin_read()?;
        let frontiers = txn.open_table(ROLLUP_FRONTIER)?;
        let devices = txn.open_table(DEVICES)?;
        let mut stored = Vec::with_capacity(chunk.len());
        let mut target = Vec::with_capacity(chunk.len());
        for key in chunk {
            let old = frontiers.get(*key)?.map(|v| v.value());
            let newest = match read_samples(&txn, *key)? {
                Some(samples) => match samples.last()? {
                    Some((_, v)) => Some(store.timestamp_of(v.value())?),
                    None => None,
                },
                None => None,
            };
            let sending = match devices.get(*key)? {
                Some(v) => {
                    serde_json::from_slice::<crate::registry::DeviceRecord>(v.value())
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?
                        .last_seen_ms
                        >= settled
                }
                None => false,
            };
            let to = newest.map_or(settled, |t| {
                let minute = Level::Minute.floor(t);
                settled.min(if sending {
                    minute
                } else {
                    minute + Level::Minute.ms()
                })
            });
            stored.push(old);
            target.push(old.map_or(to, |o| o.max(to)));
        }
        (stored, target)
    };
    if stored
        .iter()
        .zip(&target)
        .all(|(f, to)| f.is_some_and(|f| f >= *to))
    {
        return Ok((0, chunk.len()));
    }
    {
        let mut f = state.frontier.write().expect("rollup lock");
        for ((key, old), to) in chunk.iter().zip(&stored).zip(&target) {
            if old.is_none_or(|o| o < *to) {
                f.insert(*key, *to);
            }
        }
    }
    let result = (|| {
        // A fence, not a change: nothing to make durable.
        let mut fence = db.begin_write()?;
        fence.set_durability(redb::Durability::None)?;
        fence.commit()?;
        let snapshot = db.begin_read()?;
        let late = snapshot.open_table(ROLLUP_LATE)?;
        let mut ids = Ids {
            known: state.ids.write().expect("rollup lock"),
            new: Vec::new(),
        };
        let mut pending = Pending::default();
        let mut reader = PointReader::default();
        let mut moved: HashMap<u32, i64> = HashMap::new();
        let mut devices = 0;
        for ((key, old), settled) in chunk.iter().zip(&stored).zip(target.iter().copied()) {
            if pending.samples >= SAMPLES_PER_TXN {
                break;
            }
            devices += 1;
            if old.is_some_and(|f| f >= settled) {
                continue;
            }
            let Some(samples) = read_samples(&snapshot, *key)? else {
                continue;
            };
            let from_seq = match old {
                Some(f) => store.first_seq_at_or_after(&samples, *f)?,
                None => 0,
            };
            let marked: std::collections::HashSet<u64> = late
                .range((*key, 0)..=(*key, u64::MAX))?
                .map(|r| r.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            // Up to the settled minute, or (with a long backlog) to a minute boundary after
            // about a transaction's worth: the frontier only ever passes whole minutes.
            let mut added = false;
            let mut cut_short = false;
            let mut to = settled;
            let mut last_minute = i64::MIN;
            for row in samples.range(from_seq..)? {
                let (k, v) = row?;
                let seq = k.value();
                let t = store.timestamp_of(v.value())?;
                if t >= settled {
                    break;
                }
                let minute = Level::Minute.floor(t);
                if added && pending.samples >= SAMPLES_PER_TXN && minute > last_minute {
                    to = minute;
                    cut_short = true;
                    break;
                }
                added = true;
                last_minute = minute;
                if !marked.contains(&seq) {
                    let points = reader.read(store, &mut ids, v.value())?;
                    pending.add(*key, seq, t, points);
                }
            }
            if added {
                moved.insert(*key, to);
            }
            if cut_short {
                // The next round goes on with this device.
                devices -= 1;
                break;
            }
        }
        drop((late, snapshot));
        let rolled = pending.samples as u64;
        let txn = db.begin_write()?;
        {
            pending.write(&txn)?;
            let mut frontiers = txn.open_table(ROLLUP_FRONTIER)?;
            for (key, to) in &moved {
                frontiers.insert(*key, *to)?;
            }
            save_ids(&txn, &ids.new)?;
        }
        let new = std::mem::take(&mut ids.new);
        drop(ids);
        if let Err(e) = txn.commit() {
            forget_ids(store, &new);
            return Err(StoreError::from(e));
        }
        Ok((rolled, devices, moved))
    })();
    // The frontiers in memory go back to what is stored.
    let mut f = state.frontier.write().expect("rollup lock");
    let moved = result.as_ref().map(|r| &r.2);
    for (key, old) in chunk.iter().zip(&stored) {
        match (moved.ok().and_then(|m| m.get(key)), old) {
            (Some(to), _) => f.insert(*key, *to),
            (None, Some(o)) => f.insert(*key, *o),
            (None, None) => f.remove(key),
        };
    }
    drop(f);
    let (rolled, devices, _) = result?;
    Ok((rolled, devices))
}

fn save_ids(txn: &redb::WriteTransaction, new: &[(String, u32)]) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(METRIC_IDS)?;
    for (name, id) in new {
        table.insert(name.as_str(), *id)?;
    }
    Ok(())
}

/// Ids handed out in a transaction that did not commit.
fn forget_ids(store: &Store, new: &[(String, u32)]) {
    let mut known = store.inner.rollups.ids.write().expect("rollup lock");
    for (name, _) in new {
        known.remove(name);
    }
}

/// Deletes rows older than `cut_ms` of `level`, up to `max`; returns how many.
pub(crate) fn trim(
    store: &Store,
    level: Level,
    cut_ms: i64,
    max: usize,
) -> Result<u64, StoreError> {
    // Only the devices with a row older than the cut take part in the write.
    let keys: Vec<u32> = {
        let txn = store.db()?.begin_read()?;
        let mut keys = Vec::new();
        for row in txn.open_table(DEVICES)?.iter()? {
            let key = row?.0.value();
            if let Some(rows) = read_rollups(&txn, key, level)?
                && rows.first()?.is_some_and(|(t, _)| t.value() < cut_ms)
            {
                keys.push(key);
            }
        }
        keys
    };
    if keys.is_empty() {
        return Ok(0);
    }
    let txn = store.db()?.begin_write()?;
    let mut n = 0u64;
    {
        for key in keys {
            let name = DeviceRollups::of(key, level);
            let mut rollups = txn.open_table(name.def())?;
            let doomed: Vec<i64> = rollups
                .range(..cut_ms)?
                .take(max - n as usize)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for t in &doomed {
                rollups.remove(*t)?;
            }
            n += doomed.len() as u64;
            if n as usize >= max {
                break;
            }
        }
    }
    if n == 0 {
        txn.abort()?;
    } else {
        txn.commit()?;
    }
    Ok(n)
}

/// Runs a pass every [`PERIOD`] until shutdown.
pub async fn run(store: Store, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let s = store.clone();
        let result = tokio::task::spawn_blocking(move || roll(&s, super::series::now_ms()))
            .await
            .expect("rollup task");
        if let Err(e) = result {
            tracing::warn!(error = %e, "rollup pass failed; will try again");
        }
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Where a series came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Raw,
    Rollup(Level),
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Rollup(l) => l.name(),
        }
    }
}

impl Store {
    /// One metric of device `key` in buckets of `step` over `[from_ms, to_ms)`. With a step and
    /// a start that are whole multiples of a rollup level, the buckets come from the coarsest
    /// such level up to the frontier, and from samples only after it (and for a part-bucket at
    /// the end): the same figures as from the samples, read from one row per bucket.
    pub fn series(
        &self,
        key: u32,
        metric: &str,
        mut down: Downsampler,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<(Vec<Bucket>, Source), StoreError> {
        let step = down.step_ms();
        let level = [Level::Hour, Level::Minute]
            .into_iter()
            .find(|l| step % l.ms() == 0 && from_ms.rem_euclid(l.ms()) == 0);
        let txn = self.db()?.begin_read()?;
        let mut raw_from = from_ms;
        let mut source = Source::Raw;
        if let Some(level) = level {
            let frontier = txn
                .open_table(ROLLUP_FRONTIER)?
                .get(key)?
                .map(|v| v.value());
            let id = txn.open_table(METRIC_IDS)?.get(metric)?.map(|v| v.value());
            if let (Some(frontier), Some(id)) = (frontier, id) {
                let end = level.floor(frontier.min(to_ms));
                if end > from_ms {
                    if let Some(rollups) = read_rollups(&txn, key, level)? {
                        for row in rollups.range(from_ms..end)? {
                            let (k, v) = row?;
                            let t = k.value();
                            if let Some(agg) = find(t, v.value(), id)? {
                                down.merge(t, &agg);
                            }
                        }
                    }
                    raw_from = end;
                    source = Source::Rollup(level);
                }
            }
        }
        let Some(samples) = read_samples(&txn, key)? else {
            return Ok((down.finish(), source));
        };
        let lo = self.first_seq_at_or_after(&samples, raw_from)?;
        for row in samples.range(lo..)? {
            let (k, v) = row?;
            let s = self.decode(v.value())?;
            if s.timestamp_ms >= to_ms {
                break;
            }
            if s.timestamp_ms >= raw_from
                && let Some(v) = shoal_proto::metrics::value_of(&s, metric)
            {
                down.push(s.timestamp_ms, k.value(), v);
            }
        }
        Ok((down.finish(), source))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shoal_proto::v1::{Cpu, DeviceHello, Disk, Memory, Sample};

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::writer::{Fleet, Row, Writer};

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn rows_read_back_as_written_and_take_a_few_bytes_a_metric() {
        let bucket = NOW - NOW % 60_000;
        let mut row = super::Row::new();
        let mut rng = 7u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // Percentages at one decimal, byte counters, millidegrees; 6 samples a minute.
        for id in 1..=37u32 {
            let mut a = Agg::default();
            for k in 0..6u64 {
                let v = match id % 3 {
                    0 => (next() % 1000) as f64 / 10.0,
                    1 => ((100u64 << 30) + next() % 100_000 * 4096) as f64,
                    _ => (40_000 + next() % 20_000) as f64 / 1000.0,
                };
                a.push(bucket + k as i64 * 10_000, 1000 + k, v);
            }
            row.insert(id * 2, a);
        }
        // Odd ones: a metric whose last sample came earlier, NaN-only, a constant, -0.
        let mut early = Agg::default();
        early.push(bucket + 5, 3, 1.0 / 3.0);
        row.insert(100, early);
        row.insert(101, Agg::default());
        let mut constant = Agg::default();
        for k in 0..6 {
            constant.push(bucket + k * 10_000, 1000 + k as u64, -0.0);
        }
        row.insert(102, constant);

        let bytes = encode_row(bucket, &row);
        let back = decode_row(bucket, &bytes).unwrap();
        assert_eq!(back.len(), row.len());
        for (id, a) in &row {
            let b = &back[id];
            let bits = |a: &Agg| {
                (
                    a.count,
                    a.min.to_bits(),
                    a.max.to_bits(),
                    a.last.to_bits(),
                    a.last_at,
                )
            };
            assert_eq!(bits(a), bits(b), "metric {id}");
            assert!(
                a.sum.to_bits() == b.sum.to_bits()
                    || (a.sum - b.sum).abs() <= a.sum.abs() * SUM_TOLERANCE,
                "metric {id}: {} vs {}",
                a.sum,
                b.sum
            );
            assert_eq!(
                find(bucket, &bytes, *id).unwrap().map(|f| f.last_at),
                Some(a.last_at)
            );
        }
        assert_eq!(find(bucket, &bytes, 3).unwrap(), None);
        // Random values over their whole range: data that moves like a walk takes less.
        assert!(
            bytes.len() < 40 * 24,
            "{} bytes for 40 metrics",
            bytes.len()
        );

        // Rows written before this form still read.
        let mut old = Vec::new();
        let a = &row[&2];
        old.extend_from_slice(&2u32.to_le_bytes());
        old.extend_from_slice(&(a.count as u32).to_le_bytes());
        for v in [a.min, a.max, a.sum, a.last] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        old.extend_from_slice(&a.last_at.0.to_le_bytes());
        old.extend_from_slice(&a.last_at.1.to_le_bytes());
        assert_eq!(decode_row(bucket, &old).unwrap()[&2], *a);
        // Damage is an error.
        for cut in 4..bytes.len() {
            assert!(decode_row(bucket, &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    fn sample(seq: u64, ts: i64) -> Sample {
        let x = (seq * 7919 % 1000) as f64 / 10.0;
        Sample {
            seq,
            timestamp_ms: ts,
            cpu: Some(Cpu {
                total_percent: x,
                core_percent: vec![x / 2.0, 100.0 - x],
            }),
            memory: Some(Memory {
                total_bytes: 8 << 30,
                used_bytes: (1 << 30) + seq * 4096,
                ..Default::default()
            }),
            disks: vec![Disk {
                mount_point: "/".into(),
                total_bytes: 64 << 30,
                used_bytes: (10 << 30) + seq,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn rows(samples: impl IntoIterator<Item = (u64, i64)>) -> Vec<Row> {
        samples
            .into_iter()
            .map(|(seq, ts)| Row::new(sample(seq, ts)))
            .collect()
    }

    async fn open(
        dir: &std::path::Path,
    ) -> (Store, Writer, Arc<Fleet>, std::thread::JoinHandle<()>) {
        let store = Store::open(dir).unwrap();
        let fleet = Arc::new(Fleet::from_loaded(&store).unwrap());
        let (writer, t) = Writer::start(store.clone(), fleet.clone(), Arc::new(Metrics::default()));
        (store, writer, fleet, t)
    }

    async fn hello(writer: &Writer, id: &str) {
        writer
            .hello(
                DeviceHello {
                    device_id: id.into(),
                    ..Default::default()
                },
                NOW,
            )
            .await
            .unwrap();
    }

    /// Every row, by brute force from the stored samples, against the table.
    fn check_against_samples(store: &Store, key: u32) -> usize {
        let mut expect: HashMap<(u8, i64, String), Agg> = HashMap::new();
        let frontier = store.rollup_frontier(key).unwrap();
        for s in store.samples_after(key, 0, usize::MAX).unwrap() {
            if s.timestamp_ms >= frontier {
                continue;
            }
            shoal_proto::metrics::for_each_point(&s, |name, v| {
                for level in Level::ALL {
                    expect
                        .entry((level as u8, level.floor(s.timestamp_ms), name.to_string()))
                        .or_default()
                        .push(s.timestamp_ms, s.seq, v);
                }
            });
        }
        let txn = store.db().unwrap().begin_read().unwrap();
        let names: HashMap<u32, String> = txn
            .open_table(METRIC_IDS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (v.value(), k.value().to_string())
            })
            .collect();
        let mut got: HashMap<(u8, i64, String), Agg> = HashMap::new();
        for level in Level::ALL {
            let Some(rows) = read_rollups(&txn, key, level).unwrap() else {
                continue;
            };
            for r in rows.iter().unwrap() {
                let (k, v) = r.unwrap();
                let t = k.value();
                for (id, agg) in decode_row(t, v.value()).unwrap() {
                    got.insert((level as u8, t, names[&id].clone()), agg);
                }
            }
        }
        assert_eq!(
            got.len(),
            expect.len(),
            "one summary per level, bucket and metric"
        );
        for (k, e) in &expect {
            let g = got.get(k).unwrap_or_else(|| panic!("no rollup for {k:?}"));
            assert_eq!(
                (g.count, g.min, g.max, g.last, g.last_at),
                (e.count, e.min, e.max, e.last, e.last_at),
                "{k:?}"
            );
            assert!(
                (g.sum - e.sum).abs() <= 1e-9 * e.sum.abs().max(1.0),
                "{k:?}"
            );
        }
        expect.len()
    }

    #[tokio::test]
    async fn rollups_match_a_brute_force_summary_with_resent_late_and_missing_samples() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, fleet, thread) = open(dir.path()).await;
        for d in ["a", "b"] {
            hello(&writer, d).await;
        }
        // "a": every 10 s for three hours up to now, seqs 300..=400 held back (an outage).
        let start = NOW - 3 * 3_600_000;
        let at = |seq: u64| start + seq as i64 * 10_000;
        let n = 3 * 360;
        writer
            .write(
                "a".into(),
                rows(
                    (1..=n)
                        .filter(|s| !(300..=400).contains(s))
                        .map(|s| (s, at(s))),
                ),
                NOW,
            )
            .await
            .unwrap();
        // "b": irregular, with samples on the minute and hour boundaries.
        let b: Vec<(u64, i64)> = [
            0, 59_999, 60_000, 3_599_999, 3_600_000, 3_600_001, 7_000_000,
        ]
        .iter()
        .enumerate()
        .map(|(i, off)| (i as u64 + 1, start + off))
        .collect();
        writer
            .write("b".into(), rows(b.clone()), NOW)
            .await
            .unwrap();
        let first = roll(&store, NOW).unwrap();
        // The settled minute is NOW - 1 min: "a" up to seq 1,073; "b", which has just sent, up
        // to the minute of its newest sample (all but that one).
        assert_eq!(first.samples, (1_073 - 101) + 6);
        let ka = fleet.get("a").unwrap().key;
        let kb = fleet.get("b").unwrap().key;
        check_against_samples(&store, ka);
        check_against_samples(&store, kb);

        // Resent samples are duplicates: nothing changes.
        writer
            .write("a".into(), rows((1..=50).map(|s| (s, at(s)))), NOW)
            .await
            .unwrap();
        // The outage's samples arrive late, behind the frontier, with one resent twice.
        writer
            .write("a".into(), rows((300..=400).map(|s| (s, at(s)))), NOW)
            .await
            .unwrap();
        writer
            .write("a".into(), rows([(350, at(350))]), NOW)
            .await
            .unwrap();
        let second = roll(&store, NOW + 60_000).unwrap();
        assert_eq!(second.late, 101, "each late sample merged once");
        let summaries = check_against_samples(&store, ka);
        assert!(summaries > 180 * 5, "{summaries}");
        check_against_samples(&store, kb);

        // Restarted, the state is the tables': a new pass changes nothing.
        drop((writer, store));
        thread.join().unwrap();
        let (store, _writer, _, _) = open(dir.path()).await;
        assert_eq!(roll(&store, NOW + 60_000).unwrap(), Rolled::default());
        check_against_samples(&store, ka);
    }

    #[tokio::test]
    async fn a_backlog_drained_in_order_is_rolled_in_bulk_not_as_late_samples() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, fleet, _thread) = open(dir.path()).await;
        hello(&writer, "a").await;
        // A spool of two hours, 10 s apart, sent in batches with passes in between.
        let start = NOW - 3 * 3_600_000;
        let at = |s: u64| start + s as i64 * 10_000;
        let mut late = 0;
        for batch in 0..8u64 {
            writer
                .write(
                    "a".into(),
                    rows((batch * 90 + 1..=batch * 90 + 90).map(|s| (s, at(s)))),
                    NOW,
                )
                .await
                .unwrap();
            late += roll(&store, NOW).unwrap().late;
        }
        assert_eq!(late, 0, "nothing drained in order is late");
        let key = fleet.get("a").unwrap().key;
        // Everything but the newest sample's minute is rolled, while the device sends.
        assert_eq!(
            store.rollup_frontier(key),
            Some(Level::Minute.floor(at(720)))
        );
        check_against_samples(&store, key);
        // Gone quiet (nothing since the settled minute began), that minute is rolled too.
        assert_eq!(roll(&store, NOW + 2 * 60_000).unwrap().samples, 1);
        assert_eq!(
            store.rollup_frontier(key),
            Some(Level::Minute.floor(at(720)) + 60_000)
        );
        check_against_samples(&store, key);
    }

    #[tokio::test]
    async fn a_quiet_devices_last_minute_is_rolled() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, fleet, _thread) = open(dir.path()).await;
        hello(&writer, "q").await;
        let start = NOW - 4 * 3_600_000 + 30_000;
        writer
            .write(
                "q".into(),
                rows((1..=3).map(|s| (s, start + s as i64 * 1_000))),
                NOW,
            )
            .await
            .unwrap();
        let key = fleet.get("q").unwrap().key;
        assert_eq!(roll(&store, NOW + 5_000).unwrap().samples, 0);
        assert_eq!(roll(&store, NOW + 200_000).unwrap().samples, 3);
        assert_eq!(
            store.rollup_frontier(key),
            Some(Level::Minute.floor(start) + 60_000)
        );
    }

    #[tokio::test]
    async fn rows_in_the_one_table_of_older_stores_are_moved_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let key = {
            let (store, writer, fleet, thread) = open(dir.path()).await;
            hello(&writer, "a").await;
            let start = NOW - 3 * 3_600_000;
            writer
                .write(
                    "a".into(),
                    rows((1..=3 * 360).map(|s| (s, start + s as i64 * 10_000))),
                    NOW,
                )
                .await
                .unwrap();
            roll(&store, NOW).unwrap();
            let key = fleet.get("a").unwrap().key;
            drop((store, writer));
            thread.join().unwrap();
            key
        };
        {
            let db = redb::Database::create(dir.path().join("shoal.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut legacy = txn.open_table(LEGACY_ROLLUPS).unwrap();
                for level in Level::ALL {
                    let name = DeviceRollups::of(key, level);
                    let table = txn.open_table(name.def()).unwrap();
                    for r in table.iter().unwrap() {
                        let (t, v) = r.unwrap();
                        legacy
                            .insert((key, level as u8, t.value()), v.value())
                            .unwrap();
                    }
                    drop(table);
                    txn.delete_table(name.def()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let (store, _writer, _fleet, _thread) = open(dir.path()).await;
        assert!(check_against_samples(&store, key) > 3 * 60);
        let txn = store.db().unwrap().begin_read().unwrap();
        assert!(matches!(
            txn.open_table(LEGACY_ROLLUPS),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }

    #[tokio::test]
    async fn series_from_rollups_equal_series_from_samples() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, fleet, _thread) = open(dir.path()).await;
        hello(&writer, "a").await;
        let start = NOW - 5 * 3_600_000;
        writer
            .write(
                "a".into(),
                rows((1..=5 * 360).map(|s| (s, start + s as i64 * 10_000 - 3))),
                NOW,
            )
            .await
            .unwrap();
        roll(&store, NOW - 40 * 60_000).unwrap();
        let key = fleet.get("a").unwrap().key;
        let from = Level::Hour.floor(start);
        for (step, level) in [
            (3_600_000, Source::Rollup(Level::Hour)),
            (2 * 3_600_000, Source::Rollup(Level::Hour)),
            (300_000, Source::Rollup(Level::Minute)),
            (90_000, Source::Raw),
        ] {
            for metric in [
                "cpu_percent",
                "disk_used_bytes{mount=\"/\"}",
                "memory_used_bytes",
            ] {
                let step_d = Duration::from_millis(step as u64);
                let (got, source) = store
                    .series(
                        key,
                        metric,
                        Downsampler::new(from, NOW, step_d).unwrap(),
                        from,
                        NOW,
                    )
                    .unwrap();
                assert_eq!(source, level, "step {step}");
                let mut raw = Downsampler::new(from, NOW, step_d).unwrap();
                store
                    .scan_time_range(key, from, NOW, |s| {
                        if let Some(v) = shoal_proto::metrics::value_of(s, metric) {
                            raw.push(s.timestamp_ms, s.seq, v);
                        }
                    })
                    .unwrap();
                let want = raw.finish();
                assert_eq!(got.len(), want.len(), "{metric} step {step}");
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(
                        (g.t, g.count, g.min, g.max, g.last),
                        (w.t, w.count, w.min, w.max, w.last),
                        "{metric} step {step}"
                    );
                    assert!((g.avg - w.avg).abs() <= 1e-9 * w.avg.abs().max(1.0));
                }
            }
        }
        // A start that is not on a whole minute reads the samples.
        let (_, source) = store
            .series(
                key,
                "cpu_percent",
                Downsampler::new(from + 1, NOW, Duration::from_secs(3600)).unwrap(),
                from + 1,
                NOW,
            )
            .unwrap();
        assert_eq!(source, Source::Raw);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_running_beside_the_writer_count_every_sample_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, fleet, _thread) = open(dir.path()).await;
        hello(&writer, "c").await;
        let start = NOW - 3_600_000;
        let at = |seq: u64| start + seq as i64 * 1_000;
        // Odd seqs first, in order; even seqs later, as gap fills, while passes run.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let roller = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut passes = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    roll(&store, NOW).unwrap();
                    passes += 1;
                }
                passes
            })
        };
        for chunk in (1..=3_000u64).collect::<Vec<_>>().chunks(50) {
            let odd = chunk.iter().filter(|s| *s % 2 == 1).map(|s| (*s, at(*s)));
            writer.write("c".into(), rows(odd), NOW).await.unwrap();
        }
        for chunk in (1..=3_000u64).collect::<Vec<_>>().chunks(50) {
            let even = chunk.iter().filter(|s| *s % 2 == 0).map(|s| (*s, at(*s)));
            writer.write("c".into(), rows(even), NOW).await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(roller.join().unwrap() > 1);
        roll(&store, NOW).unwrap();
        let key = fleet.get("c").unwrap().key;
        check_against_samples(&store, key);
    }
}
