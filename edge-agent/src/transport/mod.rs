//! Transports from the spool to the hub: gRPC ([`grpc`]) and MQTT ([`mqtt`]), picked by the
//! scheme of `--hub`. Both trim the spool only on the hub's acknowledgement ([`inflight`]).

pub mod grpc;
pub mod inflight;
pub mod mqtt;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::v1::{Ack, DeviceHello, Sample, TelemetryBatch, Welcome};

use self::inflight::InFlight;
use tokio::sync::{Notify, watch};

use crate::spool::{Spool, SpoolError};
use crate::{ErrorKind, Stats};

/// The transport `hub` selects: "mqtt" for `mqtt://` and `mqtts://`, else "grpc".
pub fn name(hub: &str) -> &'static str {
    if is_mqtt(hub) { "mqtt" } else { "grpc" }
}

fn is_mqtt(hub: &str) -> bool {
    hub.starts_with("mqtt://") || hub.starts_with("mqtts://")
}

/// Batches sent before waiting for their acks.
const WINDOW: usize = 4;
/// Bytes of samples per batch; well under the hub's default message limit.
const BATCH_MAX_BYTES: usize = 1024 * 1024;

/// An error and its causes on one line: tonic's own message ("transport error") names no
/// reason; the operator needs the one underneath ("Connection refused").
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("MQTT connection to {broker}: {message}")]
    Mqtt { broker: String, message: String },
    #[error("cannot connect to hub {hub}: {}", causes(source))]
    Connect {
        hub: String,
        source: tonic::transport::Error,
    },
    #[error("hub refused the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("hub closed the stream")]
    Closed,
    #[error("hub did not acknowledge within {0:?}")]
    AckTimeout(Duration),
    #[error("hub answered out of protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("spooled sample {seq} does not decode: {source}")]
    Decode {
        seq: u64,
        source: prost::DecodeError,
    },
}

/// The gRPC trailer in which a server says how long to wait before retrying.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

impl TransportError {
    /// How long the hub asked to wait before trying again (a full store, one reopening): the
    /// agent comes back then rather than after its growing backoff, so it resumes promptly once
    /// the hub can write.
    pub fn retry_after(&self) -> Option<Duration> {
        let TransportError::Status(status) = self else {
            return None;
        };
        let ms: u64 = status
            .metadata()
            .get(RETRY_PUSHBACK)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        Some(Duration::from_millis(ms.clamp(50, 60_000)))
    }

    /// The kind counted in `shoal_agent_errors_total`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Mqtt { .. } | TransportError::Connect { .. } => ErrorKind::Connect,
            TransportError::Status(_) | TransportError::Closed => ErrorKind::Stream,
            TransportError::AckTimeout(_) => ErrorKind::AckTimeout,
            TransportError::Protocol(_) | TransportError::Decode { .. } => ErrorKind::Protocol,
            TransportError::Spool(_) => ErrorKind::Spool,
        }
    }
}

/// Why the sender stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    Shutdown,
    /// Sampling finished (`--count`) and everything was acknowledged.
    Drained,
}

/// Exponential backoff with jitter: each wait is drawn from [cap/2, cap], cap doubling from
/// `base` up to `max`, so a fleet reconnecting after a hub restart spreads out.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

pub struct Sender {
    pub hub: String,
    pub hello: DeviceHello,
    pub spool: Arc<Mutex<Spool>>,
    pub new_data: Arc<Notify>,
    pub stats: Arc<Stats>,
    pub batch_max_samples: usize,
    /// Becomes true when sampling has finished for good.
    pub sampling_done: watch::Receiver<bool>,
    /// Resend what the hub has not acknowledged after this long.
    pub ack_timeout: Duration,
    /// MQTT user name and password, when the broker wants them.
    pub mqtt_credentials: Option<(String, String)>,
    /// TLS settings for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// TLS settings (with this device's certificate) for `https://`.
    pub grpc_tls: Option<crate::identity::SharedTls>,
}

