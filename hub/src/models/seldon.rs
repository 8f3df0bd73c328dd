//! Seldon Core deployments. The model's files go to the object store in the layouts Seldon's
//! servers load — Triton's model repository (`NAME/config.pbtxt`, `NAME/VERSION/model.onnx`)
//! and an MLflow Model for MLServer (`NAME/VERSION/mlflow/`) — and the Seldon object that
//! serves them is written, or applied through the Kubernetes API (server-side apply, field
//! manager `shoal`):
//!
//! - Seldon Core v2 (`--protocol v2`): a `Model` (mlops.seldon.io/v1alpha1) whose
//!   `storageUri` is the Triton folder, `requirements: [onnx]`;
//! - Seldon Core v1 (`--protocol v1`): a `SeldonDeployment` (machinelearning.seldon.io/v1)
//!   with a `TRITON_SERVER` or `MLFLOW_SERVER` graph, an s3 `modelUri` and the secret holding
//!   the object store's credentials (`envSecretRefName`), as the book's chapter 11 does.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Which Seldon Core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Seldon Core v1: a SeldonDeployment.
    V1,
    /// Seldon Core v2: a Model.
    V2,
}

/// The server a v1 SeldonDeployment runs the model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Server {
    /// NVIDIA Triton, from the Triton repository layout.
    Triton,
    /// MLServer's MLflow runtime, from the MLflow Model.
    Mlflow,
}

/// What a Seldon deployment needs besides the model.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct SeldonOptions {
    #[serde(default = "v2")]
    pub protocol: Protocol,
    #[serde(default = "triton")]
    pub server: Server,
    /// Where the model's files go: s3://BUCKET/PREFIX.
    pub storage: String,
    /// Namespace of the object (default: the cluster's, or `default` when only written).
    pub namespace: Option<String>,
    /// The Secret with the object store's credentials (Seldon's `envSecretRefName` /
    /// rclone config secret).
    #[serde(default = "secret")]
    pub secret: String,
    /// Apply through the Kubernetes API (the hub's --kubeconfig) instead of only writing.
    #[serde(default)]
    pub apply: bool,
}

fn v2() -> Protocol {
    Protocol::V2
}
fn triton() -> Server {
    Server::Triton
}
fn secret() -> String {
    "seldon-init-container-secret".into()
}

/// The object's name: the model's, as a DNS-1123 label.
pub fn object_name(model: &str) -> Result<String, String> {
    let name: String = model
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "{model:?} makes no Kubernetes object name (1-63 letters, digits, '-')"
        ));
    }
    Ok(name)
}

/// Triton's model configuration for a Shoal model reading `k` features.
pub fn triton_config(name: &str, k: usize) -> String {
    let tensor = |n: &str, cols: usize| {
        format!("  {{\n    name: \"{n}\"\n    data_type: TYPE_FP64\n    dims: [ -1, {cols} ]\n  }}")
    };
    format!(
        "name: \"{name}\"\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: 0\ninput [\n{},\n{}\n]\noutput [\n{},\n{}\n]\n",
        tensor("features", k),
        tensor("observed", 1),
        tensor("expected", 1),
        tensor("score", 1)
    )
}

/// The objects to upload under the storage prefix: key and bytes.
pub fn layout(
    name: &str,
    version: &str,
    onnx: &[u8],
    target: &str,
    features: &[String],
) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        (
            format!("{name}/config.pbtxt"),
            triton_config(name, features.len()).into_bytes(),
        ),
        (format!("{name}/{version}/model.onnx"), onnx.to_vec()),
        (format!("{name}/{version}/mlflow/model.onnx"), onnx.to_vec()),
    ];
    for (file, text) in shoal_ml::mlmodel::files(target, features, "") {
        files.push((format!("{name}/{version}/mlflow/{file}"), text.into_bytes()));
    }
    files
}

