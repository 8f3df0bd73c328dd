//! Where a run executes: the [`Runner`] boundary the scheduler starts runs through, with one
//! implementation per engine — local process groups ([`super::local`]) and Kubernetes Jobs
//! ([`super::cluster`]) — and the outcome every runner reports in the same terms as a
//! Kubernetes Job's conditions.

use std::path::PathBuf;

use futures::future::BoxFuture;
use tokio::sync::watch;

/// A prepared run, ready to start.
pub trait Runner: Send {
    /// Runs to the end, or until `cancel` turns true, keeping each attempt's log under
    /// `log_dir`.
    fn run(
        self: Box<Self>,
        log_dir: PathBuf,
        cancel: watch::Receiver<bool>,
    ) -> BoxFuture<'static, RunOutcome>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub exit_code: Option<i32>,
    pub log: PathBuf,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Succeeded,
    /// Every attempt failed (`BackoffLimitExceeded`).
    Failed,
    /// `activeDeadlineSeconds` passed (`DeadlineExceeded`).
    DeadlineExceeded,
    /// Stopped from outside: replaced by a newer run, or the hub shutting down.
    Cancelled,
    /// The command could not be started at all.
    StartFailed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub ending: Ending,
    pub attempts: Vec<Attempt>,
}

/// Resolves when `cancel` turns true (never, if its sender is gone).
pub async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
