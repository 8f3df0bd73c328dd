//! MQTT ingest, from an external broker or the embedded one (`crate::mqtt`, which hands its
//! device topics to the [`Dispatcher`]).
//!
//! From an external broker (Mosquitto, EMQX): the hub subscribes (through a
//! shared subscription, so several hubs split the load) to every device's hello and telemetry
//! topics and answers on its acks topic. Messages go through the same [`Ingestor`] as gRPC.
//!
//! The hub PUBACKs a message only after it is stored (manual acks on a persistent session), so
//! a hub killed mid-batch gets the message again from the broker; the agent's own ack timeout
//! covers a broker that lost it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use shoal_proto::mqtt::client::{no_delay, options};
use shoal_proto::mqtt::{kind, parse_broker, parse_topic, subscription, topic};
use shoal_proto::v1::{DeviceHello, IngestResponse, Sample, TelemetryBatch, ingest_response};
use tokio::sync::watch;

use super::json;
use super::{HelloError, Ingestor};
use crate::metrics::StreamReject;

/// How the hub reaches an external broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `mqtt://HOST:PORT`
    pub url: String,
    /// Client id of the hub's persistent session.
    pub client_id: String,
    /// Shared-subscription group; empty subscribes plainly (one hub per broker).
    pub share_group: String,
    pub credentials: Option<(String, String)>,
    /// Topic filter of the plain JSON form; empty turns it off.
    pub json_topic: String,
    /// TLS settings for an `mqtts://` broker.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Subscribes to `config.url` and ingests until `shutdown`; reconnects on its own.
pub async fn run_external(
    config: BrokerConfig,
    ingestor: Ingestor,
    mut shutdown: watch::Receiver<bool>,
) {
    let opts = parse_broker(&config.url)
        .and_then(|addr| options(&config.client_id, &addr, config.tls.clone()));
    let mut opts = match opts {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "bad --mqtt-broker");
            return;
        }
    };
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    // Accept anything the broker delivers and judge the size ourselves, so an oversized
    // payload is a counted rejection rather than a dropped connection.
    opts.set_max_packet_size(256 * 1024 * 1024, shoal_proto::DEFAULT_MAX_MESSAGE_BYTES);
    if let Some((u, p)) = &config.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    let (client, mut events) = AsyncClient::new(opts, 1024);
    no_delay(&mut events);
    let mut dispatcher = Dispatcher::new(
        ingestor,
        Replier::External(client.clone()),
        config.json_topic.clone(),
    );
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    tracing::info!(broker = %config.url, "hub subscribed to the MQTT broker");
                    for kind in [kind::HELLO, kind::TELEMETRY] {
                        let _ = client.subscribe(subscription(&config.share_group, kind), QoS::AtLeastOnce).await;
                    }
                    if !config.json_topic.is_empty() {
                        let filter = if config.share_group.is_empty() {
                            config.json_topic.clone()
                        } else {
                            format!("$share/{}/{}", config.share_group, config.json_topic)
                        };
                        let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => dispatcher.dispatch(p),
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    let delay = Duration::from_millis(100 * u64::from(failures.min(50)));
                    tracing::warn!(broker = %config.url, error = %e, retry_in = ?delay, "MQTT broker connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            },
        }
    }
    drop(dispatcher);
    let _ = client.try_disconnect();
}

/// Publishes a message from the hub itself into the embedded broker (QoS 1).
pub type EmbeddedPublish = std::sync::Arc<dyn Fn(&str, bytes::Bytes) + Send + Sync>;

/// Where the hub's answers go: back through the external broker, or into the embedded one.
#[derive(Clone)]
pub enum Replier {
    External(AsyncClient),
    Embedded(EmbeddedPublish),
}

impl Replier {
    async fn reply(&self, topic: String, body: Vec<u8>) {
        match self {
            Replier::External(c) => {
                let _ = c.publish(topic, QoS::AtLeastOnce, false, body).await;
            }
            Replier::Embedded(publish) => publish(&topic, body.into()),
        }
    }

    /// The message is dealt with (stored, or refused for good): PUBACK it to an external
    /// broker, which otherwise redelivers it.
    async fn done(&self, p: &Publish) {
        if let Replier::External(c) = self {
            let _ = c.ack(p).await;
        }
    }

    fn done_now(&self, p: &Publish) {
        if let Replier::External(c) = self {
            let _ = c.try_ack(p);
        }
    }
}

/// Routes device messages to one queue per device, so each device's messages are handled in
/// order while devices proceed in parallel. A task works through a queue while it holds
/// messages and ends when it is empty: a device between two batches costs a queue entry,
/// not a task and a channel.
pub struct Dispatcher {
    ingestor: Ingestor,
    replier: Replier,
    /// Topic filter of the plain JSON form ([`json`]); empty turns it off.
    json_topic: String,
    queues: HashMap<String, Arc<Mutex<DeviceQueue>>>,
}

