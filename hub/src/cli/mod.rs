//! Operator commands: each talks to a hub's REST API (the same documented API as any other
//! client) and prints tables, or JSON with `--output json`.
//!
//! [`client`] holds the request path and errors, [`format`] the printing; one file per command
//! group builds on both.

pub mod access;
pub mod client;
pub mod credentials;
pub mod datasets;
pub mod devices;
pub mod format;
pub mod jobs;
pub mod models;
pub mod runs;
pub mod sinks;
pub mod store;
pub mod telemetry;

pub use client::{CliError, Client, Output};
pub use format::table;
