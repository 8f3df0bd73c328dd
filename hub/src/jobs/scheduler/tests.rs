use std::sync::Mutex;

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    store: JobStore,
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            JobStore::new(crate::store::Store::open(&dir.path().join("db")).unwrap()).unwrap();
        let now = Arc::new(Mutex::new(t("2026-11-23T10:00:30Z")));
        Self { dir, store, now }
    }

    fn start(&self) -> (Scheduler, watch::Sender<bool>) {
        let now = self.now.clone();
        let clock: Clock = Arc::new(move || *now.lock().unwrap());
        let config = SchedulerConfig {
            signing_key: None,
            runs_dir: self.dir.path().join("runs"),
            hub_url: "http://127.0.0.1:8080".into(),
            run_token: None,
            mlflow_tracking_uri: Some("http://127.0.0.1:5000".into()),
            dataset_uri: Some("s3://datasets/fleet".into()),
            values_dir: Some(self.dir.path().to_path_buf()),
            backoff_base: Duration::from_millis(20),
            log_limit: 1 << 16,
            grace: Duration::from_millis(200),
            cluster: None,
        };
        let (stop, rx) = watch::channel(false);
        let (s, _task) = Scheduler::start(self.store.clone(), config, clock, rx).unwrap();
        (s, stop)
    }

    fn set(&self, time: &str) {
        *self.now.lock().unwrap() = t(time);
    }

    fn runs(&self, job: &str) -> Vec<RunRecord> {
        self.store.runs(Some(job)).unwrap()
    }

    /// Polls the store (the only place a run's outcome shows) until run `id` has finished.
    /// Short polls, so a test waits about as long as its process runs; a generous deadline,
    /// so a loaded machine does not fail it.
    async fn wait_finished(&self, id: &str) -> RunRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self.store.run(id).unwrap()
                && r.status.finished()
            {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} did not finish within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn job(name: &str, schedule: &str, script: &str, extra_spec: &str) -> JobDefinition {
    let yaml = format!(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: {name}\nspec:\n  schedule: \"{schedule}\"\n{extra_spec}  jobTemplate:\n    spec:\n      backoffLimit: 0\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: c\n              command: [\"sh\", \"-c\", {script:?}]\n"
    );
    manifest::parse(&yaml).unwrap()
}

#[tokio::test]
async fn runs_on_schedule_with_shoal_variables() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    s.apply(job(
        "hello",
        "* * * * *",
        "echo $SHOAL_JOB $SHOAL_RUN_ID $MLFLOW_TRACKING_URI $SHOAL_DATASET_URI",
        "",
    ))
    .await
    .unwrap();
    s.tick().await.unwrap();
    assert!(f.runs("hello").is_empty(), "nothing before 10:01");
    f.set("2026-11-23T10:01:02Z");
    s.tick().await.unwrap();
    let id = format!("hello-{}", t("2026-11-23T10:01:00Z").timestamp() / 60);
    let run = f.wait_finished(&id).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(
        run.scheduled_ms,
        t("2026-11-23T10:01:00Z").timestamp_millis()
    );
    let log =
        std::fs::read_to_string(f.dir.path().join("runs").join(&id).join("attempt-1.log")).unwrap();
    assert_eq!(
        log.trim(),
        format!("hello {id} http://127.0.0.1:5000 s3://datasets/fleet")
    );
}

#[tokio::test]
async fn forbid_skips_while_a_run_is_active_and_records_it() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    s.apply(job(
        "slow",
        "* * * * *",
        "sleep 5",
        "  concurrencyPolicy: Forbid\n",
    ))
    .await
    .unwrap();
    f.set("2026-11-23T10:01:01Z");
    s.tick().await.unwrap();
    f.set("2026-11-23T10:02:01Z");
    s.tick().await.unwrap();
    let runs = f.runs("slow");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].status, RunStatus::Running);
    assert_eq!(runs[1].status, RunStatus::Skipped);
    assert!(runs[1].reason.as_deref().unwrap().contains("Forbid"));
}

#[tokio::test]
async fn replace_kills_the_active_run() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    s.apply(job(
        "swap",
        "* * * * *",
        "sleep 30",
        "  concurrencyPolicy: Replace\n",
    ))
    .await
    .unwrap();
    f.set("2026-11-23T10:01:01Z");
    s.tick().await.unwrap();
    let first = f.runs("swap")[0].id.clone();
    f.set("2026-11-23T10:02:01Z");
    s.tick().await.unwrap();
    assert_eq!(f.wait_finished(&first).await.status, RunStatus::Cancelled);
    let runs = f.runs("swap");
    assert_eq!(
        runs.iter()
            .filter(|r| r.status == RunStatus::Running)
            .count(),
        1
    );
}

