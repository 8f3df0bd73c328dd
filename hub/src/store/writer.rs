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

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use redb::ReadableTable;
use shoal_proto::v1::DeviceHello;
use tokio::sync::{mpsc, oneshot};

use super::{DEVICE_KEYS, DEVICES, SAMPLES, Store, StoreError};
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

/// One validated sample ready to store.
#[derive(Debug)]
pub struct Row {
    pub seq: u64,
    pub points: u32,
    pub bytes: Vec<u8>,
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
}

/// Handle to the writer thread; cheap to clone. The thread ends when every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
}

impl Writer {
    pub fn start(
        store: Store,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4096);
        let handle = std::thread::Builder::new()
            .name("shoal-store-writer".into())
            .spawn(move || write_loop(store, fleet, metrics, rx))
            .expect("spawn writer thread");
        (Self { tx }, handle)
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

fn closed() -> StoreError {
    StoreError::Db("the store writer has stopped".into())
}

fn write_loop(store: Store, fleet: Arc<Fleet>, metrics: Arc<Metrics>, mut rx: mpsc::Receiver<Op>) {
    let mut next_key = fleet.all().iter().map(|d| d.key).max().unwrap_or(0) + 1;
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let key_before = next_key;
        match apply(&store, &fleet, &ops, &mut next_key) {
            Ok(applied) => {
                metrics.observe_commit(started.elapsed(), ops.len());
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
                tracing::error!(error = %e, ops = ops.len(), "store commit failed; nothing of it is acknowledged");
                metrics.commit_failures.inc();
                for op in ops {
                    match op {
                        Op::Hello { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Db(e.to_string())));
                        }
                        Op::Batch { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Db(e.to_string())));
                        }
                    }
                }
            }
        }
    }
}

enum OpResult {
    Hello(u64),
    Batch(BatchOutcome),
    UnknownDevice(String),
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
) -> Result<Applied, StoreError> {
    let txn = store.db().begin_write()?;
    // Devices touched by this group, as they will be after the commit.
    let mut touched: HashMap<String, DeviceState> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    {
        let mut keys = txn.open_table(DEVICE_KEYS)?;
        let mut devices = txn.open_table(DEVICES)?;
        let mut samples = txn.open_table(SAMPLES)?;
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
                            }
                        }
                    };
                    let mut state = state;
                    state.record.apply_hello(hello, *now_ms);
                    let json = serde_json::to_vec(&state.record).expect("record serialises");
                    devices.insert(state.key, json.as_slice())?;
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
                    for row in rows {
                        let new =
                            row.seq > state.max_seq || samples.get((state.key, row.seq))?.is_none();
                        if new {
                            samples.insert((state.key, row.seq), row.bytes.as_slice())?;
                            state.max_seq = state.max_seq.max(row.seq);
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
            }
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
    use prost::Message;
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
        Row {
            seq,
            points: 1,
            bytes: s.encode_to_vec(),
        }
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