/// One message for a device's queue.
enum Work {
    /// On a `shoal/v1/devices/...` topic.
    Device(Publish),
    /// A plain JSON sample, already read.
    Json(Box<Sample>, Publish),
}

/// One device's messages not yet handled.
#[derive(Default)]
struct DeviceQueue {
    work: VecDeque<Work>,
    /// A task is working through `work`.
    draining: bool,
    /// The next seq for JSON samples, learnt from the hub's store, and when it was last used:
    /// after [`JSON_SEQ_FOR`] without JSON it is learnt again.
    json_seq: Option<(u64, Instant)>,
}

/// How long a device's next JSON seq is trusted without asking the store again.
const JSON_SEQ_FOR: Duration = Duration::from_secs(60);

/// Room a device's queue keeps once it is empty; beyond it, the room goes back.
const QUEUE_KEEP: usize = 8;

impl Dispatcher {
    pub fn new(ingestor: Ingestor, replier: Replier, json_topic: String) -> Self {
        Self {
            ingestor,
            replier,
            json_topic,
            queues: HashMap::new(),
        }
    }

    /// Is `topic` one this dispatcher ingests?
    pub fn wants(&self, topic: &str) -> bool {
        parse_topic(topic).is_some() || json::matches(topic, &self.json_topic)
    }

    /// Is `topic` one of the plain JSON form's?
    pub fn is_json(&self, topic: &str) -> bool {
        parse_topic(topic).is_none() && json::matches(topic, &self.json_topic)
    }

    pub fn dispatch(&mut self, p: Publish) {
        let (device_id, work) = if let Some(t) = parse_topic(&p.topic) {
            (t.device_id.to_string(), Work::Device(p))
        } else if json::matches(&p.topic, &self.json_topic) {
            match json::parse(&p.payload, crate::store::series::now_ms()) {
                Ok((device, sample)) => {
                    let last_segment = p.topic.rsplit('/').next().unwrap_or_default();
                    if self.json_topic.ends_with('+') && last_segment != device {
                        let why = format!("JSON for device {device:?} on topic {}", p.topic);
                        self.ingestor
                            .refuse(StreamReject::ForeignTopic, last_segment, &why);
                        self.replier.done_now(&p);
                        return;
                    }
                    (device, Work::Json(Box::new(sample), p))
                }
                Err(e) => {
                    self.ingestor.refuse(StreamReject::Malformed, &p.topic, &e);
                    self.replier.done_now(&p);
                    return;
                }
            }
        } else {
            let why = format!("message on unexpected topic {}", p.topic);
            self.ingestor.refuse(StreamReject::Malformed, "mqtt", &why);
            self.replier.done_now(&p);
            return;
        };
        let queue = match self.queues.get(&device_id) {
            Some(q) => q.clone(),
            None => {
                let q = Arc::<Mutex<DeviceQueue>>::default();
                self.queues.insert(device_id.clone(), q.clone());
                q
            }
        };
        let mut q = queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        q.work.push_back(work);
        if q.draining {
            return;
        }
        q.draining = true;
        drop(q);
        tokio::spawn(drain(
            device_id,
            Draining {
                queue,
                finished: false,
            },
            self.replier.clone(),
            self.ingestor.clone(),
        ));
    }
}

/// A device's queue while a task works through it. Should that task end early (a panic),
/// the next message starts another.
struct Draining {
    queue: Arc<Mutex<DeviceQueue>>,
    /// The queue was found empty and handed back to the next dispatch.
    finished: bool,
}

impl Draining {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next message; `None`, with the queue left to the next dispatch, once it is empty.
    fn next(&mut self) -> Option<Work> {
        let mut q = self.lock();
        let Some(work) = q.work.pop_front() else {
            q.draining = false;
            if q.work.capacity() > QUEUE_KEEP {
                q.work = VecDeque::new();
            }
            drop(q);
            self.finished = true;
            return None;
        };
        Some(work)
    }

    /// The device's next JSON seq, unless unused for [`JSON_SEQ_FOR`].
    fn json_seq(&self) -> Option<u64> {
        self.lock()
            .json_seq
            .filter(|(_, used)| used.elapsed() < JSON_SEQ_FOR)
            .map(|(seq, _)| seq)
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        if !self.finished {
            self.lock().draining = false;
        }
    }
}

