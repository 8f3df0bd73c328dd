//! Scheduled jobs with Kubernetes CronJob semantics (in progress: the schedule and the
//! scheduling decision are here; the manifest, store, runners, REST and CLI follow).
//!
//! - [`manifest`]: the job definition, a Kubernetes CronJob manifest, read and checked;
//! - [`cron`]: the schedule syntax and next activation in a time zone;
//! - [`local`]: the local runner (process groups, retries with backoff, deadline, capped logs);
//! - [`policy`]: what the controller does at a given moment — start, skip (Forbid, a missed
//!   starting deadline), replace, or refuse after more than 100 missed starts.

pub mod cron;
pub mod local;
pub mod manifest;
pub mod policy;
