//! The Kubernetes runner: a run of a `shoal.dev/runner: kubernetes` job is submitted as the
//! `batch/v1` Job that [`super::kubernetes::job`] renders, through the Kubernetes API (`kube`),
//! and followed until the Job controller says it completed or failed. The cluster does the
//! retries (`backoffLimit`) and the deadline (`activeDeadlineSeconds`); the hub records the
//! outcome, keeps each pod's log like a local attempt's, and deletes the Job (with its pods)
//! when the run is cancelled — replaced by a newer run, the job deleted, or the hub stopping —
//! so nothing runs in the cluster that the hub is not tracking.
//!
//! Deliberately thin: create, poll, read logs, delete. The client comes from a kubeconfig file
//! or the in-cluster service account.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::Value;
use tokio::sync::watch;

use super::runner::{Attempt, Ending, RunOutcome, Runner, cancelled};

/// Where the hub finds its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSource {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The service account of the pod the hub runs in.
    InCluster,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// A connected cluster and the namespace Jobs go to when their manifest names none.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    namespace: String,
    /// How often a Job's status is read.
    poll: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .field("poll", &self.poll)
            .finish()
    }
}

/// One run as a Kubernetes Job.
pub struct ClusterRun {
    cluster: Cluster,
    job: Value,
    log_limit: u64,
}

impl Runner for ClusterRun {
    fn run(
        self: Box<Self>,
        log_dir: PathBuf,
        cancel: watch::Receiver<bool>,
    ) -> BoxFuture<'static, RunOutcome> {
        Box::pin(async move {
            let ClusterRun {
                cluster,
                job,
                log_limit,
            } = *self;
            cluster.run(job, &log_dir, log_limit, cancel).await
        })
    }
}

