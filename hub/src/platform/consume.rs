//! Consumer mode: `shoal serve --ingest-from kafka://HOST:PORT/TOPIC?group=NAME`.
//!
//! The hub reads a topic written by Kafka sinks (or any producer that follows the same
//! contract: key = device id, value = a protobuf `shoal.v1.Sample` or `shoal.v1.DeviceEvent`,
//! header `shoal.kind`), as one member of a consumer group: hubs in the group split the
//! partitions, and a hub that stops hands its partitions to the others.
//!
//! Every message goes through the same ingest path as gRPC and MQTT (validation, dedup on
//! `(device, seq)`, group commit), and the group's offsets are committed only after the store
//! has committed what they cover. A hub that dies before committing leaves those messages to
//! the next owner of the partition; dedup keeps each store free of duplicates, and the sinks'
//! idempotence (`_id` in Elasticsearch) keeps the platform downstream free of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use shoal_proto::v1::{DeviceEvent, DeviceHello, Sample, device_event};
use tokio::sync::watch;

use super::{backoff, valid_topic};
use crate::ingest::Ingestor;
use crate::store::writer::Fleet;

/// The consumer group hubs join unless the URL says `group=NAME`.
pub const DEFAULT_GROUP: &str = "shoal-hubs";
/// Most messages taken in one round (one store commit for all of them).
const ROUND: usize = 2_000;

/// `--ingest-from`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestFrom {
    pub brokers: String,
    pub topic: String,
    pub group: String,
}

impl IngestFrom {
    pub fn parse(url: &str) -> Result<Self, String> {
        let usage = "expected kafka://HOST:PORT/TOPIC[?group=NAME]";
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| format!("{url:?}: {usage}"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (brokers, topic) = rest.split_once('/').unwrap_or((rest, ""));
        let topic = if topic.is_empty() {
            super::DEFAULT_TOPIC
        } else {
            topic
        };
        if brokers.is_empty()
            || brokers.split(',').any(|h| {
                h.rsplit_once(':')
                    .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            })
        {
            return Err(format!(
                "{url:?}: the brokers must be HOST:PORT[,HOST:PORT]; {usage}"
            ));
        }
        if !valid_topic(topic) {
            return Err(format!("{url:?}: {topic:?} is not a Kafka topic name"));
        }
        let mut group = DEFAULT_GROUP.to_string();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("group", g)) if !g.is_empty() => group = g.to_string(),
                _ => return Err(format!("{url:?}: unknown option {pair:?}; {usage}")),
            }
        }
        Ok(Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            group,
        })
    }
}

/// What consumer mode has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub messages: AtomicU64,
    pub invalid: AtomicU64,
    pub errors: AtomicU64,
    pub commits: AtomicU64,
}

impl ConsumerStats {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            (
                "shoal_kafka_ingest_messages_total",
                "Messages consumed from Kafka (--ingest-from) and stored",
                &self.messages,
            ),
            (
                "shoal_kafka_ingest_invalid_total",
                "Messages consumed from Kafka that were not Shoal samples or events (skipped)",
                &self.invalid,
            ),
            (
                "shoal_kafka_ingest_errors_total",
                "Consumer-mode rounds that failed (the broker or the store; retried)",
                &self.errors,
            ),
            (
                "shoal_kafka_ingest_commits_total",
                "Consumer-group offset commits after durable storage",
                &self.commits,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Relaxed)
            ));
        }
        out
    }
}

/// What one message carries.
enum Decoded {
    Sample(Sample),
    Hello(DeviceHello),
    /// Status changes and enrollments, recorded again by this hub (for its own sinks).
    OtherEvent(DeviceEvent),
}

fn decode<M: Message>(m: &M) -> Result<(String, Decoded), String> {
    let key = m.key().ok_or("no key (the device id)")?;
    let device = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8")?;
    shoal_proto::device_id::validate(device).map_err(|e| format!("key {device:?}: {e}"))?;
    let mut kind = None;
    let mut content_type = None;
    if let Some(h) = m.headers() {
        for h in h.iter() {
            match h.key {
                "shoal.kind" => kind = h.value,
                "content-type" => content_type = h.value,
                _ => {}
            }
        }
    }
    if content_type.is_some_and(|c| c.starts_with(b"application/json")) {
        return Err(
            "JSON values are not read back; use the protobuf format for consumer mode".into(),
        );
    }
    let value = m.payload().unwrap_or_default();
    let decoded = match kind {
        Some(b"event") => {
            let e = DeviceEvent::decode(value).map_err(|e| format!("not a DeviceEvent: {e}"))?;
            if e.device_id != device {
                return Err(format!(
                    "an event of {:?} under the key {device:?}",
                    e.device_id
                ));
            }
            match e.event {
                Some(device_event::Event::Hello(h)) => Decoded::Hello(h),
                _ => Decoded::OtherEvent(e),
            }
        }
        Some(b"sample") | None => {
            Decoded::Sample(Sample::decode(value).map_err(|e| format!("not a Sample: {e}"))?)
        }
        Some(other) => {
            return Err(format!(
                "unknown shoal.kind {:?}",
                String::from_utf8_lossy(other)
            ));
        }
    };
    Ok((device.to_string(), decoded))
}

/// Consumes until `shutdown`; a failed round drops the consumer (its uncommitted messages go
/// back to the group) and joins again after a pause.
pub async fn run(
    from: IngestFrom,
    ingestor: Ingestor,
    fleet: Arc<Fleet>,
    stats: Arc<ConsumerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match consume(
            &from,
            &ingestor,
            &fleet,
            &stats,
            &mut shutdown,
            &mut failures,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                stats.errors.fetch_add(1, Relaxed);
                tracing::warn!(brokers = %from.brokers, topic = %from.topic, error = %e, "consumer mode: round failed; joining the group again");
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures)) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

