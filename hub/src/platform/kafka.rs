//! The Kafka sink: every stored sample and device event to one topic, keyed by device id.
//!
//! - The partition is chosen here, with Kafka's own default partitioner (murmur2 of the key),
//!   so a device's messages all go to one partition, in order, and other producers that key by
//!   device id agree with the hub.
//! - The producer is idempotent with `acks=all`: librdkafka's retries after a lost connection
//!   neither duplicate nor reorder within a partition.
//! - Each message carries headers: `shoal.kind` (`sample`/`event`), `shoal.hub` (this hub's
//!   id), `shoal.offset` (its outbox offset) and `content-type`; its timestamp is when the hub
//!   committed it. After a failure, and at start, [`KafkaSink::prepare`] reads every partition
//!   back from the first message at or after the oldest undelivered entry's commit time (less
//!   a minute) to find the last offset this hub delivered there, and [`KafkaSink::deliver`]
//!   skips what is already in: a retry or a restart does not write a message twice. With
//!   `enable.gapless.guarantee`, what is in a partition is always a prefix of what was sent
//!   to it.
//! - A message Kafka refuses for good (too large for the topic) goes to the dead-letter file
//!   `DATA_DIR/sinks/NAME.dead-letter.jsonl` and is counted; it never blocks the others.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use shoal_proto::v1::device_event;

use super::{BoxFuture, Delivered, Format, Sink, SinkError, SinkSpec};
use crate::store::outbox::{Entry, Item};

pub const CONTENT_TYPE_SAMPLE: &str = "application/x-protobuf; messageType=shoal.v1.Sample";
pub const CONTENT_TYPE_EVENT: &str = "application/x-protobuf; messageType=shoal.v1.DeviceEvent";
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// librdkafka's logs and errors through the hub's log, each kind at most once a minute (a broker
/// that is down makes librdkafka report every failed reconnect), and consumer-group rebalances.
pub struct Quiet {
    limiter: crate::metrics::LogLimiter,
}

impl Default for Quiet {
    fn default() -> Self {
        Self {
            limiter: crate::metrics::LogLimiter::new(Duration::from_secs(60)),
        }
    }
}

impl rdkafka::ClientContext for Quiet {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            // Settings the hub chose on purpose (enable.gapless.guarantee is "experimental").
            _ if fac == "CONFWARN" => {
                tracing::debug!(target: "shoal_hub::platform::kafka", "kafka client: {message}")
            }
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
                if self.limiter.allow(&format!("log:{fac}")) {
                    tracing::warn!(target: "shoal_hub::platform::kafka", facility = fac, "kafka client: {message}");
                }
            }
            _ => {
                tracing::debug!(target: "shoal_hub::platform::kafka", facility = fac, "kafka client: {message}")
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if self.limiter.allow(&format!("error:{error}")) {
            tracing::warn!(target: "shoal_hub::platform::kafka", "kafka client: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        use rdkafka::consumer::Rebalance;
        let list = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| format!("{}/{}", e.topic(), e.partition()))
                .collect::<Vec<_>>()
                .join(",")
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %list(tpl), "consumer mode: partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = %list(tpl), "consumer mode: partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer mode: rebalance failed"),
        }
    }
}

pub struct KafkaSink {
    name: String,
    dead_letter: std::path::PathBuf,
    brokers: String,
    topic: String,
    format: Format,
    hub: String,
    timeout: Duration,
    producer: Option<FutureProducer<Quiet>>,
    partitions: i32,
    /// Per partition, the last outbox offset found there at the last [`Sink::prepare`].
    delivered: HashMap<i32, u64>,
}

impl KafkaSink {
    pub fn new(spec: &SinkSpec, hub: &str, data_dir: &std::path::Path) -> Result<Self, String> {
        Ok(Self {
            name: spec.name.clone(),
            dead_letter: super::dead_letter_path(data_dir, &spec.name),
            brokers: spec.endpoint.clone(),
            topic: spec.target.clone(),
            format: spec.format,
            hub: hub.to_string(),
            timeout: spec.timeout,
            producer: None,
            partitions: 0,
            delivered: HashMap::new(),
        })
    }

