//! The Open Inference Protocol over REST (JSON tensors): health, server and model metadata,
//! readiness and inference under `/v2`. Errors answer `{"error": "…"}` with 400 (bad input)
//! or 404 (no such model or version), as the protocol's error form says.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::model::{Data, ModelError, NamedTensor};
use super::repo::Repository;
use super::{SERVER_NAME, infer_named};

/// The `/v2` routes over `repo`.
pub fn router(repo: Arc<Repository>) -> Router {
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
        .with_state(repo)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
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
    body: axum::body::Bytes,
) -> Response {
    run(repo, name, String::new(), body).await
}

async fn infer_at(
    State(repo): State<Arc<Repository>>,
    Path((name, version)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    run(repo, name, version, body).await
}

async fn run(
    repo: Arc<Repository>,
    name: String,
    version: String,
    body: axum::body::Bytes,
) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let inputs = match parse_inputs(&request) {
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
    let mut answer = json!({
        "model_name": name,
        "model_version": version,
        "outputs": outputs.iter().map(tensor_json).collect::<Vec<_>>(),
    });
    if let Some(id) = request.get("id") {
        answer["id"] = id.clone();
    }
    Json(answer).into_response()
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

/// The request's input tensors (JSON data, flat or nested).
fn parse_inputs(request: &Value) -> Result<Vec<NamedTensor>, String> {
    let inputs = request["inputs"]
        .as_array()
        .ok_or("the request has no \"inputs\" array")?;
    inputs.iter().map(parse_tensor).collect()
}

fn parse_tensor(t: &Value) -> Result<NamedTensor, String> {
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
