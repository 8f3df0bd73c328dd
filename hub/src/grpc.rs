//! The gRPC port's accept loop. Hand-rolled (rather than tonic's `Server`) so that every
//! connection that ends in an error — garbage bytes, a broken HTTP/2 session — is counted in
//! `/metrics`, and so that shutdown drains open streams with a deadline. HTTP/1 requests (and
//! bytes that are not HTTP/2) get an HTTP/1 `400 Bad Request` instead of a silent close.

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use shoal_proto::v1::ingest_server::IngestServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::DRAIN_GRACE;
use crate::ingest::{IngestLimits, IngestService};
use crate::metrics::Metrics;

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
