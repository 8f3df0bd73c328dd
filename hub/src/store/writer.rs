//! The single store writer: group commit and deduplication.
//!
//! Every ingest stream hands its validated batch to this thread and waits. The thread takes
//! whatever has queued up, applies it in one redb transaction, commits (fsync) and only then
//! answers each waiter, so an acknowledgement always means "durably stored". Under load one
//! commit carries many batches, which is what makes ingest fast; when idle a batch commits
//! alone, which keeps latency low.
//!
//! Dedup is on `(device, seq)`: a seq above the device's highest stored one is new without a
//! lookup; anything at or below it is looked up, inside the same transaction.
//!
//! With sinks configured the writer also appends to the [outbox](super::outbox), in the same
//! transaction: one entry per newly stored sample and one per device event (a hello, or events
//! other modules record through [`Writer::events`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use redb::ReadableTable;
use shoal_proto::v1::{DeviceEvent, DeviceHello, Sample, device_event};
use tokio::sync::{mpsc, oneshot, watch};

use super::health::{self, WriteState};
use super::outbox::{self, Append, OUTBOX};
use super::readings::Readings;
use super::{DEVICE_KEYS, DEVICES, DeviceSamples, SHAPES, Store, StoreError};
use super::{codec, retention, rollup};
use crate::metrics::Metrics;
use crate::registry::DeviceRecord;

/// Most queued operations folded into one transaction.
const MAX_GROUP: usize = 2048;

/// The in-memory view of the registry, updated only after commits.
#[derive(Default)]
pub struct Fleet {
    devices: RwLock<HashMap<String, DeviceState>>,
}

#[derive(Debug, Clone)]
pub struct DeviceState {
    pub key: u32,
    pub record: DeviceRecord,
    pub max_seq: u64,
    /// Its newest sample in brief; `None` until one is stored.
    pub latest: Option<Arc<Readings>>,
}

impl Fleet {
    pub fn from_loaded(store: &Store) -> Result<Self, StoreError> {
        let devices = store
            .load_devices()?
            .into_iter()
            .map(|d| {
                (
                    d.record.device_id.clone(),
                    DeviceState {
                        key: d.key,
                        record: d.record,
                        max_seq: d.max_seq,
                        latest: d.latest.map(Arc::new),
                    },
                )
            })
            .collect();
        Ok(Self {
            devices: RwLock::new(devices),
        })
    }

    pub fn get(&self, device_id: &str) -> Option<DeviceState> {
        self.devices
            .read()
            .expect("fleet lock")
            .get(device_id)
            .cloned()
    }

