//! Shoal's wire contract.
//!
//! # Layout
//! - `proto/shoal/v1/*.proto`: the messages, the `Ingest` service and the `Enrollment` service
//!   (device certificates; package `shoal.v1`),
//!   compiled at build time by protox + tonic-prost-build (no system `protoc` needed).
//! - [`v1`]: the generated types, client and server.
//! - [`codec`]: the small-buffer protobuf codec of the `shoal.v1` services.
//! - [`inference`]: the Open Inference Protocol's (V2) gRPC service, for model serving.
//! - [`metrics`]: how a [`v1::Sample`] reads as named metric points; the names are part of the
//!   contract (the REST API, CLI and datasets use them).
//! - [`device_id`]: what a valid device id is.
//! - [`size`]: sizes as operators write them (`512MB`, `1GiB`).
//! - [`mqtt`]: MQTT topic names and broker URLs; with feature `mqtt-client`, the client
//!   settings agent and hub share.

pub mod codec;
pub mod device_id;
pub mod metrics;
pub mod mqtt;
pub mod size;

/// Generated from `proto/shoal/v1`.
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// The Open Inference Protocol (KServe V2) over gRPC, from `proto/inference/predict_v2.proto`.
#[allow(clippy::all, clippy::pedantic)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// Largest encoded gRPC message the hub accepts by default, and the ceiling an agent batches to.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
