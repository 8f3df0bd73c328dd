//! The scheduler: one task owning every job, deciding with [`super::policy::decide`] at each
//! job's next schedule time, starting runs on the local runner or as Kubernetes Jobs, and
//! recording every start, skip, miss and outcome in the store.
//!
//! Why not tokio-cron-scheduler: Kubernetes semantics need the *controller's* view — the last
//! schedule time survives restarts, only the most recent missed start runs, starting deadlines,
//! concurrency policies, more than 100 missed starts — which a fire-callbacks-on-time library
//! does not model. The loop below is small: sleep until the earliest next schedule time or a
//! command, then decide for every job. The clock is injected, so tests drive time exactly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{mpsc, oneshot, watch};

use super::cluster::Cluster;
use super::local::RunSpec;
use super::manifest::{self, JobDefinition, ManifestError, Runner as RunnerKind};
use super::policy::{self, Decision, JobPolicy};
use super::runner::{Ending, RunOutcome, Runner};
use super::store::{JobRecord, JobStore, RunRecord, RunStatus};
use crate::store::StoreError;

/// The time source: the wall clock in production, a hand-moved one in tests.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub fn wall_clock() -> Clock {
    Arc::new(Utc::now)
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Run logs go to `runs_dir/RUN_ID/attempt-N.log`.
    pub runs_dir: PathBuf,
    /// Given to every run as SHOAL_HUB_URL.
    pub hub_url: String,
    /// Given to every run as MLFLOW_TRACKING_URI when set.
    pub mlflow_tracking_uri: Option<String>,
    /// Given to every run as SHOAL_DATASET_URI when set.
    pub dataset_uri: Option<String>,
    /// Values for `valueFrom`: `DIR/secrets/NAME/KEY` (`secretKeyRef`) and
    /// `DIR/configmaps/NAME/KEY` (`configMapKeyRef`) hold them.
    pub values_dir: Option<PathBuf>,
    pub backoff_base: Duration,
    pub log_limit: u64,
    pub grace: Duration,
    /// Where `shoal.dev/runner: kubernetes` jobs run; without one their runs fail to start,
    /// saying so.
    pub cluster: Option<Cluster>,
    /// Given to runs on the hub as SHOAL_TOKEN, so that what they run (`shoal datasets
    /// export`, the training template) may call the hub's API. Not given to Kubernetes Jobs,
    /// whose spec anyone with read access to the namespace can see.
    pub run_token: Option<String>,
    /// Given to runs on the hub as SHOAL_SIGNING_KEY_FILE, so that the models they train
    /// are signed (`shoal-ml train --signing-key`).
    pub signing_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Invalid(#[from] ManifestError),
    #[error("no job named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the scheduler has stopped")]
    Stopped,
}

enum Cmd {
    Apply(Box<JobDefinition>, oneshot::Sender<Result<(), JobError>>),
    Delete(String, oneshot::Sender<Result<(), JobError>>),
    Trigger(String, oneshot::Sender<Result<String, JobError>>),
    Suspend(String, bool, oneshot::Sender<Result<(), JobError>>),
    /// Decide now (tests move the clock, then tick).
    Tick(oneshot::Sender<()>),
}

/// Handle to the scheduler task.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Cmd>,
}

struct Active {
    job: String,
    cancel: watch::Sender<bool>,
    record: RunRecord,
}

/// What one pass of the scheduler changes: written in one transaction, then acted on.
#[derive(Default)]
struct Pending {
    runs: Vec<RunRecord>,
    jobs: Vec<String>,
    delete: Vec<String>,
    launches: Vec<Launch>,
}

/// A run to start once its record is committed: id, runner, log folder, cancel signal.
type Launch = (String, Box<dyn Runner>, PathBuf, watch::Receiver<bool>);

struct Job {
    def: JobDefinition,
    record: JobRecord,
    /// Last time a "too many missed starts" was logged, so it is said once, not every tick.
    warned_missed: bool,
    /// Finished runs, oldest first, and whether each succeeded (for the history limits).
    history: std::collections::VecDeque<(String, bool)>,
}