    pub fn all(&self) -> Vec<DeviceState> {
        let mut v: Vec<_> = self
            .devices
            .read()
            .expect("fleet lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.record.device_id.cmp(&b.record.device_id));
        v
    }

    pub fn len(&self) -> usize {
        self.devices.read().expect("fleet lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One validated sample ready to store, already split into its shape and numbers
/// ([`codec`]) so that the writer thread only looks up the shape.
#[derive(Debug)]
pub struct Row {
    pub seq: u64,
    /// The sample's own timestamp (epoch ms).
    pub timestamp_ms: i64,
    pub points: u32,
    split: codec::Split,
    /// The sample in brief, for the newest row of a batch only.
    pub readings: Option<Box<Readings>>,
}

impl Row {
    pub fn new(sample: Sample) -> Self {
        Self {
            seq: sample.seq,
            timestamp_ms: sample.timestamp_ms,
            points: shoal_proto::metrics::point_count(&sample) as u32,
            split: codec::split(sample),
            readings: None,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub accepted: u32,
    pub duplicates: u32,
    /// Metric points in the accepted samples.
    pub points: u64,
}

enum Op {
    Hello {
        hello: Box<DeviceHello>,
        now_ms: i64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Batch {
        device_id: String,
        rows: Vec<Row>,
        now_ms: i64,
        reply: oneshot::Sender<Result<BatchOutcome, StoreError>>,
    },
    Events {
        events: Vec<DeviceEvent>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Re-checks whether the store takes writes (free space, a reopen after a failed commit)
    /// with an empty commit, so that readiness recovers without waiting for traffic.
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Op {
    fn refuse(self, e: &StoreError) {
        let err = || match e {
            StoreError::Refused(m) => StoreError::Refused(m.clone()),
            StoreError::Db(m) => StoreError::Db(m.clone()),
            other => StoreError::Db(other.to_string()),
        };
        match self {
            Op::Hello { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Op::Batch { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Op::Events { reply, .. } | Op::Probe { reply } => {
                let _ = reply.send(Err(err()));
            }
        }
    }
}

/// Handle to the writer thread; cheap to clone. The thread ends when every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
    committed: watch::Receiver<u64>,
}

impl Writer {
    /// Starts the writer without an outbox (no sinks).
    pub fn start(
        store: Store,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
    ) -> (Self, std::thread::JoinHandle<()>) {
        Self::start_with(store, fleet, metrics, false).expect("no outbox to open")
    }

    /// Starts the writer; with `outbox` it also appends every stored sample and device event to
    /// the outbox the sinks read.
    pub fn start_with(
        store: Store,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
        outbox: bool,
    ) -> Result<(Self, std::thread::JoinHandle<()>), StoreError> {
        let next = if outbox {
            store.create_outbox()?;
            let txn = store.db()?.begin_write()?;
            let next = outbox::next_offset(&txn)?;
            txn.abort()?;
            Some(next)
        } else {
            None
        };
        let (committed_tx, committed) = watch::channel(next.map_or(0, |n| n - 1));
        let (tx, rx) = mpsc::channel(4096);
        let handle = std::thread::Builder::new()
            .name("shoal-store-writer".into())
            .spawn(move || write_loop(store, fleet, metrics, rx, next, committed_tx))
            .expect("spawn writer thread");
        Ok((Self { tx, committed }, handle))
    }

    /// The last outbox offset committed (0 when none), changing with every commit that adds to
    /// the outbox.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Records device events in the outbox (nothing without sinks); resolves once committed.
    pub async fn events(&self, events: Vec<DeviceEvent>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Events { events, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Checks whether the store takes writes now (reopening it after a failed commit once
    /// writing works again), with an empty commit; the outcome is in [`Store::health`].
    pub async fn probe(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Probe { reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Registers or updates a device; returns the highest seq stored for it.
    pub async fn hello(&self, hello: DeviceHello, now_ms: i64) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Hello {
                hello: Box::new(hello),
                now_ms,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Stores the rows of a known device; resolves once they are durably committed.
    pub async fn write(
        &self,
        device_id: String,
        rows: Vec<Row>,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Batch {
                device_id,
                rows,
                now_ms,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

/// Probes the store every second while it refuses writes, or while the disk is under the
/// watermark, so that readiness recovers (and the state shows the disk filling) without
/// waiting for the next batch.
pub async fn watch_health(writer: Writer, store: Store, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(health::RETRY_AFTER);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let min_free = store.health().min_free_bytes();
        let low = min_free > 0 && health::free_bytes(store.dir()).is_ok_and(|free| free < min_free);
        if low || !store.health().state().is_writable() {
            let _ = writer.probe().await;
        }
    }
}

fn closed() -> StoreError {
    StoreError::Db("the store writer has stopped".into())
}

fn write_loop(
    store: Store,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Op>,
    mut next_offset: Option<u64>,
    committed: watch::Sender<u64>,
) {
    let mut next_key = fleet.all().iter().map(|d| d.key).max().unwrap_or(0) + 1;
    let mut gate = Gate::default();
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        if let Err(e) = gate.check(&store, &metrics) {
            for op in ops {
                op.refuse(&e);
            }
            continue;
        }
        let started = Instant::now();
        let key_before = next_key;
        let offset_before = next_offset;
        match apply(&store, &fleet, &ops, &mut next_key, &mut next_offset) {
            Ok(applied) => {
                metrics.observe_commit(started.elapsed(), ops.len());
                if !store.health().state().is_writable() {
                    store.health().set(WriteState::Writable);
                }
                if let Some(next) = next_offset
                    && Some(next) != offset_before
                {
                    committed.send_replace(next - 1);
                }
                // Publish to readers only what is committed.
                {
                    let mut devices = fleet.devices.write().expect("fleet lock");
                    for state in applied.devices {
                        devices.insert(state.record.device_id.clone(), state);
                    }
                }
                for (op, result) in ops.into_iter().zip(applied.results) {
                    match (op, result) {
                        (Op::Hello { reply, .. }, OpResult::Hello(max)) => {
                            let _ = reply.send(Ok(max));
                        }
                        (Op::Batch { reply, .. }, OpResult::Batch(outcome)) => {
                            let _ = reply.send(Ok(outcome));
                        }
                        (Op::Events { reply, .. } | Op::Probe { reply }, OpResult::Done) => {
                            let _ = reply.send(Ok(()));
                        }
                        (Op::Batch { reply, .. }, OpResult::UnknownDevice(id)) => {
                            let _ = reply.send(Err(StoreError::Db(format!(
                                "device {id} sent a batch before its hello"
                            ))));
                        }
                        _ => unreachable!("results follow ops"),
                    }
                }
            }
            Err(e) => {
                next_key = key_before;
                next_offset = offset_before;
                tracing::error!(error = %e, ops = ops.len(), "store commit failed; nothing of it is acknowledged");
                metrics.commit_failures.inc();
                // redb refuses every later transaction of this handle after an I/O error:
                // the gate reopens the store before the next commit.
                store.health().set(WriteState::Failed {
                    error: e.to_string(),
                });
                for op in ops {
                    op.refuse(&e);
                }
            }
        }
    }
}

enum OpResult {
    Hello(u64),
    Batch(BatchOutcome),
    /// Events recorded, or a probe's empty commit done.
    Done,
    UnknownDevice(String),
}

/// Decides, before each commit, whether the store may be written: free space above the
/// watermark, and a store that is not latched by a failed commit (reopened here, at most once
/// a second, when it is).
#[derive(Default)]
struct Gate {
    last_reopen: Option<Instant>,
    statvfs_warned: bool,
}

impl Gate {
    fn check(&mut self, store: &Store, metrics: &Metrics) -> Result<(), StoreError> {
        let health = store.health();
        let min_free = health.min_free_bytes();
        if min_free > 0 {
            match health::free_bytes(store.dir()) {
                Ok(free) if free < min_free => {
                    health.set(WriteState::Full {
                        free_bytes: free,
                        min_free_bytes: min_free,
                    });
                    metrics.store_refusals[0].inc();
                    return Err(StoreError::Refused(
                        health.state().reason().unwrap_or_default(),
                    ));
                }
                Ok(_) => {}
                Err(e) if !self.statvfs_warned => {
                    self.statvfs_warned = true;
                    tracing::warn!(error = %e, "cannot read the data directory's free space; the low-disk watermark is not enforced");
                }
                Err(_) => {}
            }
        }
        match health.state() {
            WriteState::Writable => return Ok(()),
            WriteState::Full { .. } => {}
            WriteState::Failed { error } => {
                if self
                    .last_reopen
                    .is_some_and(|t| t.elapsed() < health::RETRY_AFTER)
                {
                    metrics.store_refusals[1].inc();
                    return Err(StoreError::Refused(format!(
                        "the store's last commit failed ({error}); it is reopened as soon as writing works again"
                    )));
                }
                self.last_reopen = Some(Instant::now());
                metrics.store_reopens.inc();
                if let Err(e) = store.reopen() {
                    health.set(WriteState::Failed {
                        error: e.to_string(),
                    });
                    metrics.store_refusals[1].inc();
                    return Err(StoreError::Refused(format!(
                        "the store cannot be reopened yet: {e}"
                    )));
                }
                // Writable again once a commit on the new handle succeeds.
                return Ok(());
            }
        }
        health.set(WriteState::Writable);
        Ok(())
    }
}

struct Applied {
    results: Vec<OpResult>,
    devices: Vec<DeviceState>,
}

fn apply(
    store: &Store,
    fleet: &Fleet,
    ops: &[Op],
    next_key: &mut u32,
    next_offset: &mut Option<u64>,
) -> Result<Applied, StoreError> {
    let mut first_new_shape = None;
    let applied = apply_txn(
        store,
        fleet,
        ops,
        next_key,
        next_offset,
        &mut first_new_shape,
    );
    if applied.is_err()
        && let Some(id) = first_new_shape
    {
        store.inner.shapes.forget_from(id);
    }
    applied
}

fn apply_txn(
    store: &Store,
    fleet: &Fleet,
    ops: &[Op],
    next_key: &mut u32,
    next_offset: &mut Option<u64>,
    first_new_shape: &mut Option<u32>,
) -> Result<Applied, StoreError> {
    let txn = store.db()?.begin_write()?;
    let committed_ms = ops
        .iter()
        .map(|op| match op {
            Op::Hello { now_ms, .. } | Op::Batch { now_ms, .. } => *now_ms,
            Op::Events { .. } | Op::Probe { .. } => 0,
        })
        .max()
        .unwrap_or(0)
        .max(super::series::now_ms());
    // Devices touched by this group, as they will be after the commit.
    let mut touched: HashMap<String, DeviceState> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    {
        let mut keys = txn.open_table(DEVICE_KEYS)?;
        let mut devices = txn.open_table(DEVICES)?;
        let mut shapes = txn.open_table(SHAPES)?;
        let (mut added_bytes, mut added) = (0u64, 0u64);
        let mut late = txn.open_table(rollup::ROLLUP_LATE)?;
        let mut log = match next_offset {
            Some(_) => Some(txn.open_table(OUTBOX)?),
            None => None,
        };
        let mut append = |entry: Append<'_>| -> Result<(), StoreError> {
            if let (Some(log), Some(next)) = (log.as_mut(), next_offset.as_mut()) {
                log.insert(*next, outbox::encode(&entry, committed_ms).as_slice())?;
                *next += 1;
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Hello { hello, now_ms, .. } => {
                    let state = match touched
                        .remove(&hello.device_id)
                        .or_else(|| fleet.get(&hello.device_id))
                    {
                        Some(s) => s,
                        None => {
                            let key = *next_key;
                            *next_key += 1;
                            keys.insert(hello.device_id.as_str(), key)?;
                            DeviceState {
                                key,
                                record: DeviceRecord::default(),
                                max_seq: 0,
                                latest: None,
                            }
                        }
                    };
                    let mut state = state;
                    state.record.apply_hello(hello, *now_ms);
                    let json = serde_json::to_vec(&state.record).expect("record serialises");
                    devices.insert(state.key, json.as_slice())?;
                    append(Append::Event(&DeviceEvent {
                        device_id: hello.device_id.clone(),
                        timestamp_ms: *now_ms,
                        event: Some(device_event::Event::Hello((**hello).clone())),
                    }))?;
                    results.push(OpResult::Hello(state.max_seq));
                    touched.insert(hello.device_id.clone(), state);
                }
                Op::Batch {
                    device_id,
                    rows,
                    now_ms,
                    ..
                } => {
                    let Some(mut state) =
                        touched.remove(device_id).or_else(|| fleet.get(device_id))
                    else {
                        results.push(OpResult::UnknownDevice(device_id.clone()));
                        continue;
                    };
                    let mut outcome = BatchOutcome::default();
                    // Samples behind the rollups' frontier are merged by the next pass.
                    let frontier = store.rollup_frontier(state.key);
                    let name = DeviceSamples::of(state.key);
                    let mut samples = txn.open_table(name.def())?;
                    for row in rows {
                        let new = row.seq > state.max_seq || samples.get(row.seq)?.is_none();
                        if new {
                            let (shape, fresh) = store.inner.shapes.id(&row.split.shape);
                            if fresh {
                                first_new_shape.get_or_insert(shape);
                                shapes.insert(shape, row.split.shape.as_slice())?;
                            }
                            let value = codec::value(shape, &row.split.numbers);
                            samples.insert(row.seq, value.as_slice())?;
                            if frontier.is_some_and(|f| row.timestamp_ms < f) {
                                late.insert((state.key, row.seq), ())?;
                            }
                            added_bytes += retention::row_bytes(value.len());
                            added += 1;
                            append(Append::Sample {
                                key: state.key,
                                seq: row.seq,
                            })?;
                            state.max_seq = state.max_seq.max(row.seq);
                            if let Some(r) =
                                row.readings.as_ref().filter(|_| row.seq == state.max_seq)
                            {
                                state.latest = Some(Arc::new((**r).clone()));
                            }
                            outcome.accepted += 1;
                            outcome.points += u64::from(row.points);
                        } else {
                            outcome.duplicates += 1;
                        }
                    }
                    state.record.last_seen_ms = state.record.last_seen_ms.max(*now_ms);
                    let json = serde_json::to_vec(&state.record).expect("record serialises");
                    devices.insert(state.key, json.as_slice())?;
                    results.push(OpResult::Batch(outcome));
                    touched.insert(device_id.clone(), state);
                }
                Op::Events { events, .. } => {
                    for e in events {
                        append(Append::Event(e))?;
                    }
                    results.push(OpResult::Done);
                }
                Op::Probe { .. } => results.push(OpResult::Done),
            }
        }
        if added > 0 {
            let mut meta = txn.open_table(retention::META)?;
            let b = meta.get(retention::SAMPLE_BYTES)?.map_or(0, |v| v.value());
            let c = meta.get(retention::SAMPLE_COUNT)?.map_or(0, |v| v.value());
            meta.insert(retention::SAMPLE_BYTES, b + added_bytes)?;
            meta.insert(retention::SAMPLE_COUNT, c + added)?;
        }
    }
    txn.commit()?;
    Ok(Applied {
        results,
        devices: touched.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use shoal_proto::v1::{Cpu, Sample};

    use super::*;

    fn row(seq: u64, ts: i64, cpu: f64) -> Row {
        let s = Sample {
            seq,
            timestamp_ms: ts,
            cpu: Some(Cpu {
                total_percent: cpu,
                core_percent: vec![],
            }),
            ..Default::default()
        };
        Row::new(s)
    }

    fn hello(id: &str) -> DeviceHello {
        DeviceHello {
            device_id: id.into(),
            arch: "aarch64".into(),
            ..Default::default()
        }
    }

    fn start(dir: &std::path::Path) -> (Store, Arc<Fleet>, Writer, std::thread::JoinHandle<()>) {
        let store = Store::open(dir).unwrap();
        let fleet = Arc::new(Fleet::from_loaded(&store).unwrap());
        let (writer, thread) =
            Writer::start(store.clone(), fleet.clone(), Arc::new(Metrics::default()));
        (store, fleet, writer, thread)
    }

    #[tokio::test]
    async fn dedups_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_store, fleet, writer, thread) = start(dir.path());
            assert_eq!(writer.hello(hello("d1"), 1_000).await.unwrap(), 0);
            let o = writer
                .write(
                    "d1".into(),
                    (1..=5).map(|s| row(s, 1_000 + s as i64, 1.0)).collect(),
                    2_000,
                )
                .await
                .unwrap();
            assert_eq!((o.accepted, o.duplicates, o.points), (5, 0, 5));
            let o = writer
                .write(
                    "d1".into(),
                    (3..=8).map(|s| row(s, 1_000 + s as i64, 1.0)).collect(),
                    3_000,
                )
                .await
                .unwrap();
            assert_eq!((o.accepted, o.duplicates), (3, 3));
            // A gap filled later is new, not a duplicate.
            writer
                .write("d1".into(), vec![row(20, 1_020, 1.0)], 3_000)
                .await
                .unwrap();
            let o = writer
                .write(
                    "d1".into(),
                    vec![row(15, 1_015, 1.0), row(20, 1_020, 1.0)],
                    3_000,
                )
                .await
                .unwrap();
            assert_eq!((o.accepted, o.duplicates), (1, 1));
            let d = fleet.get("d1").unwrap();
            assert_eq!(
                (d.max_seq, d.record.first_seen_ms, d.record.last_seen_ms),
                (20, 1_000, 3_000)
            );
            let err = writer
                .write("ghost".into(), vec![row(1, 1, 1.0)], 1)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("before its hello"));
            drop(writer);
            thread.join().unwrap();
        }
        let (store, fleet, writer, _thread) = start(dir.path());
        let d = fleet.get("d1").unwrap();
        assert_eq!(d.max_seq, 20);
        assert_eq!(d.record.arch, "aarch64");
        assert_eq!(
            writer.hello(hello("d1"), 9_000).await.unwrap(),
            20,
            "the welcome carries the stored seq"
        );
        let seqs: Vec<u64> = store
            .samples_after(d.key, 0, 100)
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6, 7, 8, 15, 20]);
        let o = writer
            .write("d1".into(), vec![row(7, 1, 1.0)], 9_000)
            .await
            .unwrap();
        assert_eq!(o.duplicates, 1, "dedup holds across a restart");
    }

    #[tokio::test]
    async fn the_outbox_lists_what_was_stored_in_commit_order_and_survives_trimming() {
        use crate::store::outbox::Item;
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let store = Store::open(dir.path()).unwrap();
            let fleet = Arc::new(Fleet::from_loaded(&store).unwrap());
            let (writer, thread) =
                Writer::start_with(store.clone(), fleet, Arc::new(Metrics::default()), true)
                    .unwrap();
            (store, writer, thread)
        };
        let (store, writer, thread) = open();
        writer.hello(hello("a"), 1).await.unwrap();
        writer
            .write(
                "a".into(),
                (1..=3).map(|s| row(s, s as i64, 1.0)).collect(),
                2,
            )
            .await
            .unwrap();
        // Duplicates add nothing; an event goes in between.
        writer
            .write(
                "a".into(),
                (2..=4).map(|s| row(s, s as i64, 1.0)).collect(),
                3,
            )
            .await
            .unwrap();
        assert_eq!(*writer.committed().borrow(), 5);
        let entries = store.outbox_after(0, 100).unwrap();
        let seqs: Vec<String> = entries
            .iter()
            .map(|e| match &e.item {
                Item::Sample {
                    sample, device_id, ..
                } => format!("{device_id}:{}", sample.seq),
                Item::Event(ev) => format!("event:{}", ev.device_id),
            })
            .collect();
        assert_eq!(seqs, ["event:a", "a:1", "a:2", "a:3", "a:4"]);
        assert_eq!(
            entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(store.outbox_after(3, 1).unwrap()[0].offset, 4);
        store.set_sink_cursor("k", 5).unwrap();
        assert_eq!(store.sink_cursor("k").unwrap(), Some(5));
        assert_eq!(store.trim_outbox(5, 100).unwrap(), 5);
        drop((writer, store));
        thread.join().unwrap();
        // Offsets are never reused, even after the outbox was trimmed empty.
        let (store, writer, _thread) = open();
        assert_eq!(*writer.committed().borrow(), 5);
        writer
            .write("a".into(), vec![row(9, 9, 1.0)], 4)
            .await
            .unwrap();
        let entries = store.outbox_after(5, 10).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].offset, 6);
        assert_eq!(store.outbox_bounds().unwrap().first, Some(6));
    }

    #[tokio::test]
    async fn time_range_scan_finds_the_start_by_binary_search() {
        let dir = tempfile::tempdir().unwrap();
        let (store, fleet, writer, _thread) = start(dir.path());
        writer.hello(hello("d"), 0).await.unwrap();
        writer.hello(hello("other"), 0).await.unwrap();
        // 1,000 samples one second apart, with a gap in seqs.
        let rows: Vec<Row> = (1..=1_000u64)
            .filter(|s| !(400..500).contains(s))
            .map(|s| row(s, s as i64 * 1_000, s as f64))
            .collect();
        writer.write("d".into(), rows, 1).await.unwrap();
        writer
            .write("other".into(), vec![row(1, 450_000, -1.0)], 1)
            .await
            .unwrap();
        let key = fleet.get("d").unwrap().key;
        let mut seen = Vec::new();
        store
            .scan_time_range(key, 450_000, 510_500, |s| seen.push(s.seq))
            .unwrap();
        assert_eq!(seen, (500..=510).collect::<Vec<_>>());
        seen.clear();
        store
            .scan_time_range(key, 0, 3_500, |s| seen.push(s.seq))
            .unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        seen.clear();
        store
            .scan_time_range(key, 2_000_000, 3_000_000, |s| seen.push(s.seq))
            .unwrap();
        assert!(seen.is_empty());
        assert_eq!(store.latest(key).unwrap().unwrap().seq, 1_000);
    }
}