async fn consume(
    from: &IngestFrom,
    ingestor: &Ingestor,
    fleet: &Fleet,
    stats: &ConsumerStats,
    shutdown: &mut watch::Receiver<bool>,
    failures: &mut u32,
) -> Result<(), String> {
    let consumer: StreamConsumer<super::kafka::Quiet> = ClientConfig::new()
        .set("bootstrap.servers", &from.brokers)
        .set("group.id", &from.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(super::kafka::Quiet::default())
        .map_err(|e| e.to_string())?;
    {
        let (brokers, topic) = (from.brokers.clone(), from.topic.clone());
        tokio::task::spawn_blocking(move || super::kafka::partitions_of(&brokers, &topic))
            .await
            .expect("metadata task")
            .map_err(|e| e.message)?;
    }
    // Closing a consumer leaves the group, which waits for the coordinator: off the async
    // workers, whichever way this function ends.
    struct Leave(Option<StreamConsumer<super::kafka::Quiet>>);
    impl Drop for Leave {
        fn drop(&mut self) {
            if let Some(c) = self.0.take() {
                tokio::task::block_in_place(|| drop(c));
            }
        }
    }
    let guard = Leave(Some(consumer));
    let consumer = guard.0.as_ref().expect("set");
    consumer
        .subscribe(&[from.topic.as_str()])
        .map_err(|e| e.to_string())?;
    tracing::info!(brokers = %from.brokers, topic = %from.topic, group = %from.group, "consumer mode: joined the group");
    loop {
        // One round: wait for a message, then take what else is there (bounded).
        let first = tokio::select! {
            m = consumer.recv() => m.map_err(|e| e.to_string())?.detach(),
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let mut round = vec![first];
        while round.len() < ROUND {
            match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                Ok(Ok(m)) => round.push(m.detach()),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => break,
            }
        }
        store_round(&round, ingestor, fleet, stats).await?;
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        for m in &round {
            let slot = next
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *slot = (*slot).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), o) in next {
            tpl.add_partition_offset(&topic, p, Offset::Offset(o))
                .map_err(|e| e.to_string())?;
        }
        // A synchronous commit waits for the group coordinator: off the async workers.
        tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))
            .map_err(|e| format!("committing offsets after storing: {e}"))?;
        stats.commits.fetch_add(1, Relaxed);
        *failures = 0;
    }
}

/// Stores one round: device by device, in message order; a hello before a device's samples
/// registers it (a device first seen in a sample is registered with its id only).
async fn store_round(
    round: &[rdkafka::message::OwnedMessage],
    ingestor: &Ingestor,
    fleet: &Fleet,
    stats: &ConsumerStats,
) -> Result<(), String> {
    let mut order: Vec<String> = Vec::new();
    let mut per_device: HashMap<String, (Option<DeviceHello>, Vec<Sample>)> = HashMap::new();
    let mut events = Vec::new();
    for m in round {
        match decode(m) {
            Ok((device, decoded)) => {
                let slot = per_device.entry(device.clone()).or_insert_with(|| {
                    order.push(device.clone());
                    (None, Vec::new())
                });
                match decoded {
                    Decoded::Sample(s) => slot.1.push(s),
                    Decoded::Hello(h) => slot.0 = Some(h),
                    Decoded::OtherEvent(e) => events.push(e),
                }
            }
            Err(reason) => {
                stats.invalid.fetch_add(1, Relaxed);
                tracing::warn!(topic = %m.topic(), partition = m.partition(), offset = m.offset(), %reason, "consumer mode: skipped a message");
            }
        }
    }
    for device in order {
        let (hello, mut samples) = per_device.remove(&device).expect("listed");
        match hello {
            Some(h) => {
                ingestor.hello(h).await.map_err(|e| e.to_string())?;
            }
            None if fleet.get(&device).is_none() => {
                ingestor
                    .hello(DeviceHello {
                        device_id: device.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            None => {}
        }
        if samples.is_empty() {
            continue;
        }
        samples.sort_by_key(|s| s.seq);
        samples.dedup_by_key(|s| s.seq);
        let n = samples.len() as u64;
        ingestor
            .batch(&device, samples)
            .await
            .map_err(|e| format!("storing {device}'s samples: {e}"))?;
        stats.messages.fetch_add(n, Relaxed);
    }
    if !events.is_empty() {
        ingestor
            .events(events)
            .await
            .map_err(|e| format!("recording device events: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_from_urls() {
        let f = IngestFrom::parse("kafka://k1:9092,k2:9092/fleet?group=eu").unwrap();
        assert_eq!(
            (f.brokers.as_str(), f.topic.as_str(), f.group.as_str()),
            ("k1:9092,k2:9092", "fleet", "eu")
        );
        let f = IngestFrom::parse("kafka://k:9092").unwrap();
        assert_eq!(
            (f.topic.as_str(), f.group.as_str()),
            (super::super::DEFAULT_TOPIC, DEFAULT_GROUP)
        );
        for bad in [
            "mqtt://k:1/t",
            "kafka:///t",
            "kafka://k/t",
            "kafka://k:1/t?x=1",
            "kafka://k:1/a b",
        ] {
            assert!(IngestFrom::parse(bad).is_err(), "{bad}");
        }
    }
}
