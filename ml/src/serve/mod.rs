//! Serving models: an ONNX model loaded into a runtime ([`model`]) and named, versioned
//! tensors in and out in the Open Inference Protocol's (KServe V2) terms.
//!
//! The runtime is `tract-onnx`, pure Rust from crates.io: it builds for every target the
//! agent and hub build for (aarch64 and armv7 included) with no native library to download,
//! which onnxruntime's Rust bindings need. The test suite checks its outputs against
//! onnxruntime itself.

pub mod batch;
pub mod grpc;
pub mod http;
pub mod model;
pub mod repo;
pub mod source;

use std::sync::Arc;

use self::model::{LoadedModel, ModelError, NamedTensor};
use self::repo::Repository;

/// The name the server reports in its metadata.
pub const SERVER_NAME: &str = "shoal-ml";

/// Runs `model` on `inputs` off the async threads, stacked with concurrent requests; keeps the outputs named in `requested`
/// (all when empty), refusing a name the model does not produce.
pub async fn infer_named(
    model: Arc<LoadedModel>,
    inputs: Vec<NamedTensor>,
    requested: Vec<String>,
) -> Result<Vec<NamedTensor>, ModelError> {
    if let Some(unknown) = requested
        .iter()
        .find(|r| !model.outputs.iter().any(|o| &o.name == *r))
    {
        return Err(ModelError::BadInput(format!(
            "the model has no output {unknown:?}"
        )));
    }
    let outputs = batch::infer(model, inputs).await?;
    Ok(outputs
        .into_iter()
        .filter(|o| requested.is_empty() || requested.contains(&o.name))
        .collect())
}

/// Serves `repo` over REST on `http` and gRPC on `grpc` until `shutdown` resolves.
pub async fn run(
    repo: Arc<Repository>,
    http: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let rest = {
        let mut rx = rx.clone();
        axum::serve(http, http::router::<()>(repo.clone())).with_graceful_shutdown(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
    };
    let mut grpc_rx = rx;
    let service =
        shoal_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            grpc::Service::new(repo),
        )
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let grpc = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            async move {
                let _ = grpc_rx.wait_for(|s| *s).await;
            },
        );
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let (a, b) = tokio::join!(rest, grpc);
    a?;
    b.map_err(std::io::Error::other)
}
