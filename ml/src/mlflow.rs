//! An MLflow tracking client over its REST API (`/api/2.0/mlflow/…`): experiments, runs,
//! params, metrics per step, tags, artifacts through the tracking server's artifact proxy
//! (`/api/2.0/mlflow-artifacts/artifacts/…`), and the Model Registry.
//!
//! Every call is retried with backoff (1 s, 2 s, 4 s) when the server cannot be reached or
//! answers 5xx; a 4xx is the caller's mistake and is not retried. Connections are not pooled,
//! so each call stands alone and a restarted server is picked up at once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    #[error("MLflow at {uri} could not be reached ({attempts} attempts): {reason}")]
    Unreachable {
        uri: String,
        attempts: u32,
        reason: String,
    },
    #[error("MLflow {endpoint}: HTTP {status}: {message}")]
    Api {
        endpoint: String,
        status: u16,
        /// MLflow's error code, e.g. RESOURCE_DOES_NOT_EXIST.
        code: String,
        message: String,
    },
    #[error("MLflow tracking URI {0:?}: only http:// and https:// tracking servers are supported")]
    Uri(String),
    #[error(
        "MLflow run {run_id}: artifact location {uri:?} is not proxied by the tracking server (start it with artifact serving on, e.g. --artifacts-destination)"
    )]
    NotProxied { run_id: String, uri: String },
}

impl MlflowError {
    fn code(&self) -> Option<&str> {
        match self {
            MlflowError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A tracking server.
#[derive(Clone, Debug)]
pub struct Mlflow {
    base: String,
    http: reqwest::Client,
    attempts: u32,
    backoff: Duration,
}

/// A created run.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: String,
    pub artifact_uri: String,
}

/// A registered model and its newest versions.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredModel {
    pub name: String,
    pub description: String,
    /// Newest first.
    pub versions: Vec<ModelVersion>,
}

/// A version of a registered model, with what its training run recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelVersion {
    pub version: String,
    /// `READY`, `PENDING_REGISTRATION` or `FAILED_REGISTRATION`.
    pub status: String,
    pub created_ms: i64,
    /// Where its files are (an artifact URI).
    pub source: String,
    /// The run that made it; empty when registered without one.
    pub run_id: String,
    /// The run's latest value of each metric.
    pub metrics: BTreeMap<String, f64>,
    /// The run's parameters.
    pub params: BTreeMap<String, String>,
    /// The run's tags that are Shoal's (`shoal.dataset_uri`, `shoal.dataset_sha256`, ...).
    pub tags: BTreeMap<String, String>,
}

/// A metric point.
#[derive(Debug, Clone)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub step: i64,
    pub timestamp_ms: i64,
}

