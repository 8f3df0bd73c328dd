//! Scheduled jobs through the real hub and the `shoal` CLI.

use std::time::Duration;

use shoal_e2e::shoal_cli as shoal;
use shoal_e2e::{Hub, wait_until};

const JOB: &str = r#"apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly-dump
spec:
  schedule: "0 3 * * *"
  timeZone: Europe/Berlin
  concurrencyPolicy: Forbid
  jobTemplate:
    spec:
      backoffLimit: 1
      template:
        spec:
          restartPolicy: OnFailure
          containers:
            - name: dump
              image: python:3.12
              command: ["sh", "-c"]
              args: ["echo dumping for $SHOAL_JOB run $SHOAL_RUN_ID; echo hub=$SHOAL_HUB_URL"]
              env:
                - name: BUCKET
                  value: sensor-hourly
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_run_and_read_logs_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, JOB).unwrap();

    let (ok, out, err) = shoal(&hub, &["jobs", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "job nightly-dump applied");
    let (ok, list, _) = shoal(&hub, &["jobs", "list"]);
    assert!(ok);
    let row = list.lines().nth(1).unwrap();
    assert!(
        row.starts_with("nightly-dump")
            && row.contains("0 3 * * *")
            && row.contains("Europe/Berlin")
            && row.contains("Forbid"),
        "{list}"
    );

    let (ok, out, err) = shoal(&hub, &["jobs", "run", "nightly-dump", "-o", "json"]);
    assert!(ok, "{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = run["run"].as_str().unwrap().to_string();
    wait_until("the run to finish", Duration::from_secs(20), || {
        let id = id.clone();
        let hub = &hub;
        async move { hub.get(&format!("/api/v1/runs/{id}")).await["status"] == "succeeded" }
    })
    .await;
    let (ok, logs, _) = shoal(&hub, &["runs", "logs", &id]);
    assert!(ok);
    assert!(
        logs.contains(&format!("dumping for nightly-dump run {id}")),
        "{logs}"
    );
    assert!(logs.contains(&format!("hub={}", hub.http_url())), "{logs}");
    let (ok, show, _) = shoal(&hub, &["runs", "show", &id]);
    assert!(ok && show.contains("succeeded"), "{show}");

    // Suspend, resume, delete.
    assert!(shoal(&hub, &["jobs", "suspend", "nightly-dump"]).0);
    assert_eq!(hub.get("/api/v1/jobs/nightly-dump").await["suspend"], true);
    assert!(shoal(&hub, &["jobs", "resume", "nightly-dump"]).0);
    assert!(shoal(&hub, &["jobs", "delete", "nightly-dump"]).0);
    let (ok, _, err) = shoal(&hub, &["jobs", "show", "nightly-dump"]);
    assert!(!ok && err.contains("no job named"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_are_refused_with_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let cases = [
        (JOB.replace("0 3 * * *", "0 25 * * *"), "spec.schedule"),
        (
            JOB.replace("Europe/Berlin", "Europe/Atlantis"),
            "spec.timeZone",
        ),
        (
            JOB.replace("backoffLimit: 1", "backoffLimit: -1"),
            "spec.jobTemplate.spec.backoffLimit",
        ),
        (
            JOB.replace(
                "  concurrencyPolicy: Forbid",
                "  concurrencyPolicy: Forbid\n  retries: 3",
            ),
            "spec.retries",
        ),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, text).unwrap();
        let (ok, _, err) = shoal(&hub, &["jobs", "apply", "-f", file.to_str().unwrap()]);
        assert!(!ok);
        assert!(
            err.contains(field) && err.contains("HTTP 400"),
            "{field}: {err}"
        );
    }
    assert_eq!(
        hub.get("/api/v1/jobs").await["jobs"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "nothing half-applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_a_hub_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(dir.path()).await;
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, JOB).unwrap();
    assert!(shoal(&hub, &["jobs", "apply", "-f", file.to_str().unwrap()]).0);
    hub.crash_and_restart(Duration::from_millis(200)).await;
    let job = hub.get("/api/v1/jobs/nightly-dump").await;
    assert_eq!(job["schedule"], "0 3 * * *");
    assert!(job["next_schedule_ms"].as_i64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_for_kubernetes_passes_the_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, JOB).unwrap();
    assert!(shoal(&hub, &["jobs", "apply", "-f", file.to_str().unwrap()]).0);
    for args in [
        &["jobs", "export", "nightly-dump", "--k8s"][..],
        &["jobs", "export", "nightly-dump", "--k8s", "--job"][..],
    ] {
        let (ok, yaml, err) = shoal(&hub, args);
        assert!(ok, "{err}");
        let out_file = dir.path().join("export.yaml");
        std::fs::write(&out_file, &yaml).unwrap();
        let (valid, report) = shoal_e2e::kube_validate(&out_file);
        assert!(valid, "{args:?}:\n{yaml}\n{report}");
        assert!(yaml.contains("\"apiVersion\": \"batch/v1\""));
    }
    let (_, job_yaml, _) = shoal(&hub, &["jobs", "export", "nightly-dump", "--job"]);
    assert!(
        job_yaml.contains("\"kind\": \"Job\"") && job_yaml.contains("SHOAL_RUN_ID"),
        "{job_yaml}"
    );
}
