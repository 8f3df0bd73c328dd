//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`). Inputs come as
//! typed contents or as `raw_input_contents` (little-endian, what Triton's client sends);
//! outputs go out as `raw_output_contents` (what Triton's client reads) — both forms per the
//! protocol.

use std::sync::Arc;

use shoal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shoal_proto::inference::model_infer_response::InferOutputTensor;
use shoal_proto::inference::model_metadata_response::TensorMetadata;
use shoal_proto::inference::*;
use tonic::{Request, Response, Status};

use super::model::{Data, ModelError, NamedTensor, TensorSpec, unsupported};
use super::repo::Repository;
use super::{SERVER_NAME, infer_named};

pub struct Service {
    repo: Arc<Repository>,
}

impl Service {
    pub fn new(repo: Arc<Repository>) -> Self {
        Self { repo }
    }
}

fn meta(specs: &[TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|s| TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.clone(),
            shape: s.shape.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = self.repo.get(&r.name, &r.version).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let (_, m) = self
            .repo
            .get(&r.name, &r.version)
            .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(ModelMetadataResponse {
            versions: self.repo.versions(&r.name),
            name: r.name,
            platform: "onnx".into(),
            inputs: meta(&m.inputs),
            outputs: meta(&m.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let r = request.into_inner();
        let (version, model) = self
            .repo
            .get(&r.model_name, &r.model_version)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let inputs = decode_inputs(&r).map_err(Status::invalid_argument)?;
        let requested = r.outputs.iter().map(|o| o.name.clone()).collect();
        let outputs = infer_named(model, inputs, requested)
            .await
            .map_err(|e| match e {
                ModelError::BadInput(m) => Status::invalid_argument(m),
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(ModelInferResponse {
            model_name: r.model_name,
            model_version: version,
            id: r.id,
            parameters: Default::default(),
            raw_output_contents: outputs.iter().map(|t| t.data.to_le_bytes()).collect(),
            outputs: outputs
                .into_iter()
                .map(|t| InferOutputTensor {
                    name: t.name,
                    datatype: t.data.datatype().into(),
                    shape: t.shape,
                    parameters: Default::default(),
                    contents: None,
                })
                .collect(),
        }))
    }
}

/// The request's tensors from their typed contents or, when given, the raw contents.
fn decode_inputs(r: &ModelInferRequest) -> Result<Vec<NamedTensor>, String> {
    if !r.raw_input_contents.is_empty() && r.raw_input_contents.len() != r.inputs.len() {
        return Err(format!(
            "{} raw_input_contents for {} inputs",
            r.raw_input_contents.len(),
            r.inputs.len()
        ));
    }
    r.inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let data = match r.raw_input_contents.get(i) {
                Some(raw) => Data::from_le_bytes(&t.datatype, raw),
                None => from_contents(&t.datatype, t.contents.clone().unwrap_or_default()),
            }
            .map_err(|e| format!("input {:?}: {e}", t.name))?;
            Ok(NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data,
            })
        })
        .collect()
}

fn from_contents(datatype: &str, c: InferTensorContents) -> Result<Data, String> {
    Ok(match datatype {
        "FP32" => Data::Fp32(c.fp32_contents),
        "FP64" => Data::Fp64(c.fp64_contents),
        "INT32" => Data::Int32(c.int_contents),
        "INT64" => Data::Int64(c.int64_contents),
        "BOOL" => Data::Bool(c.bool_contents),
        other => return Err(unsupported(other)),
    })
}
