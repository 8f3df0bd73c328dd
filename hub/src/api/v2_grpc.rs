//! The embedded model server over gRPC (`inference.GRPCInferenceService`), on the hub's gRPC
//! port beside ingest, behind the same tokens as `/v2`: `authorization: Bearer TOKEN`
//! metadata, any role. Each call is checked, then answered by `shoal-ml`'s own service over
//! the hub's repository.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use shoal_ml::serve::repo::Repository;
use shoal_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use shoal_proto::inference::*;
use tonic::{Request, Response, Status};

use super::access::{Denied, authenticate};
use super::state::AuthState;

pub struct Inference {
    inner: shoal_ml::serve::grpc::Service,
    auth: AuthState,
}

/// The service, ready for the hub's gRPC routes.
pub fn server(repo: Arc<Repository>, auth: AuthState) -> GrpcInferenceServiceServer<Inference> {
    GrpcInferenceServiceServer::new(Inference {
        inner: shoal_ml::serve::grpc::Service::new(repo),
        auth,
    })
    .max_decoding_message_size(shoal_ml::serve::http::MAX_REQUEST_BYTES)
    .max_encoding_message_size(shoal_ml::serve::http::MAX_REQUEST_BYTES)
}

impl Inference {
    async fn check<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let mut headers = HeaderMap::new();
        if let Some(v) = r
            .metadata()
            .get("authorization")
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            headers.insert(header::AUTHORIZATION, v);
        }
        match authenticate(&self.auth, &headers).await {
            Ok(_) => Ok(()),
            Err(Denied(status, _, message)) if status == StatusCode::FORBIDDEN => {
                Err(Status::permission_denied(message))
            }
            Err(Denied(_, _, message)) => Err(Status::unauthenticated(message)),
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        r: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        self.check(&r).await?;
        self.inner.server_live(r).await
    }

    async fn server_ready(
        &self,
        r: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        self.check(&r).await?;
        self.inner.server_ready(r).await
    }

    async fn model_ready(
        &self,
        r: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.check(&r).await?;
        self.inner.model_ready(r).await
    }

    async fn server_metadata(
        &self,
        r: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.check(&r).await?;
        self.inner.server_metadata(r).await
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.check(&r).await?;
        self.inner.model_metadata(r).await
    }

    async fn model_infer(
        &self,
        r: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.check(&r).await?;
        self.inner.model_infer(r).await
    }
}