/// The Seldon object serving `name` at `version` from `storage` (s3://BUCKET/PREFIX).
pub fn object(
    name: &str,
    version: &str,
    o: &SeldonOptions,
    namespace: &str,
) -> Result<Value, String> {
    let object = object_name(name)?;
    let storage = o.storage.trim_end_matches('/');
    let labels = json!({
        "app.kubernetes.io/managed-by": "shoal",
        "shoal.dev/model": object,
        "shoal.dev/model-version": label_value(version),
    });
    let metadata = json!({ "name": object, "namespace": namespace, "labels": labels });
    Ok(match o.protocol {
        Protocol::V2 => {
            let mut spec = json!({
                "storageUri": format!("{storage}/{name}"),
                "requirements": ["onnx"],
                "secretName": o.secret,
            });
            if let Ok(v) = version.parse::<i32>() {
                spec["artifactVersion"] = json!(v);
            }
            json!({
                "apiVersion": "mlops.seldon.io/v1alpha1",
                "kind": "Model",
                "metadata": metadata,
                "spec": spec,
            })
        }
        Protocol::V1 => {
            let (implementation, uri) = match o.server {
                Server::Triton => ("TRITON_SERVER", storage.to_string()),
                Server::Mlflow => (
                    "MLFLOW_SERVER",
                    format!("{storage}/{name}/{version}/mlflow"),
                ),
            };
            json!({
                "apiVersion": "machinelearning.seldon.io/v1",
                "kind": "SeldonDeployment",
                "metadata": metadata,
                "spec": {
                    "protocol": "v2",
                    "predictors": [{
                        "name": "default",
                        "replicas": 1,
                        "graph": {
                            "name": name,
                            "type": "MODEL",
                            "implementation": implementation,
                            "modelUri": uri,
                            "envSecretRefName": o.secret,
                        },
                    }],
                },
            })
        }
    })
}

/// A label value: at most 63 of letters, digits, '-', '_', '.'.
fn label_value(v: &str) -> String {
    v.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(63)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(protocol: Protocol, server: Server) -> SeldonOptions {
        SeldonOptions {
            protocol,
            server,
            storage: "s3://models/shoal/".into(),
            namespace: None,
            secret: secret(),
            apply: false,
        }
    }

    #[test]
    fn objects_point_at_the_uploaded_layout() {
        let m = object(
            "shoal-anomaly",
            "3",
            &options(Protocol::V2, Server::Triton),
            "ml",
        )
        .unwrap();
        assert_eq!(m["kind"], "Model");
        assert_eq!(m["spec"]["storageUri"], "s3://models/shoal/shoal-anomaly");
        assert_eq!(m["spec"]["artifactVersion"], 3);
        assert_eq!(m["spec"]["requirements"], json!(["onnx"]));
        let d = object(
            "shoal-anomaly",
            "3",
            &options(Protocol::V1, Server::Mlflow),
            "ml",
        )
        .unwrap();
        let graph = &d["spec"]["predictors"][0]["graph"];
        assert_eq!(graph["implementation"], "MLFLOW_SERVER");
        assert_eq!(
            graph["modelUri"],
            "s3://models/shoal/shoal-anomaly/3/mlflow"
        );
        assert_eq!(graph["envSecretRefName"], "seldon-init-container-secret");
        let keys: Vec<String> = layout("shoal-anomaly", "3", b"x", "t", &["a".into()])
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(keys.contains(&"shoal-anomaly/config.pbtxt".to_string()));
        assert!(keys.contains(&"shoal-anomaly/3/model.onnx".to_string()));
        assert!(keys.contains(&"shoal-anomaly/3/mlflow/MLmodel".to_string()));
        assert_eq!(object_name("Shoal_Anomaly.v2").unwrap(), "shoal-anomaly-v2");
        assert!(object_name("__").is_err());
        assert!(triton_config("m", 7).contains("dims: [ -1, 7 ]"));
    }
}
