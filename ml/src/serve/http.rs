//! The Open Inference Protocol over REST: health, server and model metadata, readiness and
//! inference under `/v2`, with tensors as JSON or in the binary tensor data extension (what
//! Triton's client sends by default: a JSON header of `Inference-Header-Content-Length` bytes,
//! then each binary tensor's little-endian bytes), and the statistics extension's per-version
//! counters. Errors answer `{"error": "…"}` with 400 (bad input), 404 (no such model or
//! version) or 413 (a request over the size limit), as the protocol's error form says.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::model::{Data, ModelError, NamedTensor};
use super::repo::{NotFound, Repository};
use super::{SERVER_NAME, infer_named};

/// Largest request body, JSON or binary.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;
/// The binary tensor data extension's header: the JSON part's length.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// The `/v2` routes over `repo`, for a router of any state.
pub fn router<S: Clone + Send + Sync + 'static>(repo: Arc<Repository>) -> Router<S> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route(
            "/v2/health/live",
            get(|| async { Json(json!({ "live": true })) }),
        )
        .route(
            "/v2/health/ready",
            get(|| async { Json(json!({ "ready": true })) }),
        )
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_at),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_at),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_at))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{name}/stats", get(model_stats))
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(model_stats_at),
        )
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(repo)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "statistics"],
    }))
}

async fn model_metadata(State(repo): State<Arc<Repository>>, Path(name): Path<String>) -> Response {
    metadata(&repo, &name, "")
}

async fn model_metadata_at(
    State(repo): State<Arc<Repository>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(&repo, &name, &version)
}