impl Sender {
    /// Runs until shutdown (or, with sampling finished, until the spool is drained).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Stopped {
        if is_mqtt(&self.hub) {
            return self.run_mqtt(shutdown).await;
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let result = self.grpc_stream_once(&mut shutdown, &mut backoff).await;
            self.stats.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(stopped) => return stopped,
                Err(e) => {
                    self.stats.record_error(e.kind(), &e);
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    let delay = match e.retry_after() {
                        // Spread the fleet over [t, 1.5 t].
                        Some(t) => t + t.mul_f64(fastrand::f64() / 2.0),
                        None => backoff.next_delay(),
                    };
                    tracing::warn!(hub = %self.hub, error = %e, retry_in = ?delay, "hub stream failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Stopped::Shutdown,
                    }
                }
            }
        }
    }

    /// The hub says how far it has this device's samples. A spool behind that lost its state
    /// (or another client sent under this device's id): numbering must continue above the
    /// hub's or new samples would count as duplicates, and what waits here is kept, renumbered
    /// above the hub's seq, never discarded.
    fn on_welcome(&self, w: &Welcome) -> Result<(), TransportError> {
        use prost::Message;
        let mut spool = self.spool.lock().expect("spool lock");
        if w.stored_up_to_seq <= spool.last_written_seq() {
            return Ok(());
        }
        let spool_has = spool.last_written_seq();
        let moved = spool
            .renumber_above(w.stored_up_to_seq, |bytes, seq| {
                let mut sample = Sample::decode(bytes)?;
                sample.seq = seq;
                Ok::<_, prost::DecodeError>(sample.encode_to_vec())
            })
            .map_err(|e| match e {
                crate::spool::RenumberError::Spool(e) => TransportError::from(e),
                crate::spool::RenumberError::Rewrite(source) => TransportError::Decode {
                    seq: spool_has,
                    source,
                },
            })?;
        self.stats
            .samples_renumbered
            .fetch_add(moved, Ordering::Relaxed);
        tracing::warn!(
            hub_has = w.stored_up_to_seq,
            spool_has,
            kept = moved,
            "the hub holds newer samples than this spool; numbering continues above the hub's, and the samples waiting here are kept under new seqs"
        );
        Ok(())
    }

    /// The next batch from the spool after `after`: its first and last seq and the samples;
    /// `None` when nothing newer waits.
    fn next_batch(&self, after: u64) -> Result<Option<(u64, u64, TelemetryBatch)>, TransportError> {
        use prost::Message;
        let records = self.spool.lock().expect("spool lock").read_after(
            after,
            self.batch_max_samples,
            BATCH_MAX_BYTES,
        )?;
        let (Some(&(first, _)), Some(&(last, _))) = (records.first(), records.last()) else {
            return Ok(None);
        };
        let mut samples = Vec::with_capacity(records.len());
        for (seq, bytes) in records {
            samples.push(
                Sample::decode(bytes.as_slice())
                    .map_err(|source| TransportError::Decode { seq, source })?,
            );
        }
        Ok(Some((first, last, TelemetryBatch { samples })))
    }

    /// Counts an ack and trims the spool as far as the oldest batches are all acknowledged.
    fn on_ack(&self, ack: &Ack, in_flight: &mut InFlight) -> Result<(), TransportError> {
        for r in &ack.rejected {
            tracing::warn!(seq = r.seq, reason = %r.reason, "hub rejected a sample for good; it is dropped");
        }
        self.stats
            .samples_rejected
            .fetch_add(ack.rejected.len() as u64, Ordering::Relaxed);
        self.stats
            .samples_acked
            .fetch_add(u64::from(ack.accepted + ack.duplicates), Ordering::Relaxed);
        if let Some(trim) = in_flight.acked(ack.first_seq, ack.up_to_seq) {
            self.spool.lock().expect("spool lock").ack(trim)?;
        }
        Ok(())
    }

    pub(crate) fn drained(&self) -> bool {
        *self.sampling_done.borrow() && self.spool.lock().expect("spool lock").status().pending == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let mut last = first;
        for _ in 0..10 {
            last = b.next_delay();
        }
        assert!(
            last >= Duration::from_secs(1) && last <= Duration::from_secs(2),
            "{last:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn the_hubs_pushback_sets_the_retry() {
        let mut status = tonic::Status::unavailable("store full");
        status
            .metadata_mut()
            .insert(RETRY_PUSHBACK, "1000".parse().unwrap());
        assert_eq!(
            TransportError::Status(status).retry_after(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            TransportError::Status(tonic::Status::unavailable("x")).retry_after(),
            None
        );
        assert_eq!(TransportError::Closed.retry_after(), None);
    }

    #[test]
    fn backoff_is_jittered() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "delays differ between agents");
    }
}