struct State {
    store: JobStore,
    config: SchedulerConfig,
    clock: Clock,
    jobs: HashMap<String, Job>,
    active: HashMap<String, Active>,
    done_tx: mpsc::UnboundedSender<(String, RunOutcome)>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

impl Scheduler {
    /// Loads the stored jobs, marks runs that were in flight when the hub stopped as
    /// interrupted, and schedules until `shutdown` (then cancels active runs).
    pub fn start(
        store: JobStore,
        config: SchedulerConfig,
        clock: Clock,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), JobError> {
        interrupt_in_flight(&store, &clock)?;
        let jobs = load_jobs(&store)?;
        let (tx, rx) = mpsc::channel(64);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let state = State {
            store,
            config,
            clock,
            jobs,
            active: HashMap::new(),
            done_tx,
        };
        let task = tokio::spawn(state.run(rx, done_rx, shutdown));
        Ok((Self { tx }, task))
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, JobError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| JobError::Stopped)?;
        rx.await.map_err(|_| JobError::Stopped)
    }

    /// Creates or replaces a job (its last schedule time is kept across updates).
    pub async fn apply(&self, def: JobDefinition) -> Result<(), JobError> {
        self.call(|tx| Cmd::Apply(Box::new(def), tx)).await?
    }

    pub async fn delete(&self, name: &str) -> Result<(), JobError> {
        self.call(|tx| Cmd::Delete(name.to_string(), tx)).await?
    }

    /// Starts a run now, whatever the schedule; returns its id.
    pub async fn trigger(&self, name: &str) -> Result<String, JobError> {
        self.call(|tx| Cmd::Trigger(name.to_string(), tx)).await?
    }

    pub async fn set_suspend(&self, name: &str, suspend: bool) -> Result<(), JobError> {
        self.call(|tx| Cmd::Suspend(name.to_string(), suspend, tx))
            .await?
    }

    /// Decides for every job at the clock's current time; returns when done.
    pub async fn tick(&self) -> Result<(), JobError> {
        self.call(Cmd::Tick).await
    }
}

/// The controller settings of a job; `suspend` is its current suspend flag (`None`: not suspended).
pub fn job_policy(def: &JobDefinition, suspend: Option<bool>) -> JobPolicy {
    let spec = &def.manifest.spec;
    JobPolicy {
        schedule: def.schedule.clone(),
        time_zone: def.time_zone,
        concurrency: def.concurrency,
        starting_deadline: spec
            .starting_deadline_seconds
            .map(chrono::Duration::seconds),
        suspend: suspend.unwrap_or(false),
        missed_starts: def.missed_starts,
    }
}

/// Marks the runs the store still has as running (the hub stopped during them) as interrupted.
fn interrupt_in_flight(store: &JobStore, clock: &Clock) -> Result<(), JobError> {
    for mut run in store
        .runs(None)?
        .into_iter()
        .filter(|r| r.status == RunStatus::Running)
    {
        run.status = RunStatus::Interrupted;
        run.reason =
            Some("the hub stopped while this run was in flight; its outcome is unknown".into());
        run.finished_ms = Some(ms(clock()));
        store.put_run(&run)?;
    }
    Ok(())
}

/// The stored jobs that still check, each with its finished runs; the others are logged.
fn load_jobs(store: &JobStore) -> Result<HashMap<String, Job>, JobError> {
    let mut histories: HashMap<String, std::collections::VecDeque<(String, bool)>> = HashMap::new();
    for run in store
        .runs(None)?
        .into_iter()
        .filter(|r| r.status.finished())
    {
        histories
            .entry(run.job.clone())
            .or_default()
            .push_back((run.id, run.status.succeeded()));
    }
    let mut jobs = HashMap::new();
    for record in store.jobs()? {
        match manifest::check(record.manifest.clone()) {
            Ok(def) => {
                let history = histories.remove(def.name()).unwrap_or_default();
                jobs.insert(
                    def.name().to_string(),
                    Job {
                        def,
                        record,
                        warned_missed: false,
                        history,
                    },
                );
            }
            Err(e) => {
                tracing::error!(job = %record.manifest.metadata.name, error = %e, "stored job no longer valid; not scheduled")
            }
        }
    }
    Ok(jobs)
}

