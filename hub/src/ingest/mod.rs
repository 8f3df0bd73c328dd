//! Ingest, whatever the transport: a device's hello, then batches — validated, stored through
//! the writer, acknowledged. The transports ([`grpc`], [`mqtt`] from an external broker, the
//! book's [`json`] form, and the embedded broker in `crate::mqtt`) only move bytes to it.

pub mod enroll;
pub mod grpc;
pub mod json;
pub mod mqtt;

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::v1::{Ack, DeviceHello, Rejection, Sample, Welcome};

use crate::metrics::{LogLimiter, Metrics, SampleReject, StreamReject};
use crate::store::readings::Readings;
use crate::store::series::now_ms;
use crate::store::writer::{Row, Writer};

/// How long open ingest connections get to finish on shutdown.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

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

    /// Records device events for the sinks (nothing without sinks); resolves once committed.
    pub async fn events(
        &self,
        events: Vec<shoal_proto::v1::DeviceEvent>,
    ) -> Result<(), crate::store::StoreError> {
        self.writer.events(events).await
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

/// What validating one batch decided.
#[derive(Debug, Default)]
pub struct Checked {
    pub rows: Vec<Row>,
    pub rejected: Vec<(u64, SampleReject, String)>,
    /// Highest seq in the batch: the ack covers everything up to it.
    pub up_to_seq: u64,
}

/// Checks each sample: seq above 0 and rising within the batch, a timestamp that is set and not
/// too far ahead of `now_ms`. Good samples become rows (split for storing), bad ones rejections.
pub fn check_batch(samples: Vec<Sample>, now_ms: i64, max_skew: Duration) -> Checked {
    let mut out = Checked::default();
    let limit = now_ms.saturating_add(max_skew.as_millis() as i64);
    let mut prev = 0u64;
    let problems: Vec<_> = samples
        .iter()
        .map(|s| {
            let seq = s.seq;
            out.up_to_seq = out.up_to_seq.max(seq);
            let problem = problem(s, prev, now_ms, limit, max_skew);
            prev = prev.max(seq);
            problem
        })
        .collect();
    // The fleet table's brief of the device comes from its newest good sample, read once.
    let newest = problems.iter().rposition(Option::is_none);
    for (i, (s, problem)) in samples.into_iter().zip(problems).enumerate() {
        match problem {
            Some((why, reason)) => out.rejected.push((s.seq, why, reason)),
            None => {
                let readings = (Some(i) == newest).then(|| Box::new(Readings::of(&s)));
                let mut row = Row::new(s);
                row.readings = readings;
                out.rows.push(row);
            }
        }
    }
    out
}

/// Why sample `s` is refused, if it is: `prev` is the highest seq before it in the batch,
/// `limit` the latest timestamp taken.
fn problem(
    s: &Sample,
    prev: u64,
    now_ms: i64,
    limit: i64,
    max_skew: Duration,
) -> Option<(SampleReject, String)> {
    let seq = s.seq;
    if seq == 0 {
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
    }
}

fn fmt_ms(ms: i64) -> String {
    crate::store::series::rfc3339_ms(ms)
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
    fn only_the_newest_good_sample_is_briefed_for_the_fleet_table() {
        // The batch's last sample is refused (seq 0): the brief is the one before it.
        let c = check_batch(
            vec![sample(1, 10), sample(2, 20), sample(0, 30)],
            1_000,
            Duration::from_secs(60),
        );
        let briefed: Vec<Option<i64>> = c
            .rows
            .iter()
            .map(|r| r.readings.as_ref().map(|b| b.timestamp_ms))
            .collect();
        assert_eq!(briefed, [None, Some(20)]);
        assert_eq!(c.rejected.len(), 1);
    }

    #[test]
    fn a_timestamp_past_the_year_9999_is_refused_not_a_panic() {
        let now = 1_800_000_000_000;
        let c = check_batch(vec![sample(1, i64::MAX)], now, Duration::from_secs(60));
        assert_eq!(c.rejected.len(), 1);
        assert!(
            c.rejected[0].2.contains("after the year 9999"),
            "{}",
            c.rejected[0].2
        );
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

    /// The gRPC ingest path on bytes no one vetted: decoding never panics, and whatever decodes
    /// is checked sample by sample, every sample accounted for exactly once.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use prost::Message;
        use shoal_proto::v1::{IngestRequest, TelemetryBatch, ingest_request};

        fn batch_bytes() -> impl Strategy<Value = Vec<u8>> {
            let sample =
                (any::<u64>(), any::<i64>(), any::<Option<u64>>()).prop_map(|(seq, ts, uptime)| {
                    Sample {
                        seq,
                        timestamp_ms: ts,
                        uptime_seconds: uptime,
                        ..Default::default()
                    }
                });
            prop::collection::vec(sample, 0..20).prop_map(|samples| {
                IngestRequest {
                    msg: Some(ingest_request::Msg::Batch(TelemetryBatch { samples })),
                }
                .encode_to_vec()
            })
        }

        proptest! {
            #[test]
            fn any_bytes_decode_or_fail_and_every_sample_is_accounted_for(
                bytes in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..512),
                    batch_bytes(),
                    // A valid batch with bytes flipped.
                    (batch_bytes(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut b, i, x)| {
                        if !b.is_empty() {
                            let at = i.index(b.len());
                            b[at] ^= x;
                        }
                        b
                    }),
                ],
                now in 0i64..4_000_000_000_000,
            ) {
                let Ok(request) = IngestRequest::decode(bytes.as_slice()) else {
                    return Ok(());
                };
                if let Some(ingest_request::Msg::Batch(batch)) = request.msg {
                    let n = batch.samples.len();
                    let max_seq = batch.samples.iter().map(|s| s.seq).max().unwrap_or(0);
                    let checked = check_batch(batch.samples, now, Duration::from_secs(600));
                    prop_assert_eq!(checked.rows.len() + checked.rejected.len(), n);
                    prop_assert_eq!(checked.up_to_seq, max_seq);
                }
            }
        }
    }
}
