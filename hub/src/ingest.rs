//! The gRPC ingest service: hello, then batches; validate, store through the writer, ack.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use shoal_proto::v1::ingest_server::Ingest;
use shoal_proto::v1::{
    Ack, IngestRequest, IngestResponse, Rejection, Sample, Welcome, ingest_request, ingest_response,
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

pub struct IngestService {
    writer: Writer,
    metrics: Arc<Metrics>,
    limits: IngestLimits,
    limiter: Arc<LogLimiter>,
}

impl IngestService {
    pub fn new(writer: Writer, metrics: Arc<Metrics>, limits: IngestLimits) -> Self {
        Self {
            writer,
            metrics,
            limits,
            limiter: Arc::new(LogLimiter::new(Duration::from_secs(60))),
        }
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
        let mut inbound = request.into_inner();
        let first = match inbound.message().await {
            Ok(m) => m,
            Err(status) => {
                return Err(match classify(&status, self.limits.max_message_bytes) {
                    Some((why, answer)) => {
                        self.metrics.reject_stream(why);
                        answer
                    }
                    None => status,
                });
            }
        };
        let hello = match first.and_then(|m| m.msg) {
            Some(ingest_request::Msg::Hello(h)) => h,
            _ => {
                self.metrics.reject_stream(StreamReject::NoHello);
                return Err(Status::invalid_argument(
                    "the first message of an ingest stream must be a hello",
                ));
            }
        };
        if let Err(e) = shoal_proto::device_id::validate(&hello.device_id) {
            self.metrics.reject_stream(StreamReject::InvalidDeviceId);
            if self.limiter.allow(&format!("bad-id:{}", hello.hostname)) {
                tracing::warn!(device_id = %hello.device_id, hostname = %hello.hostname, error = %e, "refused an ingest stream");
            }
            return Err(Status::invalid_argument(format!(
                "invalid device id {:?}: {e}",
                hello.device_id
            )));
        }
        let device_id = hello.device_id.clone();
        let stored = self
            .writer
            .hello(hello, now_ms())
            .await
            .map_err(|e| Status::unavailable(format!("hub store unavailable: {e}")))?;
        tracing::debug!(device_id = %device_id, stored_up_to_seq = stored, "device connected");

        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(IngestResponse {
                msg: Some(ingest_response::Msg::Welcome(Welcome {
                    stored_up_to_seq: stored,
                })),
            }))
            .await;
        let writer = self.writer.clone();
        let metrics = self.metrics.clone();
        let limits = self.limits;
        let limiter = self.limiter.clone();
        tokio::spawn(async move {
            let _active = ActiveStream::new(metrics.clone());
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        if let Some((why, answer)) = classify(&status, limits.max_message_bytes) {
                            metrics.reject_stream(why);
                            if limiter.allow(&format!("{device_id}:{}", why.label())) {
                                tracing::warn!(device_id = %device_id, reason = why.label(), error = %status.message(), "refused an ingest message");
                            }
                            let _ = tx.send(Err(answer)).await;
                        }
                        break;
                    }
                };
                let batch = match msg.msg {
                    Some(ingest_request::Msg::Batch(b)) => b,
                    _ => {
                        metrics.reject_stream(StreamReject::Malformed);
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "after the hello only batches may follow",
                            )))
                            .await;
                        break;
                    }
                };
                let checked = check_batch(batch.samples, now_ms(), limits.max_clock_skew);
                for (seq, why, reason) in &checked.rejected {
                    metrics.reject_sample(*why);
                    if limiter.allow(&format!("{device_id}:{}", why.label())) {
                        tracing::warn!(device_id = %device_id, seq, reason = %reason, "rejected a sample");
                    }
                }
                let outcome = match writer
                    .write(device_id.clone(), checked.rows, now_ms())
                    .await
                {
                    Ok(o) => o,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "hub store unavailable: {e}"
                            ))))
                            .await;
                        break;
                    }
                };
                metrics.samples_accepted.add(u64::from(outcome.accepted));
                metrics.samples_duplicate.add(u64::from(outcome.duplicates));
                metrics.points_accepted.add(outcome.points);
                metrics.batches.inc();
                let ack = Ack {
                    up_to_seq: checked.up_to_seq,
                    accepted: outcome.accepted,
                    duplicates: outcome.duplicates,
                    rejected: checked
                        .rejected
                        .into_iter()
                        .map(|(seq, _, reason)| Rejection { seq, reason })
                        .collect(),
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