/// Handles one device's queued messages in arrival order, until the queue is empty.
async fn drain(device_id: String, mut queue: Draining, replier: Replier, ingestor: Ingestor) {
    let acks = topic(&device_id, kind::ACKS);
    let max = ingestor.limits().max_message_bytes;
    while let Some(work) = queue.next() {
        let p = match work {
            Work::Device(p) => p,
            Work::Json(sample, p) => {
                let mut json_seq = queue.json_seq();
                let stored = ingest_json(&ingestor, &device_id, *sample, &mut json_seq).await;
                queue.lock().json_seq = json_seq.map(|seq| (seq, Instant::now()));
                if stored {
                    replier.done(&p).await;
                }
                continue;
            }
        };
        let Outcome::Done(response) = on_device_message(&ingestor, &device_id, &p, max).await
        else {
            continue;
        };
        if let Some(msg) = response {
            replier
                .reply(
                    acks.clone(),
                    IngestResponse { msg: Some(msg) }.encode_to_vec(),
                )
                .await;
        }
        replier.done(&p).await;
    }
}

/// What became of one message on a device topic.
enum Outcome {
    /// Stored, or refused for good; `Some` is the answer for the device's acks topic.
    Done(Option<ingest_response::Msg>),
    /// Not stored: left unacknowledged, so that it comes again.
    NotStored,
}

/// Ingests one message on `device_id`'s topics; oversized and malformed ones are counted.
async fn on_device_message(
    ingestor: &Ingestor,
    device_id: &str,
    p: &Publish,
    max: usize,
) -> Outcome {
    let kind = parse_topic(&p.topic).map_or("", |t| t.kind);
    if p.payload.len() > max {
        ingestor.refuse(
            StreamReject::Oversized,
            device_id,
            &format!(
                "{} bytes on {}, the limit is {max}",
                p.payload.len(),
                p.topic
            ),
        );
        return Outcome::Done(None);
    }
    match kind {
        kind::HELLO => on_hello(ingestor, device_id, &p.payload).await,
        kind::TELEMETRY => on_telemetry(ingestor, device_id, &p.payload).await,
        // The hub's own answers (acks) and future command topics are not ingested.
        _ => Outcome::Done(None),
    }
}

/// Registers the device from its hello, answered with a welcome; a hello naming another device
/// is refused.
async fn on_hello(ingestor: &Ingestor, device_id: &str, payload: &[u8]) -> Outcome {
    match DeviceHello::decode(payload) {
        Ok(hello) if hello.device_id != device_id => {
            ingestor.refuse(
                StreamReject::InvalidDeviceId,
                device_id,
                &format!(
                    "hello names device {:?} on the topic of {device_id:?}",
                    hello.device_id
                ),
            );
            Outcome::Done(None)
        }
        Ok(hello) => match ingestor.hello(hello).await {
            Ok(w) => Outcome::Done(Some(ingest_response::Msg::Welcome(w))),
            Err(HelloError::InvalidId { .. }) => Outcome::Done(None),
            Err(e @ HelloError::Store(_)) => {
                // Not acknowledged: the agent's ack timeout resends it.
                tracing::error!(device_id = %device_id, error = %e, "cannot store a hello");
                Outcome::NotStored
            }
        },
        Err(e) => {
            ingestor.refuse(StreamReject::Malformed, device_id, &format!("hello: {e}"));
            Outcome::Done(None)
        }
    }
}

/// Stores one telemetry batch, answered with an ack.
async fn on_telemetry(ingestor: &Ingestor, device_id: &str, payload: &[u8]) -> Outcome {
    match TelemetryBatch::decode(payload) {
        Ok(batch) => match ingestor.batch(device_id, batch.samples).await {
            Ok(ack) => Outcome::Done(Some(ingest_response::Msg::Ack(ack))),
            Err(e) => {
                tracing::error!(device_id = %device_id, error = %e, "cannot store a batch");
                Outcome::NotStored
            }
        },
        Err(e) => {
            ingestor.refuse(
                StreamReject::Malformed,
                device_id,
                &format!("telemetry: {e}"),
            );
            Outcome::Done(None)
        }
    }
}

/// Stores one JSON sample under the next seq; false when the store failed (not acknowledged).
async fn ingest_json(
    ingestor: &Ingestor,
    device_id: &str,
    mut sample: Sample,
    next: &mut Option<u64>,
) -> bool {
    let seq = match *next {
        Some(n) => n,
        None => {
            let hello = DeviceHello {
                device_id: device_id.to_string(),
                labels: [("source".to_string(), "mqtt-json".to_string())].into(),
                ..Default::default()
            };
            match ingestor.hello(hello).await {
                Ok(w) => w.stored_up_to_seq + 1,
                Err(e) => {
                    tracing::error!(device_id = %device_id, error = %e, "cannot register a JSON device");
                    return false;
                }
            }
        }
    };
    sample.seq = seq;
    match ingestor.batch(device_id, vec![sample]).await {
        Ok(_) => {
            *next = Some(seq + 1);
            true
        }
        Err(e) => {
            tracing::error!(device_id = %device_id, error = %e, "cannot store a JSON sample");
            false
        }
    }
}