    fn producer(&self) -> Result<FutureProducer<Quiet>, SinkError> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("enable.gapless.guarantee", "true")
            .set("acks", "all")
            // As large as the hub's own largest accepted message; the topic's own limit
            // (max.message.bytes) still applies, and what it refuses is dead-lettered.
            .set("message.max.bytes", "16777216")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                self.timeout.as_millis().max(1_000).to_string(),
            )
            .set("socket.timeout.ms", "10000")
            .create_with_context(Quiet::default())
            .map_err(|e| SinkError::new(format!("kafka://{}: {e}", self.brokers)))
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), on which its default partitioner rests.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition Kafka's default partitioner gives `key` among `partitions`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// An entry's value and content type in `format`.
pub fn encode(entry: &Entry, format: Format) -> (Vec<u8>, &'static str) {
    match (format, &entry.item) {
        (Format::Protobuf, Item::Sample { sample, .. }) => {
            (sample.encode_to_vec(), CONTENT_TYPE_SAMPLE)
        }
        (Format::Protobuf, Item::Event(e)) => (e.encode_to_vec(), CONTENT_TYPE_EVENT),
        (
            Format::Json,
            Item::Sample {
                device_id, sample, ..
            },
        ) => (
            serde_json::to_vec(&json!({
                "kind": "sample",
                "device_id": device_id,
                "hub_committed_ms": entry.committed_ms,
                "sample": sample,
            }))
            .expect("JSON"),
            CONTENT_TYPE_JSON,
        ),
        (Format::Json, Item::Event(e)) => {
            let (kind, body) = match &e.event {
                Some(device_event::Event::Hello(h)) => ("hello", json!(h)),
                Some(device_event::Event::Status(s)) => ("status", json!(s)),
                Some(device_event::Event::Enrolled(x)) => ("enrolled", json!(x)),
                None => ("unknown", json!(null)),
            };
            (
                serde_json::to_vec(&json!({
                    "kind": "event",
                    "device_id": e.device_id,
                    "timestamp_ms": e.timestamp_ms,
                    "event": kind,
                    kind: body,
                }))
                .expect("JSON"),
                CONTENT_TYPE_JSON,
            )
        }
    }
}

/// Errors no retry can fix: the message is too large for the producer or the topic.
fn refused_for_good(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidRecord)
    )
}

fn dead_letter(entry: &Entry, e: &rdkafka::error::KafkaError) -> serde_json::Value {
    let seq = match &entry.item {
        Item::Sample { sample, .. } => Some(sample.seq),
        Item::Event(_) => None,
    };
    json!({
        "offset": entry.offset,
        "device_id": entry.device_id(),
        "kind": kind_of(entry),
        "seq": seq,
        "error": e.to_string(),
    })
}

fn kind_of(entry: &Entry) -> &'static str {
    match entry.item {
        Item::Sample { .. } => "sample",
        Item::Event(_) => "event",
    }
}

