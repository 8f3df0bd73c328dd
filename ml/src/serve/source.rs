//! Where a served model's ONNX file comes from: a training run's folder or an `.onnx` file,
//! an object store (`s3://BUCKET/PREFIX`, the folder's `model.onnx`, or a `.onnx` key), or
//! MLflow's Model Registry (`mlflow:/models/NAME/VERSION`, or MLflow's own `models:/NAME/VERSION`;
//! VERSION may be `latest`) through the tracking server's artifact proxy.

use std::path::PathBuf;

use crate::store::Location;

/// A model's location, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Object(String),
    Registry { name: String, version: String },
}

/// A fetched model: its ONNX bytes and, from the registry (or a training run's
/// `mlflow.json`), its version.
pub struct Fetched {
    pub onnx: Vec<u8>,
    pub version: Option<String>,
}

impl Source {
    pub fn parse(s: &str) -> Result<Self, String> {
        let registry = s
            .strip_prefix("mlflow:/models/")
            .or_else(|| s.strip_prefix("models:/"));
        if let Some(rest) = registry {
            let (name, version) = rest.trim_end_matches('/').split_once('/').ok_or_else(|| {
                format!("{s:?}: a registered model is mlflow:/models/NAME/VERSION (VERSION: a number or latest)")
            })?;
            if name.is_empty() || version.is_empty() || version.contains('/') {
                return Err(format!(
                    "{s:?}: a registered model is mlflow:/models/NAME/VERSION"
                ));
            }
            return Ok(Self::Registry {
                name: name.into(),
                version: version.into(),
            });
        }
        if s.starts_with("s3://") {
            return Ok(Self::Object(s.trim_end_matches('/').into()));
        }
        if let Some((scheme, _)) = s.split_once("://")
            && scheme != "file"
        {
            return Err(format!(
                "{s:?}: unsupported scheme {scheme}:// (a folder, an .onnx file, s3://… or mlflow:/models/NAME/VERSION)"
            ));
        }
        Ok(Self::File(PathBuf::from(
            s.strip_prefix("file://").unwrap_or(s),
        )))
    }

    /// The name a model gets when none is given: the registered name, or the folder's or
    /// file's name.
    pub fn default_name(&self) -> String {
        let stem = |p: &str| {
            std::path::Path::new(p)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("model")
                .to_string()
        };
        match self {
            Self::Registry { name, .. } => name.clone(),
            Self::Object(uri) => stem(uri.trim_start_matches("s3://")),
            Self::File(p) => stem(&p.to_string_lossy()),
        }
    }

    /// Reads the ONNX file; `mlflow` is the tracking server for registry sources.
    pub async fn fetch(&self, mlflow: Option<&str>) -> Result<Fetched, String> {
        match self {
            Self::File(path) => {
                let file = if path.is_dir() {
                    path.join("model.onnx")
                } else {
                    path.clone()
                };
                let onnx = tokio::fs::read(&file)
                    .await
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                // A training run's folder says which version the registry gave its model.
                let version = tokio::fs::read(path.join("mlflow.json"))
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["version"].as_str().map(str::to_string))
                    .filter(|v| !v.is_empty());
                Ok(Fetched { onnx, version })
            }
            Self::Object(uri) => {
                let (dir, key) = match uri.rsplit_once('/') {
                    Some((d, k)) if k.ends_with(".onnx") => (d.to_string(), k.to_string()),
                    _ => (uri.clone(), "model.onnx".to_string()),
                };
                let location = Location::parse(&dir).map_err(|e| e.to_string())?;
                let onnx = location.get(&key).await.map_err(|e| e.to_string())?;
                Ok(Fetched {
                    onnx: onnx.to_vec(),
                    version: None,
                })
            }
            Self::Registry { name, version } => registry(name, version, mlflow).await,
        }
    }
}

#[cfg(feature = "mlflow")]
async fn registry(name: &str, version: &str, mlflow: Option<&str>) -> Result<Fetched, String> {
    let uri = mlflow.ok_or_else(|| {
        format!("models:/{name}/{version} needs an MLflow tracking server (MLFLOW_TRACKING_URI)")
    })?;
    let client = crate::mlflow::Mlflow::new(uri).map_err(|e| e.to_string())?;
    let (source, version) = client
        .model_version_source(name, version)
        .await
        .map_err(|e| e.to_string())?;
    let onnx = client
        .download(&source, "model.onnx")
        .await
        .map_err(|e| format!("registered model {name} version {version} ({source}): {e}"))?;
    Ok(Fetched {
        onnx,
        version: Some(version),
    })
}

#[cfg(not(feature = "mlflow"))]
async fn registry(name: &str, version: &str, _: Option<&str>) -> Result<Fetched, String> {
    Err(format!(
        "models:/{name}/{version}: this build has no MLflow client (feature `mlflow`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_name_themselves() {
        let r = Source::parse("mlflow:/models/shoal-anomaly/3").unwrap();
        assert_eq!(
            r,
            Source::Registry {
                name: "shoal-anomaly".into(),
                version: "3".into()
            }
        );
        assert_eq!(r.default_name(), "shoal-anomaly");
        assert_eq!(
            Source::parse("models:/m/latest").unwrap(),
            Source::Registry {
                name: "m".into(),
                version: "latest".into()
            }
        );
        assert!(Source::parse("models:/m").is_err());
        assert_eq!(
            Source::parse("s3://models/anomaly/")
                .unwrap()
                .default_name(),
            "anomaly"
        );
        assert_eq!(
            Source::parse("./runs/r1/model.onnx")
                .unwrap()
                .default_name(),
            "model"
        );
        assert!(
            Source::parse("gs://b/m")
                .unwrap_err()
                .contains("unsupported scheme")
        );
    }
}