#[tokio::test]
async fn suspend_stops_new_runs_but_not_the_active_one() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    s.apply(job("pausable", "* * * * *", "sleep 1", ""))
        .await
        .unwrap();
    f.set("2026-11-23T10:01:01Z");
    s.tick().await.unwrap();
    s.set_suspend("pausable", true).await.unwrap();
    f.set("2026-11-23T10:05:01Z");
    s.tick().await.unwrap();
    let runs = f.runs("pausable");
    assert_eq!(runs.len(), 1, "no new run while suspended");
    assert_eq!(
        f.wait_finished(&runs[0].id).await.status,
        RunStatus::Succeeded,
        "the active run finished"
    );
    // Resumed at 10:05:01: of the starts missed while suspended, only the most recent (10:05) runs.
    s.set_suspend("pausable", false).await.unwrap();
    s.tick().await.unwrap();
    let runs = f.runs("pausable");
    assert_eq!(runs.len(), 2);
    assert_eq!(
        runs[1].scheduled_ms,
        t("2026-11-23T10:05:00Z").timestamp_millis()
    );
}

#[tokio::test]
async fn a_missed_start_past_its_deadline_is_recorded() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    s.apply(job(
        "strict",
        "0 * * * *",
        "true",
        "  startingDeadlineSeconds: 60\n",
    ))
    .await
    .unwrap();
    f.set("2026-11-23T11:05:00Z"); // 11:00 was five minutes ago
    s.tick().await.unwrap();
    let runs = f.runs("strict");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Skipped);
    assert!(
        runs[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("starting deadline")
    );
}

#[tokio::test]
async fn history_limits_prune_old_runs_and_their_logs() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    s.apply(job(
        "pruned",
        "* * * * *",
        "true",
        "  successfulJobsHistoryLimit: 2\n",
    ))
    .await
    .unwrap();
    let mut ids = Vec::new();
    for minute in 1..=4 {
        f.set(&format!("2026-11-23T10:0{minute}:01Z"));
        s.tick().await.unwrap();
        let id = format!(
            "pruned-{}",
            t(&format!("2026-11-23T10:0{minute}:00Z")).timestamp() / 60
        );
        f.wait_finished(&id).await;
        ids.push(id);
    }
    // The scheduler records an outcome and its prunes in one transaction, then removes the
    // pruned logs; a tick is answered only after that pass is done, so it is the barrier.
    s.tick().await.unwrap();
    let kept: Vec<String> = f.runs("pruned").into_iter().map(|r| r.id).collect();
    assert_eq!(kept, ids[2..].to_vec());
    assert!(
        !f.dir.path().join("runs").join(&ids[0]).exists(),
        "pruned logs are removed"
    );
    assert!(
        !f.dir.path().join("runs").join(&ids[1]).exists(),
        "the last pruned run's logs are removed too"
    );
    assert!(
        f.dir.path().join("runs").join(&ids[3]).exists(),
        "kept runs keep their logs"
    );
}

#[tokio::test]
async fn restart_keeps_jobs_and_marks_in_flight_runs_interrupted() {
    let f = Fixture::new();
    {
        let (s, stop) = f.start();
        s.apply(job("durable", "* * * * *", "sleep 30", ""))
            .await
            .unwrap();
        f.set("2026-11-23T10:01:01Z");
        s.tick().await.unwrap();
        assert_eq!(f.runs("durable")[0].status, RunStatus::Running);
        // The hub dies: the record still says Running.
        std::mem::forget(stop);
        std::mem::forget(s);
    }
    // A new scheduler on the same store (the hub restarted).
    let (s, _stop) = f.start();
    let run = &f.runs("durable")[0];
    assert_eq!(run.status, RunStatus::Interrupted);
    assert!(run.reason.as_deref().unwrap().contains("hub stopped"));
    // The job is still there and runs at its next time, not again for 10:01.
    f.set("2026-11-23T10:01:30Z");
    s.tick().await.unwrap();
    assert_eq!(f.runs("durable").len(), 1);
    f.set("2026-11-23T10:02:01Z");
    s.tick().await.unwrap();
    assert_eq!(f.runs("durable").len(), 2);
}

#[tokio::test]
async fn manual_trigger_and_delete() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    s.apply(job("adhoc", "0 0 1 1 *", "echo now", ""))
        .await
        .unwrap();
    let id = s.trigger("adhoc").await.unwrap();
    let run = f.wait_finished(&id).await;
    assert!(run.manual && run.status == RunStatus::Succeeded);
    assert!(matches!(
        s.trigger("nope").await,
        Err(JobError::NotFound(_))
    ));
    s.delete("adhoc").await.unwrap();
    assert!(f.store.jobs().unwrap().is_empty());
}