impl Sink for KafkaSink {
    fn prepare(&mut self, resume_ms: Option<i64>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            // A fresh producer: the old one's queue and in-flight requests are purged with it
            // (librdkafka waits up to 500 ms for that), so nothing it held lands after the
            // read-back below, unless a request already on the wire is applied late.
            if let Some(old) = self.producer.take() {
                let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            }
            let producer = self.producer()?;
            let (brokers, topic, hub) =
                (self.brokers.clone(), self.topic.clone(), self.hub.clone());
            let (partitions, delivered) = tokio::task::spawn_blocking(move || {
                let partitions = partitions_of(&brokers, &topic)?;
                let delivered = match resume_ms {
                    Some(ms) => find_delivered(&brokers, &topic, partitions, &hub, ms)?,
                    None => HashMap::new(),
                };
                Ok::<_, SinkError>((partitions, delivered))
            })
            .await
            .expect("kafka metadata")?;
            if self.partitions != 0 && self.partitions != partitions {
                tracing::warn!(
                    sink = %self.name,
                    from = self.partitions,
                    to = partitions,
                    "the topic's partition count changed: devices move to other partitions; entries in flight may be sent twice"
                );
            }
            // With another partition count devices sit elsewhere: what was read back says
            // nothing about them (sending again may duplicate; skipping could lose).
            let changed = self.partitions != 0 && self.partitions != partitions;
            self.partitions = partitions;
            self.delivered = if changed { HashMap::new() } else { delivered };
            self.producer = Some(producer);
            Ok(())
        })
    }

    fn deliver<'a>(
        &'a mut self,
        batch: &'a [Entry],
    ) -> BoxFuture<'a, Result<Delivered, SinkError>> {
        Box::pin(async move {
            let producer = self
                .producer
                .as_ref()
                .ok_or_else(|| SinkError::new("the Kafka producer is not ready"))?;
            let mut out = Delivered::default();
            let mut pending = Vec::with_capacity(batch.len());
            let mut dead = Vec::new();
            let mut failed = None;
            for entry in batch {
                let key = entry.device_id().as_bytes();
                let partition = partition_for(key, self.partitions);
                if self
                    .delivered
                    .get(&partition)
                    .is_some_and(|&d| entry.offset <= d)
                {
                    out.already += 1;
                    continue;
                }
                let (value, content_type) = encode(entry, self.format);
                let offset = entry.offset.to_string();
                let headers = OwnedHeaders::new_with_capacity(4)
                    .insert(Header {
                        key: "shoal.kind",
                        value: Some(kind_of(entry)),
                    })
                    .insert(Header {
                        key: "shoal.hub",
                        value: Some(self.hub.as_str()),
                    })
                    .insert(Header {
                        key: "shoal.offset",
                        value: Some(offset.as_str()),
                    })
                    .insert(Header {
                        key: "content-type",
                        value: Some(content_type),
                    });
                let mut record = FutureRecord::to(&self.topic)
                    .key(key)
                    .payload(&value)
                    .partition(partition)
                    .headers(headers)
                    .timestamp(entry.committed_ms);
                // A full local queue: wait for what is in flight, then try again.
                loop {
                    match producer.send_result(record) {
                        Ok(f) => {
                            pending.push((entry, f));
                            break;
                        }
                        Err((
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull,
                            ),
                            r,
                        )) => {
                            record = r;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) if refused_for_good(&e) => {
                            dead.push(dead_letter(entry, &e));
                            break;
                        }
                        Err((e, _)) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                if failed.is_some() {
                    break;
                }
            }
            // Every send is waited for, even after a failure: nothing of this batch may land
            // after the read-back that the next attempt starts with.
            let mut first_error = failed;
            for (entry, f) in pending {
                match f.await {
                    Ok(Ok(_)) => out.sent += 1,
                    Ok(Err((e, _))) if refused_for_good(&e) => dead.push(dead_letter(entry, &e)),
                    Ok(Err((e, _))) => {
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                    Err(_) => {
                        first_error.get_or_insert_with(|| "the producer was dropped".into());
                    }
                }
            }
            if !dead.is_empty() {
                out.dead = dead.len() as u64;
                let path = self.dead_letter.clone();
                let n = dead.len();
                tokio::task::spawn_blocking(move || super::append_dead_letters(&path, &dead))
                    .await
                    .expect("dead-letter write")?;
                tracing::warn!(sink = %self.name, messages = n, file = %self.dead_letter.display(), "messages refused for good; written to the dead-letter file");
            }
            match first_error {
                None => Ok(out),
                Some(e) => Err(SinkError::new(format!(
                    "kafka://{}/{}: {e}",
                    self.brokers, self.topic
                ))),
            }
        })
    }
}