impl Cluster {
    /// Reads the configuration (nothing is sent to the API server yet).
    pub async fn connect(
        source: &ClusterSource,
        namespace: Option<&str>,
    ) -> Result<Self, ClusterError> {
        let config = match source {
            ClusterSource::Kubeconfig(path) => {
                let bad = |message: String| ClusterError::Kubeconfig {
                    path: path.clone(),
                    message,
                };
                let kubeconfig = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| bad(e.to_string()))?
            }
            ClusterSource::InCluster => {
                Config::incluster().map_err(|e| ClusterError::InCluster(e.to_string()))?
            }
        };
        let namespace = namespace
            .map(str::to_string)
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))?;
        Ok(Self {
            client,
            namespace,
            poll: Duration::from_secs(2),
        })
    }

    /// Reads Job status this often (tests shorten it).
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Creates or updates `object` — any kind; its apiVersion, kind, metadata.name and
    /// metadata.namespace say where — by server-side apply as field manager `shoal`; the
    /// object as the API server answers it.
    pub async fn apply(&self, object: &Value) -> Result<Value, ClusterError> {
        use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
        let field = |f: &str| {
            object
                .pointer(f)
                .and_then(Value::as_str)
                .ok_or_else(|| ClusterError::Client(format!("the object has no {f}")))
        };
        let (group, version) = field("/apiVersion")?
            .split_once('/')
            .ok_or_else(|| ClusterError::Client("apiVersion is not GROUP/VERSION".into()))?;
        let kind = field("/kind")?;
        let name = field("/metadata/name")?;
        let namespace = field("/metadata/namespace").unwrap_or(&self.namespace);
        let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
        let plural = format!("{}s", kind.to_ascii_lowercase());
        let resource = ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        let applied = api
            .patch(
                name,
                &PatchParams::apply("shoal").force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(|e| ClusterError::Client(format!("apply {kind} {namespace}/{name}: {e}")))?;
        serde_json::to_value(applied).map_err(|e| ClusterError::Client(e.to_string()))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A run of `job` (a rendered `batch/v1` Job) in this cluster.
    pub fn job_run(&self, job: Value, log_limit: u64) -> ClusterRun {
        ClusterRun {
            cluster: self.clone(),
            job,
            log_limit,
        }
    }

    /// Submits `job` (a rendered `batch/v1` Job), follows it until it ends or `cancel` turns
    /// true, and keeps its pods' logs under `log_dir` (the first `log_limit` bytes of each).
    async fn run(
        &self,
        job: Value,
        log_dir: &Path,
        log_limit: u64,
        mut cancel: watch::Receiver<bool>,
    ) -> RunOutcome {
        let outcome = |ending| RunOutcome {
            ending,
            attempts: Vec::new(),
        };
        let job: Job = match serde_json::from_value(job) {
            Ok(j) => j,
            Err(e) => return outcome(Ending::StartFailed(format!("rendered Job: {e}"))),
        };
        let name = job.metadata.name.clone().unwrap_or_default();
        let namespace = job
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| self.namespace.clone());
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(e) = jobs.create(&PostParams::default(), &job).await {
            return outcome(Ending::StartFailed(format!(
                "creating Job {namespace}/{name}: {e}"
            )));
        }
        tracing::info!(job = %name, %namespace, "Kubernetes Job created");
        let ending = loop {
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = cancelled(&mut cancel) => {
                    // Background propagation: the Job's pods go with it.
                    if let Err(e) = jobs.delete(&name, &DeleteParams::background()).await {
                        tracing::warn!(job = %name, %namespace, error = %e, "cannot delete the cancelled Job");
                    }
                    break Ending::Cancelled;
                }
            }
            match jobs.get_status(&name).await {
                Ok(j) => {
                    if let Some(ending) = finished(&j) {
                        break ending;
                    }
                }
                // The API server being away for a moment is not the run's failure.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    break Ending::StartFailed(format!(
                        "Job {namespace}/{name} was deleted from the cluster"
                    ));
                }
                Err(e) => {
                    tracing::warn!(job = %name, %namespace, error = %e, "cannot read Job status")
                }
            }
        };
        let attempts = self
            .keep_logs(&namespace, &name, log_dir, log_limit, &ending)
            .await;
        RunOutcome { ending, attempts }
    }

    /// One log file per pod of the Job, oldest pod first, like a local run's attempts.
    async fn keep_logs(
        &self,
        namespace: &str,
        job: &str,
        log_dir: &Path,
        log_limit: u64,
        ending: &Ending,
    ) -> Vec<Attempt> {
        if *ending == Ending::Cancelled {
            return Vec::new();
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let mut list = match pods
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await
        {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(%job, error = %e, "cannot list the Job's pods for their logs");
                return Vec::new();
            }
        };
        list.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .cmp(&b.metadata.creation_timestamp)
        });
        if tokio::fs::create_dir_all(log_dir).await.is_err() {
            return Vec::new();
        }
        let mut attempts = Vec::new();
        for (i, pod) in list.iter().enumerate() {
            let Some(pod_name) = pod.metadata.name.as_deref() else {
                continue;
            };
            let params = LogParams {
                limit_bytes: Some(i64::try_from(log_limit).unwrap_or(i64::MAX)),
                ..LogParams::default()
            };
            let text = match pods.logs(pod_name, &params).await {
                Ok(t) => t,
                Err(e) => format!("(no log from pod {pod_name}: {e})\n"),
            };
            let log = log_dir.join(format!("attempt-{}.log", i + 1));
            let _ = tokio::fs::write(&log, text).await;
            attempts.push(Attempt {
                exit_code: exit_code(pod),
                log,
            });
        }
        attempts
    }
}

/// The Job's ending, from the conditions the Job controller sets.
fn finished(job: &Job) -> Option<Ending> {
    let status = job.status.as_ref()?;
    for c in status.conditions.iter().flatten() {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return Some(Ending::Succeeded),
            "Failed" if c.reason.as_deref() == Some("DeadlineExceeded") => {
                return Some(Ending::DeadlineExceeded);
            }
            "Failed" => return Some(Ending::Failed),
            _ => {}
        }
    }
    None
}

/// The first container's exit code, when it terminated.
fn exit_code(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: Value) -> Job {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": { "name": "j" },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn endings_follow_the_job_conditions() {
        assert_eq!(finished(&job(serde_json::json!({ "active": 1 }))), None);
        assert_eq!(
            finished(&job(serde_json::json!({ "succeeded": 1, "conditions": [
                { "type": "SuccessCriteriaMet", "status": "True" },
                { "type": "Complete", "status": "True" } ] }))),
            Some(Ending::Succeeded)
        );
        assert_eq!(
            finished(&job(serde_json::json!({ "failed": 3, "conditions": [
                { "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded" } ] }))),
            Some(Ending::Failed)
        );
        assert_eq!(
            finished(&job(serde_json::json!({ "conditions": [
                { "type": "Failed", "status": "True", "reason": "DeadlineExceeded" } ] }))),
            Some(Ending::DeadlineExceeded)
        );
        assert_eq!(
            finished(&job(serde_json::json!({ "conditions": [
                { "type": "Complete", "status": "False" } ] }))),
            None
        );
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named() {
        let err = Cluster::connect(
            &ClusterSource::Kubeconfig("/nonexistent/kubeconfig".into()),
            None,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
    }
}
