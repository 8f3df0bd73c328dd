//! The models the hub serves and scores its fleet with.
//!
//! `shoal models deploy NAME[:VERSION]` fetches a model's ONNX file (from MLflow's registry
//! by default, or any `shoal-ml serve` source: a folder, a file, `s3://…`), keeps a copy in
//! `DATA_DIR/models/NAME/VERSION/model.onnx`, and either loads it into the hub's embedded
//! Open Inference Protocol (V2) server (`--to embedded`, served at `/v2` behind the hub's
//! tokens) or records an external V2 endpoint that serves it (`--to v2 --endpoint URL`:
//! MLServer, Triton, a Seldon Core model). The hub serves one version per model: deploying
//! another swaps it in whole, and requests already running finish on the old one.
//!
//! The deployment of the scoring model (`--scoring-model`, `shoal-anomaly` by default) is what
//! [`scoring`] uses on incoming telemetry; [`alerts`] turns its scores into alerts.

pub mod alerts;
pub mod scoring;
pub mod seldon;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use shoal_ml::serve::model::LoadedModel;
use shoal_ml::serve::repo::Repository;
use shoal_ml::serve::source::Source;

use crate::store::records::{RecordTable, RecordWrite};
use crate::store::{Store, StoreError};

const DEPLOYMENTS: RecordTable = RecordTable::new("model_deployments");

/// Where a deployed model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The hub's own V2 server.
    Embedded,
    /// An external V2 server (MLServer, Triton, Seldon Core), at `endpoint`.
    V2,
}

/// A deployed model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deployment {
    pub name: String,
    pub version: String,
    /// Where its ONNX file was fetched from.
    pub source: String,
    pub to: Target,
    /// The external V2 server's base URL (`--to v2`).
    pub endpoint: Option<String>,
    /// SHA-256 of the ONNX file.
    pub sha256: String,
    /// The telemetry columns the model reads, in order (a Shoal model's metadata; empty for
    /// another model, which is served but cannot score).
    pub features: Vec<String>,
    /// The column it predicts.
    pub target: Option<String>,
    /// The score above which the model calls a reading anomalous.
    pub threshold: Option<f64>,
    pub deployed_ms: i64,
    pub deployed_by: String,
}

/// What `deploy` is asked to do.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct DeployRequest {
    /// The model's name (for the registry: its registered name).
    pub model: String,
    /// Its version; absent: the registry's newest (or the one a training run's `mlflow.json`
    /// names), else `sha256-` and the file digest's first 12 hex digits.
    pub version: Option<String>,
    /// Where to fetch it: a folder or file on the hub, `s3://…`, `mlflow:/models/NAME/VERSION`;
    /// absent: `mlflow:/models/MODEL/VERSION` from the hub's MLflow.
    pub source: Option<String>,
    #[serde(default = "embedded")]
    pub to: Target,
    /// The external V2 server's base URL, for `to: v2`.
    pub endpoint: Option<String>,
}

fn embedded() -> Target {
    Target::Embedded
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Fetch(String),
    #[error("the model does not load: {0}")]
    Load(String),
    #[error("no deployment of {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
    /// The hub's provenance policy (`--deploy-requires`) refuses the model.
    #[error("{0}")]
    Policy(String),
}

/// At most this many registered models, each with its newest this many versions, in the
/// registry's listing.
const REGISTRY_MODELS: usize = 100;
const REGISTRY_VERSIONS: usize = 10;

/// The deployed models and the embedded server's repository.
pub struct Models {
    store: Store,
    dir: PathBuf,
    mlflow: Option<String>,
    pub repo: Arc<Repository>,
    deployments: RwLock<BTreeMap<String, Deployment>>,
    /// The model whose deployment scores telemetry; empty: none.
    pub scoring_model: String,
    /// Per-device scores and the scorer's counters.
    pub scores: scoring::Scores,
    /// The cluster Seldon objects are applied to (the hub's --kubeconfig), if any.
    cluster: Option<crate::jobs::cluster::Cluster>,
    /// What a model needs in the provenance ledger to be deployed.
    policy: Option<crate::provenance::Policy>,
}

