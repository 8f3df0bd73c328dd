//! Scheduled jobs with Kubernetes CronJob semantics.
//!
//! - [`manifest`]: the job definition, a Kubernetes CronJob manifest, read and checked;
//! - [`cron`]: the schedule syntax and next activation in a time zone;
//! - [`cluster`]: the Kubernetes runner (a run is a `batch/v1` Job submitted to the API);
//! - [`kubernetes`]: the Kubernetes objects of a job and of a run;
//! - [`local`]: the local runner (process groups, retries with backoff, deadline, capped logs);
//! - [`runner`]: the boundary every runner implements, and how a run ended;
//! - [`policy`]: what the controller does at a given moment — start, skip (Forbid, a missed
//!   starting deadline), replace, or refuse after more than 100 missed starts;
//! - [`scheduler`]: the task that applies those decisions, runs and records;
//! - [`store`]: job definitions and run history in the hub's store;
//! - [`templates`]: built-in jobs for the telemetry-to-model loop.

pub mod cluster;
pub mod cron;
pub mod kubernetes;
pub mod local;
pub mod manifest;
pub mod policy;
pub mod runner;
pub mod scheduler;
pub mod store;
pub mod templates;
