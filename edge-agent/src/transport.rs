//! The gRPC transport: drains the spool to the hub over one bidirectional stream, trims on the
//! hub's acknowledgements, and reconnects with exponential backoff and jitter.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use shoal_proto::v1::ingest_client::IngestClient;
use shoal_proto::v1::{
    DeviceHello, IngestRequest, Sample, TelemetryBatch, ingest_request, ingest_response,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::Stats;
use crate::spool::{Spool, SpoolError};

/// Batches sent before waiting for their acks.
const WINDOW: usize = 4;
/// A connection whose oldest batch is unacknowledged this long is considered dead.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of samples per batch; well under the hub's default message limit.
const BATCH_MAX_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to hub {hub}: {source}")]
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
}

impl Sender {
    /// Runs until shutdown (or, with sampling finished, until the spool is drained).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Stopped {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            match self.stream_once(&mut shutdown, &mut backoff).await {
                Ok(stopped) => return stopped,
                Err(e) => {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    tracing::warn!(hub = %self.hub, error = %e, retry_in = ?delay, "hub stream failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Stopped::Shutdown,
                    }
                }
            }
        }
    }

    fn drained(&self) -> bool {
        *self.sampling_done.borrow() && self.spool.lock().expect("spool lock").status().pending == 0
    }

    async fn stream_once(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<Stopped, TransportError> {
        if self.drained() {
            return Ok(Stopped::Drained);
        }
        let endpoint = Endpoint::from_shared(self.hub.clone())
            .map_err(|e| TransportError::Connect {
                hub: self.hub.clone(),
                source: e,
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| TransportError::Connect {
                hub: self.hub.clone(),
                source: e,
            })?;
        let mut client = IngestClient::new(channel)
            .max_encoding_message_size(shoal_proto::DEFAULT_MAX_MESSAGE_BYTES)
            .max_decoding_message_size(shoal_proto::DEFAULT_MAX_MESSAGE_BYTES);

        let (tx, rx) = mpsc::channel::<IngestRequest>(WINDOW + 1);
        let mut hello = self.hello.clone();
        hello.last_written_seq = self.spool.lock().expect("spool lock").last_written_seq();
        tx.send(IngestRequest {
            msg: Some(ingest_request::Msg::Hello(hello)),
        })
        .await
        .map_err(|_| TransportError::Closed)?;
        let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match tokio::time::timeout(ACK_TIMEOUT, responses.message()).await {
            Err(_) => return Err(TransportError::AckTimeout(ACK_TIMEOUT)),
            Ok(r) => r?.ok_or(TransportError::Closed)?,
        };
        let Some(ingest_response::Msg::Welcome(welcome)) = welcome.msg else {
            return Err(TransportError::Protocol(
                "first answer is not a welcome".into(),
            ));
        };
        {
            let mut spool = self.spool.lock().expect("spool lock");
            if welcome.stored_up_to_seq > spool.last_written_seq() {
                tracing::warn!(
                    hub_has = welcome.stored_up_to_seq,
                    spool_has = spool.last_written_seq(),
                    "the hub holds newer samples than this spool (its state was lost); numbering continues above the hub's"
                );
                spool.ack(welcome.stored_up_to_seq)?;
            }
        }
        backoff.reset();
        tracing::info!(hub = %self.hub, "streaming to hub");

        let mut last_sent = self.spool.lock().expect("spool lock").acked_seq();
        let mut in_flight: VecDeque<(u64, tokio::time::Instant)> = VecDeque::new();
        loop {
            while in_flight.len() < WINDOW {
                let records = self.spool.lock().expect("spool lock").read_after(
                    last_sent,
                    self.batch_max_samples,
                    BATCH_MAX_BYTES,
                )?;
                let Some(&(last, _)) = records.last() else {
                    break;
                };
                let mut samples = Vec::with_capacity(records.len());
                for (seq, bytes) in records {
                    samples.push(
                        Sample::decode(bytes.as_slice())
                            .map_err(|source| TransportError::Decode { seq, source })?,
                    );
                }
                let n = samples.len() as u64;
                tx.send(IngestRequest {
                    msg: Some(ingest_request::Msg::Batch(TelemetryBatch { samples })),
                })
                .await
                .map_err(|_| TransportError::Closed)?;
                self.stats.samples_sent.fetch_add(n, Ordering::Relaxed);
                last_sent = last;
                in_flight.push_back((last, tokio::time::Instant::now()));
            }
            if in_flight.is_empty() && self.drained() {
                return Ok(Stopped::Drained);
            }
            let ack_deadline = in_flight.front().map(|(_, t)| *t + ACK_TIMEOUT);
            tokio::select! {
                _ = shutdown.changed() => return Ok(Stopped::Shutdown),
                _ = self.new_data.notified() => {}
                _ = self.sampling_done.changed() => {}
                _ = async { tokio::time::sleep_until(ack_deadline.expect("set")).await }, if ack_deadline.is_some() => {
                    return Err(TransportError::AckTimeout(ACK_TIMEOUT));
                }
                msg = responses.message() => {
                    let msg = msg?.ok_or(TransportError::Closed)?;
                    let Some(ingest_response::Msg::Ack(ack)) = msg.msg else {
                        return Err(TransportError::Protocol("expected an ack".into()));
                    };
                    for r in &ack.rejected {
                        tracing::warn!(seq = r.seq, reason = %r.reason, "hub rejected a sample for good; it is dropped");
                    }
                    self.stats.samples_rejected.fetch_add(ack.rejected.len() as u64, Ordering::Relaxed);
                    self.stats.samples_acked.fetch_add(u64::from(ack.accepted + ack.duplicates), Ordering::Relaxed);
                    self.spool.lock().expect("spool lock").ack(ack.up_to_seq)?;
                    while in_flight.front().is_some_and(|(s, _)| *s <= ack.up_to_seq) {
                        in_flight.pop_front();
                    }
                }
            }
        }
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
    fn backoff_is_jittered() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "delays differ between agents");
    }
}
