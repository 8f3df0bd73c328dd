//! The gRPC ingest service: hello, then batches; validate, store through the writer, ack.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use shoal_proto::v1::ingest_server::Ingest;
use shoal_proto::v1::{
    Ack, DeviceHello, IngestRequest, IngestResponse, Rejection, Sample, Welcome, ingest_request,
    ingest_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::metrics::{LogLimiter, Metrics, SampleReject, StreamReject};
use crate::now_ms;
use crate::writer::{Row, Writer};

/// Limits the ingest path enforces.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    /// How far ahead of the hub's clock a sample's timestamp may be.
    pub max_clock_skew: Duration,
    /// Largest encoded message accepted.
    pub max_message_bytes: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_clock_skew: Duration::from_secs(600),
            max_message_bytes: shoal_proto::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// The transport-independent ingest path: every transport (gRPC, MQTT) hands hellos and
/// batches to this, so validation, dedup, storage and counting are the same everywhere.
#[derive(Clone)]
pub struct Ingestor {
    writer: Writer,
    metrics: Arc<Metrics>,
    limits: IngestLimits,
    limiter: Arc<LogLimiter>,
}

/// Why a hello was refused.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("invalid device id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("hub store unavailable: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl Ingestor {
    pub fn new(writer: Writer, metrics: Arc<Metrics>, limits: IngestLimits) -> Self {
        Self {
            writer,
            metrics,
            limits,
            limiter: Arc::new(LogLimiter::new(Duration::from_secs(60))),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn limits(&self) -> IngestLimits {
        self.limits
    }

    /// Counts a refused stream or message and logs it at most once a minute per `key`.
    pub fn refuse(&self, why: StreamReject, key: &str, detail: &str) {
        self.metrics.reject_stream(why);
        if self.limiter.allow(&format!("{key}:{}", why.label())) {
            tracing::warn!(source = %key, reason = why.label(), detail = %detail, "refused ingest input");
        }
    }

    /// Registers (or refreshes) a device; the welcome says how far the hub has its samples.
    pub async fn hello(&self, hello: DeviceHello) -> Result<Welcome, HelloError> {
        if let Err(e) = shoal_proto::device_id::validate(&hello.device_id) {
            let err = HelloError::InvalidId {
                id: hello.device_id.clone(),
                reason: e.to_string(),
            };
            self.refuse(
                StreamReject::InvalidDeviceId,
                &format!("host {}", hello.hostname),
                &err.to_string(),
            );
            return Err(err);
        }
        let stored = self.writer.hello(hello, now_ms()).await?;
        Ok(Welcome {
            stored_up_to_seq: stored,
        })
    }

    /// Validates and stores one batch of a device that said hello; the ack is sent only after
    /// the store has committed.
    pub async fn batch(
        &self,
        device_id: &str,
        samples: Vec<Sample>,
    ) -> Result<Ack, crate::store::StoreError> {
        let first_seq = samples.first().map_or(0, |s| s.seq);
        let checked = check_batch(samples, now_ms(), self.limits.max_clock_skew);
        for (seq, why, reason) in &checked.rejected {
            self.metrics.reject_sample(*why);
            if self.limiter.allow(&format!("{device_id}:{}", why.label())) {
                tracing::warn!(device_id = %device_id, seq, reason = %reason, "rejected a sample");
            }
        }
        let outcome = self
            .writer
            .write(device_id.to_string(), checked.rows, now_ms())
            .await?;
        self.metrics
            .samples_accepted
            .add(u64::from(outcome.accepted));
        self.metrics
            .samples_duplicate
            .add(u64::from(outcome.duplicates));
        self.metrics.points_accepted.add(outcome.points);
        self.metrics.batches.inc();
        Ok(Ack {
            up_to_seq: checked.up_to_seq,
            first_seq,
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            rejected: checked
                .rejected
                .into_iter()
                .map(|(seq, _, reason)| Rejection { seq, reason })
                .collect(),
        })
    }
}

/// The gRPC face of the [`Ingestor`].
pub struct IngestService {
    ingestor: Ingestor,
}

impl IngestService {
    pub fn new(ingestor: Ingestor) -> Self {
        Self { ingestor }
    }
}

/// What validating one batch decided.
#[derive(Debug, Default)]
pub struct Checked {
    pub rows: Vec<Row>,
    pub rejected: Vec<(u64, SampleReject, String)>,
    /// Highest seq in the batch: the ack covers everything up to it.
    pub up_to_seq: u64,
}

/// Checks each sample: seq above 0 and rising within the batch, a timestamp that is set and not
/// too far ahead of `now_ms`. Good samples become rows (re-encoded), bad ones rejections.
pub fn check_batch(samples: Vec<Sample>, now_ms: i64, max_skew: Duration) -> Checked {
    let mut out = Checked::default();
    let limit = now_ms.saturating_add(max_skew.as_millis() as i64);
    let mut prev = 0u64;
    for s in samples {
        let seq = s.seq;
        out.up_to_seq = out.up_to_seq.max(seq);
        let problem = if seq == 0 {
            Some((
                SampleReject::BadSeq,
                "seq 0 is not valid; seqs start at 1".to_string(),
            ))
        } else if seq <= prev {
            Some((
                SampleReject::BadSeq,
                format!("seq {seq} does not rise above {prev} earlier in the batch"),
            ))
        } else if s.timestamp_ms <= 0 {
            Some((
                SampleReject::MissingTimestamp,
                format!("seq {seq} has no timestamp"),
            ))
        } else if s.timestamp_ms > limit {
            let ahead = Duration::from_millis((s.timestamp_ms - now_ms) as u64);
            Some((
                SampleReject::FutureTimestamp,
                format!(
                    "seq {seq}: timestamp {} is {} ahead of the hub's clock (at most {} allowed); check the device clock (NTP)",
                    fmt_ms(s.timestamp_ms),
                    humantime::format_duration(Duration::from_secs(ahead.as_secs())),
                    humantime::format_duration(max_skew)
                ),
            ))
        } else {
            None
        };
        prev = prev.max(seq);
        match problem {
            Some((why, reason)) => out.rejected.push((seq, why, reason)),
            None => {
                let points = shoal_proto::metrics::point_count(&s) as u32;
                out.rows.push(Row {
                    seq,
                    points,
                    bytes: s.encode_to_vec(),
                });
            }
        }
    }
    out
}

fn fmt_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Keeps the active-stream gauge right however a stream ends.
struct ActiveStream(Arc<Metrics>);

impl ActiveStream {
    fn new(m: Arc<Metrics>) -> Self {
        m.streams_active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(m)
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0
            .streams_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Classifies a receive error: the client sent something unacceptable (counted, answered
/// with a clear status) or simply went away.
fn classify(status: &Status, max_bytes: usize) -> Option<(StreamReject, Status)> {
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => Some((
            StreamReject::Oversized,
            Status::out_of_range(format!(
                "{}; the hub accepts messages up to {max_bytes} bytes: send smaller batches",
                status.message()
            )),
        )),
        Code::Internal if status.message().contains("decode") => Some((
            StreamReject::Malformed,
            Status::invalid_argument(format!(
                "message is not a valid shoal.v1.IngestRequest: {}",
                status.message()
            )),
        )),
        _ => None,
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = ReceiverStream<Result<IngestResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let ingestor = self.ingestor.clone();
        let max_bytes = ingestor.limits().max_message_bytes;
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown peer".to_string(), |a| a.to_string());
        let mut inbound = request.into_inner();
        let first = match inbound.message().await {
            Ok(m) => m,
            Err(status) => {
                return Err(match classify(&status, max_bytes) {
                    Some((why, answer)) => {
                        ingestor.refuse(why, &peer, status.message());
                        answer
                    }
                    None => status,
                });
            }
        };
        let hello = match first.and_then(|m| m.msg) {
            Some(ingest_request::Msg::Hello(h)) => h,
            _ => {
                ingestor.refuse(StreamReject::NoHello, &peer, "first message is not a hello");
                return Err(Status::invalid_argument(
                    "the first message of an ingest stream must be a hello",
                ));
            }
        };
        let device_id = hello.device_id.clone();
        let welcome = ingestor.hello(hello).await.map_err(|e| match e {
            HelloError::InvalidId { .. } => Status::invalid_argument(e.to_string()),
            HelloError::Store(_) => Status::unavailable(e.to_string()),
        })?;
        tracing::debug!(device_id = %device_id, stored_up_to_seq = welcome.stored_up_to_seq, "device connected");

        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(IngestResponse {
                msg: Some(ingest_response::Msg::Welcome(welcome)),
            }))
            .await;
        tokio::spawn(async move {
            let _active = ActiveStream::new(ingestor.metrics().clone());
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        if let Some((why, answer)) = classify(&status, max_bytes) {
                            ingestor.refuse(why, &device_id, status.message());
                            let _ = tx.send(Err(answer)).await;
                        }
                        break;
                    }
                };
                let batch = match msg.msg {
                    Some(ingest_request::Msg::Batch(b)) => b,
                    _ => {
                        ingestor.refuse(StreamReject::Malformed, &device_id, "a second hello");
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "after the hello only batches may follow",
                            )))
                            .await;
                        break;
                    }
                };
                let ack = match ingestor.batch(&device_id, batch.samples).await {
                    Ok(ack) => ack,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "hub store unavailable: {e}"
                            ))))
                            .await;
                        break;
                    }
                };
                if tx
                    .send(Ok(IngestResponse {
                        msg: Some(ingest_response::Msg::Ack(ack)),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tracing::debug!(device_id = %device_id, "device stream ended");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64, ts: i64) -> Sample {
        Sample {
            seq,
            timestamp_ms: ts,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_good_samples() {
        let now = 1_800_000_000_000;
        let c = check_batch(
            vec![sample(1, now - 10), sample(2, now)],
            now,
            Duration::from_secs(60),
        );
        assert_eq!(c.rows.len(), 2);
        assert!(c.rejected.is_empty());
        assert_eq!(c.up_to_seq, 2);
    }

    #[test]
    fn rejects_far_future_and_keeps_the_rest() {
        let now = 1_800_000_000_000;
        let c = check_batch(
            vec![
                sample(1, now),
                sample(2, now + 3_600_000),
                sample(3, now + 30_000),
            ],
            now,
            Duration::from_secs(60),
        );
        assert_eq!(c.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(c.rejected.len(), 1);
        let (seq, why, reason) = &c.rejected[0];
        assert_eq!((*seq, *why), (2, SampleReject::FutureTimestamp));
        assert!(reason.contains("1h ahead"), "{reason}");
        assert_eq!(
            c.up_to_seq, 3,
            "the ack covers rejected samples so the agent can drop them"
        );
    }

    #[test]
    fn rejects_bad_seqs_and_missing_timestamps() {
        let now = 1_800_000_000_000;
        let c = check_batch(
            vec![sample(0, now), sample(5, now), sample(4, now), sample(6, 0)],
            now,
            Duration::from_secs(60),
        );
        let whys: Vec<_> = c.rejected.iter().map(|(s, w, _)| (*s, *w)).collect();
        assert_eq!(
            whys,
            vec![
                (0, SampleReject::BadSeq),
                (4, SampleReject::BadSeq),
                (6, SampleReject::MissingTimestamp)
            ]
        );
        assert_eq!(c.rows.len(), 1);
    }
}
