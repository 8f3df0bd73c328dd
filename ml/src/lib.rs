//! Shoal's machine-learning side: datasets, training, model export and serving grow here.
//!
//! # Layout
//! - [`stats`]: streaming summaries (count, min, max, mean, variance) computed in one pass; the
//!   hub downsamples telemetry series with them, and training will standardise features with them.
//!
//! This crate depends on no transport: the hub calls into it.
#![forbid(unsafe_code)]

pub mod stats;