impl Mlflow {
    pub fn new(uri: &str) -> Result<Self, MlflowError> {
        let base = uri.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(MlflowError::Uri(uri.to_string()));
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| MlflowError::Unreachable {
                uri: base.clone(),
                attempts: 0,
                reason: e.to_string(),
            })?;
        Ok(Self {
            base,
            http,
            attempts: 4,
            backoff: Duration::from_secs(1),
        })
    }

    /// Fewer or faster retries (tests).
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    pub fn uri(&self) -> &str {
        &self.base
    }

    /// The body of a successful answer, retrying unreachable and 5xx; a 4xx is an `Api` error.
    async fn send_raw(
        &self,
        endpoint: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes, MlflowError> {
        let mut delay = self.backoff;
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            let resp = match make().send().await {
                Ok(r) => r,
                Err(e) => {
                    last = causes(&e);
                    tracing::warn!(%endpoint, attempt, error = %last, "MLflow unreachable");
                    continue;
                }
            };
            let status = resp.status();
            let body = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    last = causes(&e);
                    continue;
                }
            };
            if status.is_server_error() {
                last = format!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                tracing::warn!(%endpoint, attempt, error = %last, "MLflow server error");
                continue;
            }
            if !status.is_success() {
                let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                return Err(MlflowError::Api {
                    endpoint: endpoint.to_string(),
                    status: status.as_u16(),
                    code: json["error_code"].as_str().unwrap_or_default().to_string(),
                    message: json["message"].as_str().map_or_else(
                        || String::from_utf8_lossy(&body).into_owned(),
                        str::to_string,
                    ),
                });
            }
            return Ok(body);
        }
        Err(MlflowError::Unreachable {
            uri: self.base.clone(),
            attempts: self.attempts,
            reason: last,
        })
    }

    async fn send(
        &self,
        endpoint: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Value, MlflowError> {
        let body = self.send_raw(endpoint, make).await?;
        Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        self.send(path, || self.http.post(&url).json(&body)).await
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        self.send(path, || self.http.get(&url).query(query)).await
    }

    /// The id of experiment `name`, created when missing.
    pub async fn experiment(&self, name: &str) -> Result<String, MlflowError> {
        match self
            .get("experiments/get-by-name", &[("experiment_name", name)])
            .await
        {
            Ok(v) => Ok(v["experiment"]["experiment_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()),
            Err(e) if e.code() == Some("RESOURCE_DOES_NOT_EXIST") => {
                match self
                    .post("experiments/create", json!({ "name": name }))
                    .await
                {
                    Ok(v) => Ok(v["experiment_id"].as_str().unwrap_or_default().to_string()),
                    // Created meanwhile by someone else.
                    Err(e) if e.code() == Some("RESOURCE_ALREADY_EXISTS") => {
                        let v = self
                            .get("experiments/get-by-name", &[("experiment_name", name)])
                            .await?;
                        Ok(v["experiment"]["experiment_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string())
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub async fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        tags: &[(String, String)],
    ) -> Result<RunInfo, MlflowError> {
        let v = self
            .post(
                "runs/create",
                json!({
                    "experiment_id": experiment_id,
                    "run_name": run_name,
                    "start_time": chrono::Utc::now().timestamp_millis(),
                    "tags": tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect::<Vec<_>>(),
                }),
            )
            .await?;
        let info = &v["run"]["info"];
        Ok(RunInfo {
            run_id: info["run_id"].as_str().unwrap_or_default().to_string(),
            experiment_id: experiment_id.to_string(),
            artifact_uri: info["artifact_uri"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
    }

    pub async fn log_batch(
        &self,
        run_id: &str,
        params: &[(String, String)],
        metrics: &[Metric],
        tags: &[(String, String)],
    ) -> Result<(), MlflowError> {
        let kv = |list: &[(String, String)]| {
            list.iter()
                .map(|(k, v)| json!({ "key": k, "value": v }))
                .collect::<Vec<_>>()
        };
        self.post(
            "runs/log-batch",
            json!({
                "run_id": run_id,
                "params": kv(params),
                "tags": kv(tags),
                "metrics": metrics.iter().map(|m| json!({
                    "key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp_ms,
                })).collect::<Vec<_>>(),
            }),
        )
        .await
        .map(|_| ())
    }

    /// Ends a run: `FINISHED`, `FAILED` or `KILLED`.
    pub async fn end_run(&self, run_id: &str, status: &str) -> Result<(), MlflowError> {
        self.post(
            "runs/update",
            json!({ "run_id": run_id, "status": status, "end_time": chrono::Utc::now().timestamp_millis() }),
        )
        .await
        .map(|_| ())
    }

    pub async fn set_tag(&self, run_id: &str, key: &str, value: &str) -> Result<(), MlflowError> {
        self.post(
            "runs/set-tag",
            json!({ "run_id": run_id, "key": key, "value": value }),
        )
        .await
        .map(|_| ())
    }

    /// Runs of `experiment_id` carrying tag `key` = `value` that are still RUNNING.
    pub async fn running_with_tag(
        &self,
        experiment_id: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, MlflowError> {
        let v = self
            .post(
                "runs/search",
                json!({
                    "experiment_ids": [experiment_id],
                    "filter": format!("tags.`{key}` = '{}' and attributes.status = 'RUNNING'", value.replace('\'', "")),
                    "max_results": 100,
                }),
            )
            .await?;
        Ok(v["runs"]
            .as_array()
            .map(|runs| {
                runs.iter()
                    .filter_map(|r| r["info"]["run_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Uploads an artifact of `run` through the tracking server's proxy.
    pub async fn upload(
        &self,
        run: &RunInfo,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<(), MlflowError> {
        let url = self
            .proxied(&run.artifact_uri, path)
            .ok_or_else(|| MlflowError::NotProxied {
                run_id: run.run_id.clone(),
                uri: run.artifact_uri.clone(),
            })?;
        let endpoint = format!("mlflow-artifacts/{path}");
        let body = bytes::Bytes::from(bytes);
        self.send(&endpoint, || self.http.put(&url).body(body.clone()))
            .await
            .map(|_| ())
    }

    /// The proxy URL of `path` under an `mlflow-artifacts:` location; `None` for others.
    fn proxied(&self, artifact_uri: &str, path: &str) -> Option<String> {
        let rest = artifact_uri.strip_prefix("mlflow-artifacts:")?;
        // "mlflow-artifacts:/1/abc/artifacts" or "mlflow-artifacts://host:port/1/abc/artifacts"
        let rest = match rest.strip_prefix("//") {
            Some(r) => r.split_once('/').map_or("", |(_, p)| p),
            None => rest.trim_start_matches('/'),
        };
        let rest = rest.trim_end_matches('/');
        Some(format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{rest}/{path}",
            self.base
        ))
    }

    /// Downloads `path` under `artifact_uri` (an `mlflow-artifacts:` location) through the
    /// tracking server's proxy.
    pub async fn download(&self, artifact_uri: &str, path: &str) -> Result<Vec<u8>, MlflowError> {
        let url = self
            .proxied(artifact_uri, path)
            .ok_or_else(|| MlflowError::NotProxied {
                run_id: String::new(),
                uri: artifact_uri.to_string(),
            })?;
        let endpoint = format!("mlflow-artifacts/{path}");
        self.send_raw(&endpoint, || self.http.get(&url))
            .await
            .map(|b| b.to_vec())
    }

    /// Where registered model `name` version `version` ("latest": the newest) keeps its files,
    /// and that version's number.
    pub async fn model_version_source(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(String, String), MlflowError> {
        let version = if version == "latest" {
            let v = self
                .post(
                    "registered-models/get-latest-versions",
                    json!({ "name": name }),
                )
                .await?;
            v["model_versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["version"].as_str()?.parse::<u64>().ok())
                .max()
                .map(|v| v.to_string())
                .ok_or_else(|| MlflowError::Api {
                    endpoint: "registered-models/get-latest-versions".into(),
                    status: 404,
                    code: "RESOURCE_DOES_NOT_EXIST".into(),
                    message: format!("registered model {name:?} has no versions"),
                })?
        } else {
            version.to_string()
        };
        let v = self
            .get(
                "model-versions/get",
                &[("name", name), ("version", version.as_str())],
            )
            .await?;
        let source = v["model_version"]["source"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok((source, version))
    }

    /// Registers `source` as a new version of model `name` (creating the model when missing);
    /// returns the version.
    pub async fn register(
        &self,
        name: &str,
        source: &str,
        run_id: &str,
        tags: &[(String, String)],
    ) -> Result<String, MlflowError> {
        match self
            .post("registered-models/create", json!({ "name": name }))
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some("RESOURCE_ALREADY_EXISTS") => {}
            Err(e) => return Err(e),
        }
        let v = self
            .post(
                "model-versions/create",
                json!({
                    "name": name,
                    "source": source,
                    "run_id": run_id,
                    "tags": tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect::<Vec<_>>(),
                }),
            )
            .await?;
        Ok(v["model_version"]["version"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

impl Mlflow {
    /// The registry: up to `models` registered models (by name), each with its newest
    /// `versions` versions and what their runs recorded (metrics, parameters, Shoal's tags).
    pub async fn registered_models(
        &self,
        models: usize,
        versions: usize,
    ) -> Result<Vec<RegisteredModel>, MlflowError> {
        let found = self
            .get(
                "registered-models/search",
                &[
                    ("max_results", &models.to_string()),
                    ("order_by", "name ASC"),
                ],
            )
            .await?;
        let mut out = Vec::new();
        for m in found["registered_models"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or_default().to_string();
            let filter = format!("name='{}'", name.replace('\'', "\\'"));
            let listed = self
                .get(
                    "model-versions/search",
                    &[
                        ("filter", filter.as_str()),
                        ("max_results", "1000"),
                        ("order_by", "version_number DESC"),
                    ],
                )
                .await?;
            let mut found: Vec<&Value> = listed["model_versions"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            // Newest first, whatever order the server kept.
            found.sort_by_key(|v| {
                std::cmp::Reverse(v["version"].as_str().and_then(|x| x.parse::<u64>().ok()))
            });
            let mut list = Vec::new();
            for v in found.into_iter().take(versions) {
                let run_id = v["run_id"].as_str().unwrap_or_default().to_string();
                let run = if run_id.is_empty() {
                    Value::Null
                } else {
                    match self.get("runs/get", &[("run_id", run_id.as_str())]).await {
                        Ok(run) => run,
                        // Its run was deleted (`mlflow gc`): the version stands without it.
                        Err(e) if e.code() == Some("RESOURCE_DOES_NOT_EXIST") => Value::Null,
                        Err(e) => return Err(e),
                    }
                };
                let pairs = |key: &str| -> BTreeMap<String, Value> {
                    run["run"]["data"][key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| Some((p["key"].as_str()?.to_string(), p["value"].clone())))
                        .collect()
                };
                let text = |v: Value| v.as_str().map(str::to_string);
                list.push(ModelVersion {
                    version: v["version"].as_str().unwrap_or_default().to_string(),
                    status: v["status"].as_str().unwrap_or_default().to_string(),
                    created_ms: v["creation_timestamp"].as_i64().unwrap_or_default(),
                    source: v["source"].as_str().unwrap_or_default().to_string(),
                    run_id,
                    metrics: pairs("metrics")
                        .into_iter()
                        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
                        .collect(),
                    params: pairs("params")
                        .into_iter()
                        .filter_map(|(k, v)| Some((k, text(v)?)))
                        .collect(),
                    tags: pairs("tags")
                        .into_iter()
                        .filter(|(k, _)| k.starts_with("shoal."))
                        .filter_map(|(k, v)| Some((k, text(v)?)))
                        .collect(),
                });
            }
            out.push(RegisteredModel {
                name,
                description: m["description"].as_str().unwrap_or_default().to_string(),
                versions: list,
            });
        }
        Ok(out)
    }
}

fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        next = c.source();
    }
    out
}