fn consumer(brokers: &str) -> Result<BaseConsumer<Quiet>, SinkError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "shoal-sink-readback")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create_with_context(Quiet::default())
        .map_err(|e| SinkError::new(format!("kafka://{brokers}: {e}")))
}

/// How many partitions `topic` has; a clear error when it does not exist.
pub(crate) fn partitions_of(brokers: &str, topic: &str) -> Result<i32, SinkError> {
    let c = consumer(brokers)?;
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| {
            SinkError::new(format!(
                "kafka://{brokers}: cannot reach the brokers or read their metadata: {e}"
            ))
        })?;
    let t = md.topics().iter().find(|t| t.name() == topic);
    match t {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as i32)
        }
        _ => Err(SinkError::new(format!(
            "kafka://{brokers}: topic {topic:?} does not exist; create it first (e.g. kafka-topics.sh --create --topic {topic} --partitions 12)"
        ))),
    }
}

/// Per partition, the highest outbox offset of a message this hub wrote there since
/// `resume_ms` (less a minute, for clocks and batching), read back from the first message at or
/// after that time (or, when the broker cannot look up offsets by time, the last 10,000).
fn find_delivered(
    brokers: &str,
    topic: &str,
    partitions: i32,
    hub: &str,
    resume_ms: i64,
) -> Result<HashMap<i32, u64>, SinkError> {
    let c = consumer(brokers)?;
    let err = |e: rdkafka::error::KafkaError| {
        SinkError::new(format!("kafka://{brokers}/{topic}: reading back: {e}"))
    };
    let mut by_time = TopicPartitionList::new();
    for p in 0..partitions {
        by_time
            .add_partition_offset(topic, p, Offset::Offset(resume_ms - 60_000))
            .map_err(err)?;
    }
    let starts = c
        .offsets_for_times(by_time, Duration::from_secs(10))
        .map_err(|e| tracing::debug!(error = %e, "offsets by time unavailable; reading back the last 10,000 messages"))
        .ok();
    let mut out = HashMap::new();
    for p in 0..partitions {
        let (low, high) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(err)?;
        let start = match starts
            .as_ref()
            .and_then(|t| t.find_partition(topic, p))
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => o.max(low),
            // No message at or after that time.
            Some(Offset::End) => high,
            _ => (high - 10_000).max(low),
        };
        if start >= high {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(start))
            .map_err(err)?;
        c.assign(&tpl).map_err(err)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if std::time::Instant::now() > deadline {
                return Err(SinkError::new(format!(
                    "kafka://{brokers}/{topic}: reading back partition {p} timed out"
                )));
            }
            match c.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    if let Some(o) = ours(&m, hub) {
                        let slot = out.entry(p).or_insert(o);
                        *slot = (*slot).max(o);
                    }
                    if m.offset() + 1 >= high {
                        break;
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(err(e)),
                None => {}
            }
        }
    }
    Ok(out)
}

/// The outbox offset of a message this hub wrote.
fn ours<M: Message>(m: &M, hub: &str) -> Option<u64> {
    let headers = m.headers()?;
    let mut from_us = false;
    let mut offset = None;
    for h in headers.iter() {
        match (h.key, h.value) {
            ("shoal.hub", Some(v)) => from_us = v == hub.as_bytes(),
            ("shoal.offset", Some(v)) => {
                offset = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
            }
            _ => {}
        }
    }
    if from_us { offset } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_partitioner() {
        // Values from the Java client's Utils.murmur2 (and its DefaultPartitioner tests).
        assert_eq!(murmur2(b"21") as i32, -973_932_308);
        assert_eq!(murmur2(b"foobar") as i32, -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985_981_536);
        assert_eq!(
            murmur2(b"a-little-bit-longer-string") as i32,
            -1_486_304_829
        );
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58_897_971
        );
        assert_eq!(murmur2(b"abc") as i32, 479_470_107);
        for key in ["pi-1", "jetson-07", "x"] {
            let p = partition_for(key.as_bytes(), 12);
            assert!((0..12).contains(&p));
        }
    }
}
