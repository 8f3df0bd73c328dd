//! `shoal`: the hub that keeps the fleet registry and its telemetry, runs jobs, and the
//! operators' CLI.
//!
//! # Layout
//! Dependencies point down this list; no two modules import each other.
//! - [`up`]: the one-command demo (a hub plus the `shoal-agent` binary); [`serve`]: the hub's
//!   settings and [`run`], which wires everything below together.
//! - [`cli`]: the operator commands, one file per command group, over the REST API only.
//! - [`api`]: the REST API (`/api/v1`, one file per resource), `/healthz`, `/metrics`; every
//!   request passes its access gate ([`api::access`]).
//! - [`auth`]: roles, API tokens (stored hashed), the audit log.
//! - [`mqtt`]: the embedded MQTT broker (sessions, ACL, TLS), handing device topics to ingest.
//! - [`ingest`]: validation and acks for every transport: gRPC ([`ingest::grpc`]), an external
//!   broker ([`ingest::mqtt`]), the book's JSON form ([`ingest::json`]).
//! - [`jobs`]: CronJob manifests, the scheduler, and the runners (local processes, Kubernetes).
//! - [`store`]: the embedded redb store — the only module that opens tables or transactions —
//!   its single writer thread, the in-memory fleet view, and time-series queries.
//! - [`models`]: deployed models (the embedded V2 server's repository), scoring the fleet's
//!   telemetry with them, alerts on the scores.
//! - [`provenance`]: the hash-chained ledger of signed model statements.
//! - [`registry`]: device records and online/stale/offline status; [`metrics`]: counters;
//!   [`net`]: listeners with storm-sized accept queues, and the open-files limit.
//!
//! [`run`] takes bound listeners and a shutdown signal from the caller, so tests start a hub
//! in-process on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod auth;
pub mod cli;
pub mod dashboard;
pub mod ingest;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod mqtt;
pub mod net;
pub mod platform;
pub mod provenance;
pub mod registry;
pub mod serve;
pub mod store;
pub mod up;

pub use serve::{Endpoints, HubConfig, HubError, Listeners, run};
pub use store::series::now_ms;
