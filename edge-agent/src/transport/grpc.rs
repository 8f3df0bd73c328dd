//! The gRPC transport: drains the spool to the hub over one bidirectional stream, trims on the
//! hub's acknowledgements, and reconnects with exponential backoff and jitter.

use std::sync::atomic::Ordering;
use std::time::Duration;

use shoal_proto::v1::ingest_client::IngestClient;
use shoal_proto::v1::{IngestRequest, IngestResponse, ingest_request, ingest_response};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use super::inflight::InFlight;
use super::{Backoff, Sender, Stopped, TransportError, WINDOW};

impl Sender {
    pub(super) async fn grpc_stream_once(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<Stopped, TransportError> {
        if self.drained() {
            return Ok(Stopped::Drained);
        }
        let client = self.connect().await?;
        let (tx, mut responses) = self.open_stream(client).await?;
        self.stats.connected.store(true, Ordering::Relaxed);
        backoff.reset();
        tracing::info!(hub = %self.hub, "streaming to hub");

        let mut last_sent = self.spool.lock().expect("spool lock").acked_seq();
        let mut in_flight = InFlight::default();
        loop {
            while in_flight.len() < WINDOW {
                let Some((first, last, batch)) = self.next_batch(last_sent)? else {
                    break;
                };
                let n = batch.samples.len() as u64;
                tx.send(IngestRequest {
                    msg: Some(ingest_request::Msg::Batch(batch)),
                })
                .await
                .map_err(|_| TransportError::Closed)?;
                self.stats.samples_sent.fetch_add(n, Ordering::Relaxed);
                last_sent = last;
                in_flight.sent(first, last, std::time::Instant::now());
            }
            if in_flight.is_empty() && self.drained() {
                return Ok(Stopped::Drained);
            }
            let ack_deadline = in_flight
                .oldest_unacked()
                .map(|t| tokio::time::Instant::from_std(t + self.ack_timeout));
            tokio::select! {
                _ = shutdown.changed() => return Ok(Stopped::Shutdown),
                _ = self.new_data.notified() => {}
                _ = self.sampling_done.changed() => {}
                _ = async { tokio::time::sleep_until(ack_deadline.expect("set")).await }, if ack_deadline.is_some() => {
                    return Err(TransportError::AckTimeout(self.ack_timeout));
                }
                msg = responses.message() => {
                    let msg = msg?.ok_or(TransportError::Closed)?;
                    let Some(ingest_response::Msg::Ack(ack)) = msg.msg else {
                        return Err(TransportError::Protocol("expected an ack".into()));
                    };
                    self.on_ack(&ack, &mut in_flight)?;
                }
            }
        }
    }

    /// A gRPC client of the hub, connected.
    async fn connect(&self) -> Result<IngestClient<Channel>, TransportError> {
        let connect_error = |source| TransportError::Connect {
            hub: self.hub.clone(),
            source,
        };
        let endpoint = Endpoint::from_shared(self.hub.clone())
            .map_err(connect_error)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = match &self.grpc_tls {
            Some(tls) => {
                let config = tls.read().expect("tls lock").clone();
                endpoint
                    .connect_with_connector(crate::identity::connector(config))
                    .await
            }
            None => endpoint.connect().await,
        }
        .map_err(connect_error)?;
        Ok(IngestClient::new(channel)
            .max_encoding_message_size(shoal_proto::DEFAULT_MAX_MESSAGE_BYTES)
            .max_decoding_message_size(shoal_proto::DEFAULT_MAX_MESSAGE_BYTES))
    }

    /// Opens the stream: the hello out, the hub's welcome back (and acted on).
    async fn open_stream(
        &self,
        mut client: IngestClient<Channel>,
    ) -> Result<(mpsc::Sender<IngestRequest>, Streaming<IngestResponse>), TransportError> {
        let (tx, rx) = mpsc::channel::<IngestRequest>(WINDOW + 1);
        let mut hello = self.hello.clone();
        hello.last_written_seq = self.spool.lock().expect("spool lock").last_written_seq();
        tx.send(IngestRequest {
            msg: Some(ingest_request::Msg::Hello(hello)),
        })
        .await
        .map_err(|_| TransportError::Closed)?;
        let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match tokio::time::timeout(self.ack_timeout, responses.message()).await {
            Err(_) => return Err(TransportError::AckTimeout(self.ack_timeout)),
            Ok(r) => r?.ok_or(TransportError::Closed)?,
        };
        let Some(ingest_response::Msg::Welcome(welcome)) = welcome.msg else {
            return Err(TransportError::Protocol(
                "first answer is not a welcome".into(),
            ));
        };
        self.on_welcome(&welcome)?;
        Ok((tx, responses))
    }
}
