//! The outbox: what the hub has stored, in commit order, for the sinks that forward it (Kafka,
//! Elasticsearch; see `crate::platform`).
//!
//! The writer appends one entry per newly stored sample (a reference to it, not a copy) and one
//! per device event, in the same transaction that stores them, so an entry exists exactly when
//! what it names is durable. Offsets rise by one per entry and are never reused. Each sink keeps
//! a durable cursor (the last offset it delivered); entries every configured sink has passed are
//! trimmed in small steps.
//!
//! Tables:
//! - `outbox`: offset → entry (tag, commit time, then a sample's `(device key, seq)` or an
//!   encoded `shoal.v1.DeviceEvent`)
//! - `sink_cursors`: sink name → last delivered offset

use std::collections::HashMap;

use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use shoal_proto::v1::{DeviceEvent, Sample};

use super::{DEVICES, Store, StoreError, read_samples};
use crate::registry::DeviceRecord;

pub(crate) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const SINK_CURSORS: TableDefinition<&str, u64> = TableDefinition::new("sink_cursors");

const TAG_SAMPLE: u8 = 1;
const TAG_EVENT: u8 = 2;

/// An outbox entry as the writer appends it.
pub(crate) enum Append<'a> {
    Sample { key: u32, seq: u64 },
    Event(&'a DeviceEvent),
}

/// Encodes an entry: tag, commit time (ms, little-endian), body.
pub(crate) fn encode(entry: &Append<'_>, committed_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(21);
    match entry {
        Append::Sample { key, seq } => {
            out.push(TAG_SAMPLE);
            out.extend_from_slice(&committed_ms.to_le_bytes());
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
        }
        Append::Event(e) => {
            out.push(TAG_EVENT);
            out.extend_from_slice(&committed_ms.to_le_bytes());
            e.encode(&mut out).expect("a Vec grows");
        }
    }
    out
}

/// The `(device key, seq)` an encoded entry names, when it names a sample.
pub(crate) fn sample_ref(entry: &[u8]) -> Option<(u32, u64)> {
    if entry.first() != Some(&TAG_SAMPLE) || entry.len() != 21 {
        return None;
    }
    let key = u32::from_le_bytes(entry[9..13].try_into().ok()?);
    let seq = u64::from_le_bytes(entry[13..21].try_into().ok()?);
    Some((key, seq))
}

/// What an entry carries, resolved for delivery.
#[derive(Debug, Clone)]
pub enum Item {
    Sample {
        device_id: String,
        sample: Sample,
        labels: std::collections::BTreeMap<String, String>,
    },
    Event(DeviceEvent),
}

/// One outbox entry, resolved.
#[derive(Debug, Clone)]
pub struct Entry {
    pub offset: u64,
    /// When the hub committed it (hub clock, ms).
    pub committed_ms: i64,
    pub item: Item,
}

impl Entry {
    pub fn device_id(&self) -> &str {
        match &self.item {
            Item::Sample { device_id, .. } => device_id,
            Item::Event(e) => &e.device_id,
        }
    }
}

/// The outbox's extent: the first and last offset it holds (`None` when empty), and the last
/// offset ever written (0 when none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxBounds {
    pub first: Option<u64>,
    pub last_written: u64,
}

fn corrupt(offset: u64) -> StoreError {
    StoreError::Corrupt(format!("outbox entry {offset} is malformed"))
}