fn metadata(repo: &Repository, name: &str, version: &str) -> Response {
    match repo.get(name, version) {
        Ok((_, m)) => Json(json!({
            "name": name,
            "versions": repo.versions(name),
            "platform": "onnx",
            "inputs": m.inputs,
            "outputs": m.outputs,
        }))
        .into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

async fn model_ready(State(repo): State<Arc<Repository>>, Path(name): Path<String>) -> Response {
    ready(&repo, &name, "")
}

async fn model_ready_at(
    State(repo): State<Arc<Repository>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    ready(&repo, &name, &version)
}

fn ready(repo: &Repository, name: &str, version: &str) -> Response {
    match repo.get(name, version) {
        Ok(_) => Json(json!({ "name": name, "ready": true })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

async fn infer(
    State(repo): State<Arc<Repository>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(repo, name, String::new(), headers, body).await
}

async fn infer_at(
    State(repo): State<Arc<Repository>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(repo, name, version, headers, body).await
}

/// The JSON part and the binary part of a request body.
fn split_body(headers: &HeaderMap, body: Bytes) -> Result<(Value, Bytes), String> {
    let json_len = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n <= body.len())
            .ok_or_else(|| {
                format!(
                    "Inference-Header-Content-Length must be a byte count within the body's {} bytes",
                    body.len()
                )
            })?,
    };
    let request = serde_json::from_slice(&body[..json_len])
        .map_err(|e| format!("the request header is not JSON: {e}"))?;
    Ok((request, body.slice(json_len..)))
}

async fn run(
    repo: Arc<Repository>,
    name: String,
    version: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                e.status(),
                format!(
                    "cannot read the request ({}); requests are limited to {} MiB",
                    e.body_text(),
                    MAX_REQUEST_BYTES >> 20
                ),
            );
        }
    };
    let (request, binary) = match split_body(&headers, body) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let inputs = match parse_inputs(&request, binary) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let (version, model) = match repo.get(&name, &version) {
        Ok(found) => found,
        Err(e) => return error(StatusCode::NOT_FOUND, e),
    };
    let requested: Vec<String> = request["outputs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| o["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let outputs = match infer_named(model, inputs, requested).await {
        Ok(o) => o,
        Err(e @ ModelError::BadInput(_)) => return error(StatusCode::BAD_REQUEST, e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let binary = wants_binary(&request);
    let mut tail = Vec::new();
    let tensors: Vec<Value> = outputs
        .iter()
        .map(|t| {
            if binary(&t.name) {
                let bytes = t.data.to_le_bytes();
                let header = json!({
                    "name": t.name, "datatype": t.data.datatype(), "shape": t.shape,
                    "parameters": { "binary_data_size": bytes.len() },
                });
                tail.extend_from_slice(&bytes);
                header
            } else {
                tensor_json(t)
            }
        })
        .collect();
    let mut answer = json!({ "model_name": name, "model_version": version, "outputs": tensors });
    if let Some(id) = request.get("id") {
        answer["id"] = id.clone();
    }
    if tail.is_empty() {
        return Json(answer).into_response();
    }
    let mut body = serde_json::to_vec(&answer).expect("JSON serialises");
    let json_len = body.len();
    body.extend_from_slice(&tail);
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                json_len.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

/// Whether the request asks for output `name` as binary data: per output
/// (`parameters.binary_data`) or for all (`parameters.binary_data_output`).
fn wants_binary(request: &Value) -> impl Fn(&str) -> bool + '_ {
    let all = request["parameters"]["binary_data_output"].as_bool() == Some(true);
    move |name| {
        all || request["outputs"].as_array().is_some_and(|outputs| {
            outputs.iter().any(|o| {
                o["name"].as_str() == Some(name)
                    && o["parameters"]["binary_data"].as_bool() == Some(true)
            })
        })
    }
}

async fn all_stats(State(repo): State<Arc<Repository>>) -> Response {
    let names = repo.names();
    stats(&repo, &names, "")
}

async fn model_stats(State(repo): State<Arc<Repository>>, Path(name): Path<String>) -> Response {
    stats(&repo, &[name], "")
}

async fn model_stats_at(
    State(repo): State<Arc<Repository>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    stats(&repo, &[name], &version)
}

/// The statistics extension's answer for `names` (every version, or `version`).
fn stats(repo: &Repository, names: &[String], version: &str) -> Response {
    let mut out = Vec::new();
    for name in names {
        let versions = if version.is_empty() {
            repo.all(name)
        } else {
            match repo.get(name, version) {
                Ok(found) => vec![found],
                Err(e) => return error(StatusCode::NOT_FOUND, e),
            }
        };
        if versions.is_empty() {
            return error(StatusCode::NOT_FOUND, NotFound::Model(name.clone()));
        }
        for (v, m) in versions {
            let c = m.counters();
            let per = |n: u64| json!({ "count": n, "ns": if n > 0 { c.compute_ns } else { 0 } });
            out.push(json!({
                "name": name,
                "version": v,
                "last_inference": c.last_inference,
                "inference_count": c.inference_count,
                "execution_count": c.execution_count,
                "inference_stats": {
                    "success": per(c.success),
                    "fail": { "count": c.fail, "ns": 0 },
                    "compute_infer": per(c.execution_count),
                },
            }));
        }
    }
    Json(json!({ "model_stats": out })).into_response()
}

fn tensor_json(t: &NamedTensor) -> Value {
    let data = match &t.data {
        Data::Fp32(v) => json!(v),
        Data::Fp64(v) => json!(v),
        Data::Int32(v) => json!(v),
        Data::Int64(v) => json!(v),
        Data::Bool(v) => json!(v),
    };
    json!({ "name": t.name, "datatype": t.data.datatype(), "shape": t.shape, "data": data })
}

/// The request's input tensors: JSON data (flat or nested), or, for an input whose
/// `parameters.binary_data_size` is given, that many bytes of `binary`, in input order.
fn parse_inputs(request: &Value, mut binary: Bytes) -> Result<Vec<NamedTensor>, String> {
    let inputs = request["inputs"]
        .as_array()
        .ok_or("the request has no \"inputs\" array")?;
    let tensors = inputs
        .iter()
        .map(|t| match t["parameters"]["binary_data_size"].as_u64() {
            None => parse_tensor(t),
            Some(size) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                let (name, shape, datatype) = tensor_header(t)?;
                if size > binary.len() {
                    return Err(format!(
                        "input {name:?}: binary_data_size {size} but only {} bytes follow",
                        binary.len()
                    ));
                }
                let data = Data::from_le_bytes(datatype, &binary.split_to(size))
                    .map_err(|e| format!("input {name:?}: {e}"))?;
                Ok(NamedTensor { name, shape, data })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of binary data follow the inputs unclaimed",
            binary.len()
        ));
    }
    Ok(tensors)
}

/// A tensor's name, shape and datatype.
fn tensor_header(t: &Value) -> Result<(String, Vec<i64>, &str), String> {
    let name = t["name"]
        .as_str()
        .ok_or("an input has no \"name\"")?
        .to_string();
    let shape = t["shape"]
        .as_array()
        .ok_or_else(|| format!("input {name:?} has no \"shape\""))?
        .iter()
        .map(|d| {
            d.as_i64()
                .ok_or_else(|| format!("input {name:?}: shape holds a non-integer"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let datatype = t["datatype"]
        .as_str()
        .ok_or_else(|| format!("input {name:?} has no \"datatype\""))?;
    Ok((name, shape, datatype))
}

fn parse_tensor(t: &Value) -> Result<NamedTensor, String> {
    let (name, shape, datatype) = tensor_header(t)?;
    let mut flat = Vec::new();
    flatten(&t["data"], &mut flat);
    let bad = |what: &str| format!("input {name:?}: {datatype} data holds {what}");
    let data = match datatype {
        "FP32" => Data::Fp32(
            flat.iter()
                .map(|v| {
                    v.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| bad("a non-number"))
                })
                .collect::<Result<_, _>>()?,
        ),
        "FP64" => Data::Fp64(
            flat.iter()
                .map(|v| v.as_f64().ok_or_else(|| bad("a non-number")))
                .collect::<Result<_, _>>()?,
        ),
        "INT32" => Data::Int32(
            flat.iter()
                .map(|v| {
                    v.as_i64()
                        .and_then(|x| i32::try_from(x).ok())
                        .ok_or_else(|| bad("a non-int32"))
                })
                .collect::<Result<_, _>>()?,
        ),
        "INT64" => Data::Int64(
            flat.iter()
                .map(|v| v.as_i64().ok_or_else(|| bad("a non-integer")))
                .collect::<Result<_, _>>()?,
        ),
        "BOOL" => Data::Bool(
            flat.iter()
                .map(|v| v.as_bool().ok_or_else(|| bad("a non-boolean")))
                .collect::<Result<_, _>>()?,
        ),
        other => {
            return Err(format!(
                "input {name:?}: datatype {other:?} is not served (FP32, FP64, INT32, INT64, BOOL)"
            ));
        }
    };
    Ok(NamedTensor { name, shape, data })
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}
