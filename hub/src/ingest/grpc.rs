//! gRPC ingest: the `shoal.v1.Ingest` service over the [`Ingestor`], and the port's accept loop.
//!
//! The accept loop is hand-rolled (rather than tonic's `Server`) so that every
//! connection that ends in an error — garbage bytes, a broken HTTP/2 session — is counted in
//! `/metrics`, and so that shutdown drains open streams with a deadline. HTTP/1 requests (and
//! bytes that are not HTTP/2) get an HTTP/1 `400 Bad Request` instead of a silent close.

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use shoal_proto::v1::ingest_server::{Ingest, IngestServer};
use shoal_proto::v1::{IngestRequest, IngestResponse, Welcome, ingest_request, ingest_response};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::{DRAIN_GRACE, HelloError, IngestLimits, Ingestor};
use crate::metrics::{Metrics, StreamReject};

pub async fn serve(
    listener: TcpListener,
    service: IngestService,
    limits: IngestLimits,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let svc = IngestServer::new(service)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let routes = tonic::service::Routes::new(svc).prepare();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                metrics.grpc_connections.inc();
                let conn = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(routes.clone()))
                    .into_owned();
                let conn = graceful.watch(conn);
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        metrics.grpc_connection_errors.inc();
                        tracing::debug!(%peer, error = %e, "gRPC connection ended with an error");
                    }
                });
            }
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => break,
        }
    }
    drop(routes);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_GRACE) => tracing::warn!("ingest connections still open after the drain deadline; closing them"),
    }
    Ok(())
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
        let (device_id, welcome) = open(&ingestor, &mut inbound, &peer, max_bytes).await?;
        tracing::debug!(device_id = %device_id, stored_up_to_seq = welcome.stored_up_to_seq, "device connected");

        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(IngestResponse {
                msg: Some(ingest_response::Msg::Welcome(welcome)),
            }))
            .await;
        tokio::spawn(ingest_batches(ingestor, device_id, inbound, tx, max_bytes));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Reads the stream's first message, which must be a hello, and registers its device; what is
/// refused is counted.
async fn open(
    ingestor: &Ingestor,
    inbound: &mut Streaming<IngestRequest>,
    peer: &str,
    max_bytes: usize,
) -> Result<(String, Welcome), Status> {
    let first = match inbound.message().await {
        Ok(m) => m,
        Err(status) => {
            return Err(match classify(&status, max_bytes) {
                Some((why, answer)) => {
                    ingestor.refuse(why, peer, status.message());
                    answer
                }
                None => status,
            });
        }
    };
    let hello = match first.and_then(|m| m.msg) {
        Some(ingest_request::Msg::Hello(h)) => h,
        _ => {
            ingestor.refuse(StreamReject::NoHello, peer, "first message is not a hello");
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
    Ok((device_id, welcome))
}

/// Stores the batches that follow the hello, acking each on `tx`, until the stream ends or
/// fails.
async fn ingest_batches(
    ingestor: Ingestor,
    device_id: String,
    mut inbound: Streaming<IngestRequest>,
    tx: mpsc::Sender<Result<IngestResponse, Status>>,
    max_bytes: usize,
) {
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
}