impl State {
    /// The scheduler task: decides, sleeps until the next schedule time, a command or a
    /// finished run, and on `shutdown` cancels the active runs and waits briefly for them.
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut done_rx: mpsc::UnboundedReceiver<(String, RunOutcome)>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            self.evaluate();
            let sleep = self.until_next_wakeup();
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(first) = done_rx.recv() => {
                    let mut done = vec![first];
                    while let Ok(more) = done_rx.try_recv() {
                        done.push(more);
                    }
                    self.finished(done);
                }
                _ = shutdown.changed() => break,
            }
        }
        for a in self.active.values() {
            let _ = a.cancel.send(true);
        }
        // Give cancelled runs a moment to record themselves.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.active.is_empty() {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(done)) => self.finished(vec![done]),
                _ => break,
            }
        }
    }

    /// How long until the earliest next schedule time of any job (an hour when none has one).
    fn until_next_wakeup(&self) -> Duration {
        let now = (self.clock)();
        let wake = self
            .jobs
            .values()
            .filter_map(|j| {
                policy::next_wakeup(&job_policy(&j.def, j.record.manifest.spec.suspend), now)
            })
            .min();
        wake.map_or(Duration::from_secs(3600), |w| {
            (w - now).to_std().unwrap_or_default()
        })
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Apply(def, reply) => {
                let name = def.name().to_string();
                let now = ms((self.clock)());
                let (created_ms, last_schedule_ms) =
                    self.jobs.get(&name).map_or((now, None), |j| {
                        (j.record.created_ms, j.record.last_schedule_ms)
                    });
                let record = JobRecord {
                    manifest: def.manifest.clone(),
                    created_ms,
                    last_schedule_ms,
                };
                let r = self.store.put_job(&name, &record).map_err(JobError::from);
                if r.is_ok() {
                    let history = self
                        .jobs
                        .remove(&name)
                        .map(|j| j.history)
                        .unwrap_or_default();
                    self.jobs.insert(
                        name,
                        Job {
                            def: *def,
                            record,
                            warned_missed: false,
                            history,
                        },
                    );
                }
                let _ = reply.send(r);
            }
            Cmd::Delete(name, reply) => {
                let r = match self.jobs.remove(&name) {
                    None => Err(JobError::NotFound(name)),
                    Some(_) => {
                        for a in self.active.values().filter(|a| a.job == name) {
                            let _ = a.cancel.send(true);
                        }
                        self.store.delete_job(&name).map_err(JobError::from)
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::Trigger(name, reply) => {
                let r = match self.jobs.get(&name) {
                    None => Err(JobError::NotFound(name)),
                    Some(_) => {
                        let now = (self.clock)();
                        let id = manual_run_id(&name, now);
                        let mut pending = Pending::default();
                        self.prepare_run(&mut pending, &name, id.clone(), now, true);
                        self.commit(pending).map(|_| id)
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::Suspend(name, suspend, reply) => {
                let r = match self.jobs.get_mut(&name) {
                    None => Err(JobError::NotFound(name)),
                    Some(job) => {
                        job.record.manifest.spec.suspend = Some(suspend);
                        job.def.manifest.spec.suspend = Some(suspend);
                        self.store
                            .put_job(&name, &job.record)
                            .map_err(JobError::from)
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::Tick(reply) => {
                self.evaluate();
                let _ = reply.send(());
            }
        }
    }

    /// Decides for every job at the current time; everything it records goes in one
    /// transaction, and runs start only once that is committed.
    fn evaluate(&mut self) {
        let now = (self.clock)();
        let mut pending = Pending::default();
        let names: Vec<String> = self.jobs.keys().cloned().collect();
        for name in names {
            let job = &self.jobs[&name];
            let last = at(job.record.last_schedule_ms.unwrap_or(job.record.created_ms));
            let active = self.active.values().filter(|a| a.job == name).count();
            let decision = policy::decide(
                &job_policy(&job.def, job.record.manifest.spec.suspend),
                last,
                now,
                active,
            );
            match decision {
                Decision::Wait => {}
                Decision::TooManyMissed { missed } => {
                    let job = self.jobs.get_mut(&name).expect("job");
                    if !job.warned_missed {
                        job.warned_missed = true;
                        tracing::warn!(
                            job = %name,
                            missed,
                            "Cannot determine if job needs to be started. Too many missed start times (> 100). Set or decrease .spec.startingDeadlineSeconds or check clock skew (or annotate shoal.dev/missed-starts: run-latest)"
                        );
                    }
                }
                Decision::Skip { scheduled, reason } => {
                    let id = run_id(&name, scheduled);
                    pending.runs.push(RunRecord {
                        id: id.clone(),
                        job: name.clone(),
                        scheduled_ms: ms(scheduled),
                        manual: false,
                        started_ms: None,
                        finished_ms: Some(ms(now)),
                        status: RunStatus::Skipped,
                        reason: Some(reason),
                        attempts: Vec::new(),
                    });
                    self.set_last_schedule(&mut pending, &name, scheduled);
                    self.remember(&mut pending, &name, id, false);
                }
                Decision::Start {
                    scheduled,
                    replace,
                    missed,
                } => {
                    if replace {
                        for a in self.active.values().filter(|a| a.job == name) {
                            let _ = a.cancel.send(true);
                        }
                    }
                    if missed > 1 {
                        tracing::info!(job = %name, missed, "missed starts while the hub was away; running the most recent");
                    }
                    self.prepare_run(
                        &mut pending,
                        &name,
                        run_id(&name, scheduled),
                        scheduled,
                        false,
                    );
                    self.set_last_schedule(&mut pending, &name, scheduled);
                }
            }
        }
        if let Err(e) = self.commit(pending) {
            tracing::error!(error = %e, "cannot record the scheduler's decisions; their runs are not started");
        }
    }

    fn set_last_schedule(&mut self, pending: &mut Pending, name: &str, scheduled: DateTime<Utc>) {
        if let Some(job) = self.jobs.get_mut(name) {
            job.record.last_schedule_ms = Some(ms(scheduled));
            pending.jobs.push(name.to_string());
        }
    }

    /// Adds a finished run to its job's history and queues what the history limits drop.
    fn remember(&mut self, pending: &mut Pending, name: &str, id: String, succeeded: bool) {
        let Some(job) = self.jobs.get_mut(name) else {
            return;
        };
        job.history.push_back((id, succeeded));
        let (keep_ok, keep_failed) = (
            job.def.successful_history as usize,
            job.def.failed_history as usize,
        );
        let (mut ok, mut failed) = (
            job.history.iter().filter(|(_, s)| *s).count(),
            job.history.iter().filter(|(_, s)| !*s).count(),
        );
        let mut kept = std::collections::VecDeque::new();
        while let Some((id, s)) = job.history.pop_front() {
            if s && ok > keep_ok {
                ok -= 1;
                pending.delete.push(id);
            } else if !s && failed > keep_failed {
                failed -= 1;
                pending.delete.push(id);
            } else {
                kept.push_back((id, s));
            }
        }
        job.history = kept;
    }

    /// Queues a run's record and its launch (started by [`Self::commit`]).
    fn prepare_run(
        &mut self,
        pending: &mut Pending,
        name: &str,
        id: String,
        scheduled: DateTime<Utc>,
        manual: bool,
    ) {
        let Some(job) = self.jobs.get(name) else {
            return;
        };
        let now = ms((self.clock)());
        let mut record = RunRecord {
            id: id.clone(),
            job: name.to_string(),
            scheduled_ms: ms(scheduled),
            manual,
            started_ms: Some(now),
            finished_ms: None,
            status: RunStatus::Running,
            reason: None,
            attempts: Vec::new(),
        };
        let launch: Result<Box<dyn Runner>, String> = match job.def.runner {
            RunnerKind::Local => run_spec(&job.def, &id, &self.config).map(|s| Box::new(s) as _),
            RunnerKind::Kubernetes => match &self.config.cluster {
                Some(cluster) => Ok(Box::new(cluster.job_run(
                    super::kubernetes::job(&job.def, &id, scheduled, &run_env(&job.def, &id, &self.config)),
                    self.config.log_limit,
                ))),
                None => Err("the job runs on Kubernetes (shoal.dev/runner: kubernetes) but the hub has no cluster: start it with --kubeconfig FILE or --kube-in-cluster".into()),
            },
        };
        let launch = match launch {
            Ok(launch) => launch,
            Err(why) => {
                // Recorded, never started: the reason says what to fix.
                record.status = RunStatus::StartFailed;
                record.finished_ms = Some(now);
                record.reason = Some(why);
                pending.runs.push(record);
                self.remember(pending, name, id, false);
                return;
            }
        };
        pending.runs.push(record.clone());
        let (cancel, cancel_rx) = watch::channel(false);
        self.active.insert(
            id.clone(),
            Active {
                job: name.to_string(),
                cancel,
                record,
            },
        );
        pending.launches.push((
            id.clone(),
            launch,
            self.config.runs_dir.join(&id),
            cancel_rx,
        ));
    }

    /// Writes what `pending` records in one transaction, then starts its runs and removes the
    /// logs of pruned runs.
    fn commit(&mut self, pending: Pending) -> Result<(), JobError> {
        if pending.runs.is_empty() && pending.jobs.is_empty() && pending.delete.is_empty() {
            return Ok(());
        }
        let mut names = pending.jobs.clone();
        names.sort();
        names.dedup();
        let jobs: Vec<(&str, &JobRecord)> = names
            .iter()
            .filter_map(|n| self.jobs.get(n).map(|j| (n.as_str(), &j.record)))
            .collect();
        if let Err(e) = self
            .store
            .write_batch(&pending.runs, &jobs, &pending.delete)
        {
            for (id, ..) in &pending.launches {
                self.active.remove(id);
            }
            return Err(e.into());
        }
        for id in &pending.delete {
            let _ = std::fs::remove_dir_all(self.config.runs_dir.join(id));
        }
        for (id, launch, log_dir, cancel_rx) in pending.launches {
            let done = self.done_tx.clone();
            tokio::spawn(async move {
                let outcome = launch.run(log_dir, cancel_rx).await;
                let _ = done.send((id, outcome));
            });
        }
        Ok(())
    }

    /// Records the outcome of finished runs (one transaction for all of them).
    fn finished(&mut self, done: Vec<(String, RunOutcome)>) {
        let mut pending = Pending::default();
        let now = ms((self.clock)());
        for (id, outcome) in done {
            let Some(active) = self.active.remove(&id) else {
                continue;
            };
            let mut run = active.record;
            run.finished_ms = Some(now);
            run.attempts = outcome.attempts.iter().map(|a| a.exit_code).collect();
            (run.status, run.reason) = match outcome.ending {
                Ending::Succeeded => (RunStatus::Succeeded, None),
                Ending::Failed => (
                    RunStatus::Failed,
                    Some("BackoffLimitExceeded: every attempt failed".into()),
                ),
                Ending::DeadlineExceeded => (
                    RunStatus::DeadlineExceeded,
                    Some("DeadlineExceeded: activeDeadlineSeconds passed".into()),
                ),
                Ending::Cancelled => (
                    RunStatus::Cancelled,
                    Some("stopped: replaced by a newer run, deleted, or the hub stopping".into()),
                ),
                Ending::StartFailed(why) => (RunStatus::StartFailed, Some(why)),
            };
            let succeeded = run.status.succeeded();
            pending.runs.push(run);
            self.remember(&mut pending, &active.job, id, succeeded);
        }
        if let Err(e) = self.commit(pending) {
            tracing::error!(error = %e, "cannot record runs' outcomes");
        }
    }
}

/// Kubernetes names a CronJob's Jobs NAME-<minutes since the epoch>.
fn run_id(job: &str, scheduled: DateTime<Utc>) -> String {
    format!("{job}-{}", scheduled.timestamp() / 60)
}

/// A manually triggered run: NAME-m<milliseconds since the epoch, base 36>. At most 62
/// characters for a 52-character job name, so it is also a valid Kubernetes Job name (the
/// Job controller copies the name into a label, which holds 63).
pub fn manual_run_id(job: &str, now: DateTime<Utc>) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = u64::try_from(ms(now)).unwrap_or(0);
    let mut digits = Vec::new();
    loop {
        digits.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    format!("{job}-m{}", String::from_utf8(digits).expect("ascii"))
}

/// The variables that name a run and its hub: every run has them, and so does the Job
/// `shoal jobs export --job` prints.
pub fn identity_env(job: &str, run_id: &str, hub_url: &str) -> Vec<(String, String)> {
    vec![
        ("SHOAL_RUN_ID".to_string(), run_id.to_string()),
        ("SHOAL_JOB".to_string(), job.to_string()),
        ("SHOAL_HUB_URL".to_string(), hub_url.to_string()),
    ]
}

/// Shoal's variables for a run, the same on the hub and in a cluster.
fn run_env(def: &JobDefinition, run_id: &str, config: &SchedulerConfig) -> Vec<(String, String)> {
    let mut env = identity_env(def.name(), run_id, &config.hub_url);
    if let Some(uri) = &config.mlflow_tracking_uri {
        env.push(("MLFLOW_TRACKING_URI".into(), uri.clone()));
    }
    if let Some(uri) = &config.dataset_uri {
        env.push(("SHOAL_DATASET_URI".into(), uri.clone()));
    }
    env
}

/// What the local runner executes for a run; `Err` names a Secret value that is not there.
fn run_spec(
    def: &JobDefinition,
    run_id: &str,
    config: &SchedulerConfig,
) -> Result<RunSpec, String> {
    let job_spec = &def.manifest.spec.job_template.spec;
    let c = &job_spec.template.spec.containers[0];
    let mut env: Vec<(String, String)> = Vec::new();
    for e in &c.env {
        match (&e.value, &e.value_from) {
            (Some(v), _) => env.push((e.name.clone(), v.clone())),
            (None, Some(from)) => env.push((e.name.clone(), value_from(&e.name, from, config)?)),
            (None, None) => env.push((e.name.clone(), String::new())),
        }
    }
    env.extend(run_env(def, run_id, config));
    if let Some(token) = &config.run_token {
        env.push(("SHOAL_TOKEN".into(), token.clone()));
    }
    if let Some(key) = &config.signing_key {
        env.push((
            "SHOAL_SIGNING_KEY_FILE".into(),
            key.to_string_lossy().into_owned(),
        ));
    }
    // What the run leaves for the hub to keep (a trained model, a report): listed and served
    // by /api/v1/runs/RUN/artifacts, kept as long as the run's history entry.
    env.push((
        "SHOAL_ARTIFACTS_DIR".into(),
        config
            .runs_dir
            .join(run_id)
            .join("artifacts")
            .display()
            .to_string(),
    ));
    Ok(RunSpec {
        argv: c.command.iter().chain(&c.args).cloned().collect(),
        env,
        working_dir: c.working_dir.as_ref().map(PathBuf::from),
        active_deadline: job_spec
            .active_deadline_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64)),
        backoff_limit: def.backoff_limit,
        backoff_base: config.backoff_base,
        log_limit: config.log_limit,
        grace: config.grace,
    })
}

/// Resolves `valueFrom` for a local run from files laid out as Kubernetes mounts them:
/// `secretKeyRef` from `DATA_DIR/secrets/NAME/KEY`, `configMapKeyRef` from
/// `DATA_DIR/configmaps/NAME/KEY`. Anything else, or a missing file, is an error naming what is
/// missing; an `optional: true` reference that is missing becomes empty.
fn value_from(
    var: &str,
    from: &serde_json::Value,
    config: &SchedulerConfig,
) -> Result<String, String> {
    let (kind, folder, r) = if let Some(r) = from.get("secretKeyRef") {
        ("Secret", "secrets", r)
    } else if let Some(r) = from.get("configMapKeyRef") {
        ("ConfigMap", "configmaps", r)
    } else {
        return Err(format!(
            "env {var}: the local runner resolves secretKeyRef and configMapKeyRef only (use shoal.dev/runner: kubernetes for {})",
            from.as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_default()
        ));
    };
    let (Some(name), Some(key)) = (
        r.get("name").and_then(|v| v.as_str()),
        r.get("key").and_then(|v| v.as_str()),
    ) else {
        return Err(format!("env {var}: a {kind} reference needs name and key"));
    };
    let optional = r.get("optional").and_then(|v| v.as_bool()).unwrap_or(false);
    let Some(dir) = &config.values_dir else {
        return Err(format!(
            "env {var}: {kind} {name:?} is needed but the hub has no data folder for it"
        ));
    };
    if [name, key]
        .iter()
        .any(|p| p.is_empty() || p.contains('/') || *p == ".." || *p == ".")
    {
        return Err(format!(
            "env {var}: {kind} name {name:?} and key {key:?} must be plain names"
        ));
    }
    let path = dir.join(folder).join(name).join(key);
    match std::fs::read_to_string(&path) {
        Ok(v) => Ok(v.trim_end_matches(['\n', '\r']).to_string()),
        Err(_) if optional => Ok(String::new()),
        Err(e) => Err(format!(
            "env {var}: {kind} {name:?} key {key:?} ({}): {e}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests;