#[tokio::test]
async fn secret_key_refs_come_from_the_secrets_folder() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    let yaml = "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: withsecret\nspec:\n  schedule: \"0 0 1 1 *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: c\n              command: [\"sh\", \"-c\", \"echo key=$ACCESS_KEY\"]\n              env:\n                - name: ACCESS_KEY\n                  valueFrom:\n                    secretKeyRef:\n                      name: minio\n                      key: password\n";
    s.apply(manifest::parse(yaml).unwrap()).await.unwrap();
    // Missing: the run is recorded as failed to start, saying which Secret.
    let id = s.trigger("withsecret").await.unwrap();
    let run = f.wait_finished(&id).await;
    assert_eq!(run.status, RunStatus::StartFailed);
    assert!(
        run.reason
            .as_deref()
            .unwrap()
            .contains("Secret \"minio\" key \"password\""),
        "{:?}",
        run.reason
    );
    // Present: the value reaches the process.
    std::fs::create_dir_all(f.dir.path().join("secrets/minio")).unwrap();
    std::fs::write(f.dir.path().join("secrets/minio/password"), "s3cret\n").unwrap();
    f.set("2026-11-23T10:00:31Z");
    let id = s.trigger("withsecret").await.unwrap();
    assert_eq!(f.wait_finished(&id).await.status, RunStatus::Succeeded);
    let log =
        std::fs::read_to_string(f.dir.path().join("runs").join(&id).join("attempt-1.log")).unwrap();
    assert_eq!(log.trim(), "key=s3cret");
}

#[tokio::test]
async fn a_kubernetes_job_without_a_cluster_fails_to_start_saying_why() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    let yaml = "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: remote\n  annotations:\n    shoal.dev/runner: kubernetes\nspec:\n  schedule: \"@hourly\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: c\n              image: python:3.12\n";
    s.apply(manifest::parse(yaml).unwrap()).await.unwrap();
    let id = s.trigger("remote").await.unwrap();
    let run = f.wait_finished(&id).await;
    assert_eq!(run.status, RunStatus::StartFailed);
    assert!(
        run.reason.as_deref().unwrap().contains("--kubeconfig"),
        "{:?}",
        run.reason
    );
}

#[test]
fn manual_run_ids_are_valid_kubernetes_job_names() {
    let name = "a".repeat(52);
    let id = manual_run_id(&name, t("2026-11-23T10:01:02.345Z"));
    assert!(id.len() <= 63, "{id} ({} characters)", id.len());
    assert!(id.starts_with(&format!("{name}-m")));
    let later = manual_run_id(&name, t("2026-11-23T10:01:02.346Z"));
    assert_ne!(id, later, "one millisecond apart, two names");
}

#[tokio::test]
async fn config_map_key_refs_come_from_the_configmaps_folder() {
    let f = Fixture::new();
    let (s, _stop) = f.start();
    let yaml = "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: withconfig\nspec:\n  schedule: \"0 0 1 1 *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: c\n              command: [\"sh\", \"-c\", \"echo bucket=$BUCKET level=$LEVEL\"]\n              env:\n                - name: BUCKET\n                  valueFrom:\n                    configMapKeyRef:\n                      name: storage\n                      key: bucket\n                - name: LEVEL\n                  valueFrom:\n                    configMapKeyRef:\n                      name: storage\n                      key: level\n                      optional: true\n";
    s.apply(manifest::parse(yaml).unwrap()).await.unwrap();
    let id = s.trigger("withconfig").await.unwrap();
    let run = f.wait_finished(&id).await;
    assert_eq!(run.status, RunStatus::StartFailed);
    assert!(
        run.reason
            .as_deref()
            .unwrap()
            .contains("ConfigMap \"storage\" key \"bucket\""),
        "{:?}",
        run.reason
    );
    std::fs::create_dir_all(f.dir.path().join("configmaps/storage")).unwrap();
    std::fs::write(
        f.dir.path().join("configmaps/storage/bucket"),
        "sensor-hourly",
    )
    .unwrap();
    f.set("2026-11-23T10:00:31Z");
    let id = s.trigger("withconfig").await.unwrap();
    assert_eq!(f.wait_finished(&id).await.status, RunStatus::Succeeded);
    let log =
        std::fs::read_to_string(f.dir.path().join("runs").join(&id).join("attempt-1.log")).unwrap();
    assert_eq!(log.trim(), "bucket=sensor-hourly level=");
}