impl Store {
    /// Creates the outbox tables if they do not exist yet.
    pub(crate) fn create_outbox(&self) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        txn.open_table(OUTBOX)?;
        txn.open_table(SINK_CURSORS)?;
        txn.commit()?;
        Ok(())
    }

    /// The outbox's extent. The last offset ever written survives trimming: the writer keeps it
    /// in the `sink_cursors` table under an empty name.
    pub fn outbox_bounds(&self) -> Result<OutboxBounds, StoreError> {
        let txn = self.db()?.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let cursors = txn.open_table(SINK_CURSORS)?;
        let first = outbox.first()?.map(|(k, _)| k.value());
        let last = outbox.last()?.map_or(0, |(k, _)| k.value());
        let kept = cursors.get(LAST_WRITTEN)?.map_or(0, |v| v.value());
        Ok(OutboxBounds {
            first,
            last_written: last.max(kept),
        })
    }

    /// Up to `limit` entries after `cursor`, in offset order, with their samples read from the
    /// same snapshot.
    pub fn outbox_after(&self, cursor: u64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let mut tables: HashMap<u32, Option<redb::ReadOnlyTable<u64, &'static [u8]>>> =
            HashMap::new();
        let devices = txn.open_table(DEVICES)?;
        let mut known: HashMap<u32, (String, std::collections::BTreeMap<String, String>)> =
            HashMap::new();
        let mut out = Vec::new();
        for row in outbox.range(cursor.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            let offset = k.value();
            let bytes = v.value();
            if bytes.len() < 9 {
                return Err(corrupt(offset));
            }
            let committed_ms = i64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes"));
            let body = &bytes[9..];
            let item = match bytes[0] {
                TAG_SAMPLE if body.len() == 12 => {
                    let key = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
                    let seq = u64::from_le_bytes(body[4..].try_into().expect("8 bytes"));
                    let samples = match tables.entry(key) {
                        std::collections::hash_map::Entry::Occupied(t) => t.into_mut(),
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            slot.insert(read_samples(&txn, key)?)
                        }
                    };
                    let stored = match samples {
                        Some(t) => t.get(seq)?,
                        None => None,
                    };
                    let Some(stored) = stored else {
                        return Err(StoreError::Corrupt(format!(
                            "outbox entry {offset} names a sample that is not stored"
                        )));
                    };
                    let sample = self.decode(stored.value())?;
                    if let std::collections::hash_map::Entry::Vacant(slot) = known.entry(key) {
                        let record: DeviceRecord = match devices.get(key)? {
                            Some(v) => serde_json::from_slice(v.value())
                                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                            None => return Err(corrupt(offset)),
                        };
                        slot.insert((record.device_id, record.labels));
                    }
                    let (device_id, labels) = known[&key].clone();
                    Item::Sample {
                        device_id,
                        sample,
                        labels,
                    }
                }
                TAG_EVENT => Item::Event(
                    DeviceEvent::decode(body).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                ),
                _ => return Err(corrupt(offset)),
            };
            out.push(Entry {
                offset,
                committed_ms,
                item,
            });
        }
        Ok(out)
    }

    /// The commit time of the first entry after `cursor`, if there is one.
    pub fn outbox_oldest_after(&self, cursor: u64) -> Result<Option<i64>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let first = outbox
            .range(cursor.saturating_add(1)..)?
            .next()
            .transpose()?;
        Ok(first.and_then(|(_, v)| {
            v.value()
                .get(1..9)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        }))
    }

    /// The last offset sink `name` delivered, if it ever delivered one.
    pub fn sink_cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let cursors = txn.open_table(SINK_CURSORS)?;
        Ok(cursors.get(name)?.map(|v| v.value()))
    }

    /// Records durably that sink `name` delivered everything up to `offset`.
    pub fn set_sink_cursor(&self, name: &str, offset: u64) -> Result<(), StoreError> {
        debug_assert!(!name.is_empty());
        let txn = self.db()?.begin_write()?;
        txn.open_table(SINK_CURSORS)?.insert(name, offset)?;
        txn.commit()?;
        Ok(())
    }

    /// Deletes up to `max` entries at or below `up_to`; returns how many it deleted.
    pub fn trim_outbox(&self, up_to: u64, max: usize) -> Result<usize, StoreError> {
        let txn = self.db()?.begin_write()?;
        let n;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let last = outbox.last()?.map(|(k, _)| k.value());
            let mut cursors = txn.open_table(SINK_CURSORS)?;
            // Keep the highest offset ever written before its entry may go.
            if let Some(last) = last
                && last <= up_to
            {
                cursors.insert(LAST_WRITTEN, last)?;
            }
            let keys: Vec<u64> = outbox
                .range(..=up_to)?
                .take(max)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            n = keys.len();
            for k in keys {
                outbox.remove(k)?;
            }
        }
        txn.commit()?;
        Ok(n)
    }
}

/// Where the highest offset ever written is kept once its entry is trimmed.
const LAST_WRITTEN: &str = "";

/// The offset after the last one ever written, read in the writer's transaction.
pub(crate) fn next_offset(txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let outbox = txn.open_table(OUTBOX)?;
    let cursors = txn.open_table(SINK_CURSORS)?;
    let last = outbox.last()?.map_or(0, |(k, _)| k.value());
    let kept = cursors.get(LAST_WRITTEN)?.map_or(0, |v| v.value());
    Ok(last.max(kept) + 1)
}