/// What a Seldon deployment did: the files uploaded, the object, whether it was applied.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SeldonDeployed {
    pub name: String,
    pub version: String,
    /// Object-store keys written under the storage prefix.
    pub uploaded: Vec<String>,
    /// The Seldon object (a Model or a SeldonDeployment).
    #[schema(value_type = Object)]
    pub object: serde_json::Value,
    /// Whether it was applied through the Kubernetes API (else only written).
    pub applied: bool,
}

/// What `deploy --to seldon` is asked to do.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct SeldonRequest {
    pub model: String,
    pub version: Option<String>,
    pub source: Option<String>,
    #[serde(flatten)]
    pub seldon: seldon::SeldonOptions,
}

/// A model fetched and checked: its version, file, digest and runtime.
struct Fetched {
    version: String,
    source: String,
    onnx: Vec<u8>,
    sha256: String,
    loaded: LoadedModel,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Models {
    /// Opens the deployments kept in `store` and loads the embedded ones from their copies
    /// under `data_dir/models` (no registry needed to restart).
    pub fn open(
        store: &Store,
        data_dir: &Path,
        mlflow: Option<String>,
        scoring_model: String,
        cluster: Option<crate::jobs::cluster::Cluster>,
        policy: Option<crate::provenance::Policy>,
    ) -> Result<Self, StoreError> {
        store.create_record_tables(&[DEPLOYMENTS, alerts::ALERTS])?;
        let repo = Arc::new(Repository::default());
        let mut deployments = BTreeMap::new();
        let dir = data_dir.join("models");
        for d in store.records::<Deployment>(DEPLOYMENTS)? {
            if d.to == Target::Embedded {
                let file = model_file(&dir, &d.name, &d.version);
                match LoadedModel::load(&file) {
                    Ok(m) => repo.put(&d.name, &d.version, m),
                    Err(e) => {
                        tracing::error!(model = %d.name, version = %d.version, error = %e, "a deployed model does not load; it is not served");
                        continue;
                    }
                }
            }
            deployments.insert(d.name.clone(), d);
        }
        Ok(Self {
            store: store.clone(),
            dir,
            mlflow,
            repo,
            deployments: RwLock::new(deployments),
            scoring_model,
            scores: scoring::Scores::default(),
            cluster,
            policy,
        })
    }

    /// The hub's MLflow tracking server, if it has one.
    pub fn tracking_uri(&self) -> Option<&str> {
        self.mlflow.as_deref()
    }

    /// MLflow's registry: the registered models with their newest versions and what each
    /// version's run recorded; `None` without a tracking server.
    pub async fn registry(
        &self,
    ) -> Option<Result<Vec<shoal_ml::mlflow::RegisteredModel>, shoal_ml::mlflow::MlflowError>> {
        let uri = self.mlflow.as_deref()?;
        let client = match shoal_ml::mlflow::Mlflow::new(uri) {
            Ok(c) => c.with_retries(1, std::time::Duration::ZERO),
            Err(e) => return Some(Err(e)),
        };
        Some(
            client
                .registered_models(REGISTRY_MODELS, REGISTRY_VERSIONS)
                .await,
        )
    }

    pub fn list(&self) -> Vec<Deployment> {
        self.deployments
            .read()
            .expect("deployments lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Deployment> {
        self.deployments
            .read()
            .expect("deployments lock")
            .get(name)
            .cloned()
    }

    /// The deployment that scores telemetry, if any.
    pub fn scoring(&self) -> Option<Deployment> {
        self.get(&self.scoring_model)
    }

    /// Fetches, checks, keeps and serves (or records) the model `req` names.
    pub async fn deploy(&self, req: DeployRequest, by: &str) -> Result<Deployment, DeployError> {
        let bad = |m: String| Err(DeployError::BadRequest(m));
        let endpoint = match (req.to, &req.endpoint) {
            (Target::V2, Some(e)) if e.starts_with("http://") || e.starts_with("https://") => {
                Some(e.trim_end_matches('/').to_string())
            }
            (Target::V2, _) => return bad("--to v2 needs --endpoint http(s)://HOST:PORT".into()),
            (Target::Embedded, Some(_)) => {
                return bad("--endpoint is for --to v2; the embedded server is the hub".into());
            }
            (Target::Embedded, None) => None,
        };
        let Fetched {
            version,
            source: source_text,
            onnx,
            sha256,
            loaded,
        } = self
            .fetch(&req.model, req.version.as_deref(), req.source.as_deref())
            .await?;
        let meta = &loaded.metadata;
        let deployment = Deployment {
            name: req.model.clone(),
            version: version.clone(),
            source: source_text,
            to: req.to,
            endpoint,
            sha256,
            features: features_of(&loaded),
            target: meta.get("target").cloned(),
            threshold: meta.get("threshold").and_then(|t| t.parse().ok()),
            deployed_ms: crate::now_ms(),
            deployed_by: by.to_string(),
        };
        self.keep(&deployment, onnx).await?;
        self.store.write_records(&[RecordWrite::put(
            DEPLOYMENTS,
            &deployment.name,
            &deployment,
        )])?;
        if deployment.to == Target::Embedded {
            // The new version first, then the others out: no moment without the model.
            self.repo.put(&deployment.name, &version, loaded);
            for (v, _) in self.repo.all(&deployment.name) {
                if v != version {
                    self.repo.remove(&deployment.name, &v);
                }
            }
        } else {
            self.repo.remove(&deployment.name, "");
        }
        self.deployments
            .write()
            .expect("deployments lock")
            .insert(deployment.name.clone(), deployment.clone());
        tracing::info!(model = %deployment.name, version = %deployment.version, to = ?deployment.to, "model deployed");
        Ok(deployment)
    }

    /// Fetches model `name` (at `version`) from `source` (the registry by default) and loads
    /// it to check it runs.
    async fn fetch(
        &self,
        name: &str,
        version: Option<&str>,
        source: Option<&str>,
    ) -> Result<Fetched, DeployError> {
        if !valid_name(name) || version.is_some_and(|v| !valid_name(v)) {
            return Err(DeployError::BadRequest(format!(
                "invalid model {name:?}: names and versions are letters, digits, '.', '_' or '-'"
            )));
        }
        let source_text = match source {
            Some(s) => s.to_string(),
            None => format!("mlflow:/models/{name}/{}", version.unwrap_or("latest")),
        };
        let parsed = Source::parse(&source_text).map_err(DeployError::BadRequest)?;
        let fetched = parsed
            .fetch(self.mlflow.as_deref())
            .await
            .map_err(DeployError::Fetch)?;
        let onnx = fetched.onnx;
        let sha256 = shoal_ml::dataset::hex(&<sha2::Sha256 as sha2::Digest>::digest(&onnx));
        if let Some(policy) = self.policy.clone() {
            let digest = sha256.clone();
            tokio::task::spawn_blocking(move || policy.admits(&digest))
                .await
                .map_err(|e| DeployError::Io(e.to_string()))?
                .map_err(DeployError::Policy)?;
        }
        // Without a registry version, the file's digest names it: scores say exactly which
        // model produced them.
        let version = version
            .map(str::to_string)
            .or(fetched.version)
            .unwrap_or_else(|| format!("sha256-{}", &sha256[..12]));
        let loaded = {
            let bytes = onnx.clone();
            tokio::task::spawn_blocking(move || LoadedModel::from_bytes(&bytes))
                .await
                .map_err(|e| DeployError::Load(e.to_string()))?
                .map_err(DeployError::Load)?
        };
        Ok(Fetched {
            version,
            source: source_text,
            onnx,
            sha256,
            loaded,
        })
    }

    /// Uploads the model to the object store in the layouts Seldon's servers load, and writes
    /// (or applies) the Seldon object serving it. The hub does not serve it itself.
    pub async fn deploy_seldon(&self, req: SeldonRequest) -> Result<SeldonDeployed, DeployError> {
        let o = &req.seldon;
        if !o.storage.starts_with("s3://") {
            return Err(DeployError::BadRequest(format!(
                "invalid storage {:?}: Seldon's servers load models from s3://BUCKET/PREFIX",
                o.storage
            )));
        }
        seldon::object_name(&req.model).map_err(DeployError::BadRequest)?;
        let cluster = match (o.apply, &self.cluster) {
            (true, None) => {
                return Err(DeployError::BadRequest(
                    "--apply needs a cluster: start the hub with --kubeconfig or --kube-in-cluster"
                        .into(),
                ));
            }
            (true, Some(c)) => Some(c),
            (false, _) => None,
        };
        let f = self
            .fetch(&req.model, req.version.as_deref(), req.source.as_deref())
            .await?;
        let meta = &f.loaded.metadata;
        let features = features_of(&f.loaded);
        if features.is_empty() {
            return Err(DeployError::BadRequest(format!(
                "{} has no Shoal metadata (features): only models trained by shoal-ml can be laid out for Seldon",
                f.source
            )));
        }
        let target = meta.get("target").cloned().unwrap_or_default();
        let location = shoal_ml::store::Location::parse(&o.storage)
            .map_err(|e| DeployError::BadRequest(e.to_string()))?;
        let mut uploaded = Vec::new();
        for (key, bytes) in seldon::layout(&req.model, &f.version, &f.onnx, &target, &features) {
            location
                .put(&key, bytes.into())
                .await
                .map_err(|e| DeployError::Fetch(format!("cannot upload {key}: {e}")))?;
            uploaded.push(key);
        }
        let namespace = o
            .namespace
            .clone()
            .or_else(|| self.cluster.as_ref().map(|c| c.namespace().to_string()))
            .unwrap_or_else(|| "default".into());
        let object = seldon::object(&req.model, &f.version, o, &namespace)
            .map_err(DeployError::BadRequest)?;
        let applied = match cluster {
            Some(c) => {
                c.apply(&object)
                    .await
                    .map_err(|e| DeployError::Fetch(e.to_string()))?;
                true
            }
            None => false,
        };
        tracing::info!(model = %req.model, version = %f.version, applied, "Seldon deployment written");
        Ok(SeldonDeployed {
            name: req.model,
            version: f.version,
            uploaded,
            object,
            applied,
        })
    }

    /// The model's file, written whole (temporary file, fsync, rename).
    async fn keep(&self, d: &Deployment, onnx: Vec<u8>) -> Result<(), DeployError> {
        let file = model_file(&self.dir, &d.name, &d.version);
        tokio::task::spawn_blocking(move || {
            let dir = file.parent().expect("a model file has a folder");
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join("model.onnx.tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&onnx)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &file)
        })
        .await
        .map_err(|e| DeployError::Io(e.to_string()))?
        .map_err(|e| DeployError::Io(format!("cannot keep the model's file: {e}")))
    }

    /// Stops serving `name` and forgets its deployment.
    pub fn undeploy(&self, name: &str) -> Result<Deployment, DeployError> {
        let Some(d) = self.get(name) else {
            return Err(DeployError::NotFound(name.into()));
        };
        self.store
            .write_records(&[RecordWrite::Remove(DEPLOYMENTS, name)])?;
        self.repo.remove(name, "");
        self.deployments
            .write()
            .expect("deployments lock")
            .remove(name);
        Ok(d)
    }
}

/// The telemetry columns a Shoal model reads, from its ONNX metadata (none for another model).
fn features_of(model: &LoadedModel) -> Vec<String> {
    model
        .metadata
        .get("features")
        .map(|f| f.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

fn model_file(dir: &Path, name: &str, version: &str) -> PathBuf {
    dir.join(name).join(version).join("model.onnx")
}
