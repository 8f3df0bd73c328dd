//! Where datasets and artifacts live: a folder on this machine, or an S3 bucket (MinIO, Garage,
//! AWS…), both through the `object_store` crate.
//!
//! - `DIR`, `./DIR` or `file:///ABS/DIR`: a folder (created on first write);
//! - `s3://BUCKET/PREFIX`: S3 with the usual environment: `AWS_ENDPOINT_URL` (for MinIO or
//!   Garage, e.g. `http://127.0.0.1:3900`; plain `http://` endpoints are allowed),
//!   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` (must equal the server's
//!   region; `us-east-1` by default). Path-style addressing unless
//!   `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`, since self-hosted servers rarely have per-bucket
//!   DNS names.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{uri}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: object_store::Error,
    },
}

/// A folder-like place: a store and a prefix inside it.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    uri: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

impl Location {
    /// Parses a dataset or artifact URI (see the module docs).
    pub fn parse(uri: &str) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::Uri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let uri = uri.trim_end_matches('/');
        if uri.is_empty() {
            return Err(bad("empty"));
        }
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket (s3://BUCKET/PREFIX)"));
            }
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_virtual_hosted_style_request(
                    std::env::var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_ok_and(|v| v == "true"),
                );
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            let store = builder.build().map_err(|e| bad(&e.to_string()))?;
            return Ok(Self {
                store: Arc::new(store),
                prefix: Path::from(prefix),
                uri: uri.to_string(),
            });
        }
        if let Some((scheme, _)) = uri.split_once("://")
            && scheme != "file"
        {
            return Err(bad(&format!(
                "unsupported scheme {scheme}:// (use a folder, file:///… or s3://…)"
            )));
        }
        let dir = uri.strip_prefix("file://").unwrap_or(uri);
        let dir = std::path::absolute(dir).map_err(|e| bad(&e.to_string()))?;
        let prefix = Path::from_absolute_path(&dir).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new()),
            prefix,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// How a file under this location is named in messages.
    pub fn display(&self, name: &str) -> String {
        format!("{}/{name}", self.uri)
    }

    fn path(&self, name: &str) -> Path {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.path(name), PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|source| StoreError::Io {
                file: self.display(name),
                source,
            })
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let io = |source| StoreError::Io {
            file: self.display(name),
            source,
        };
        self.store
            .get(&self.path(name))
            .await
            .map_err(io)?
            .bytes()
            .await
            .map_err(io)
    }
}
