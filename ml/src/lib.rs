//! Shoal's machine-learning side: datasets, training and model export.
//!
//! # Layout
//! - [`store`]: where datasets and artifacts live (a folder or S3, through `object_store`);
//! - [`dataset`]: telemetry windows as Parquet files plus a manifest with every file's SHA-256;
//! - [`train`]: the device-health anomaly detector (streaming ridge regression, held-out
//!   evaluation, deterministic under a seed);
//! - [`onnx`]: the trained model as an ONNX graph any runtime serves; [`mlmodel`]: the same
//!   as an MLflow Model (descriptor with signature, environment files);
//! - [`provenance`]: where a model came from, as a signed in-toto statement (DSSE, P-256);
//! - [`serve`]: models loaded into an ONNX runtime (tract) and run on V2 tensors;
//! - `mlflow` (feature `mlflow`, on by default): an MLflow tracking and Model Registry client
//!   over its REST API, the only part that needs an HTTP client;
//! - [`stats`]: streaming summaries (count, min, max, mean, variance) computed in one pass; the
//!   hub downsamples telemetry series with them.
//!
//! This crate depends on no transport: the hub and the `shoal-ml` binary call into it.
#![forbid(unsafe_code)]

pub mod dataset;
#[cfg(feature = "mlflow")]
pub mod mlflow;
pub mod mlmodel;
pub mod model_signing;
pub mod onnx;
pub mod provenance;
pub mod serve;
pub mod stats;
pub mod store;
pub mod train;
