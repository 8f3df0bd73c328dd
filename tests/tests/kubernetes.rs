//! The Kubernetes runner through the real hub, against a **stub** of the Kubernetes API.
//!
//! No Kubernetes API server can be installed on the machines this suite runs on (no
//! kube-apiserver, kind, k3s, kwok or envtest binaries are reachable), so this file serves the
//! handful of endpoints the runner calls — create a Job, read its status, delete it, list its
//! pods, read a pod's log — and records every request. It checks what Shoal sends (paths,
//! namespace, bearer token, and the Job itself, validated against the Kubernetes schemas with
//! `kubernetes-validate`), not how a real cluster schedules pods. docs/jobs.md says the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::{Value, json};
use shoal_e2e::shoal_cli as shoal;
use shoal_e2e::{Hub, free_port, kube_validate, run_bin, wait_until};

#[derive(Clone, Debug)]
struct Request {
    method: &'static str,
    path: String,
    bearer: Option<String>,
}

#[derive(Default)]
struct Cluster {
    requests: Vec<Request>,
    /// Created Jobs by name.
    jobs: HashMap<String, Value>,
}

type Shared = Arc<Mutex<Cluster>>;

fn record(s: &Shared, method: &'static str, path: String, headers: &HeaderMap) {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    s.lock().unwrap().requests.push(Request {
        method,
        path,
        bearer,
    });
}

async fn create_job(
    State(s): State<Shared>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    Json(mut job): Json<Value>,
) -> (StatusCode, Json<Value>) {
    record(
        &s,
        "POST",
        format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        &headers,
    );
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    s.lock().unwrap().jobs.insert(name, job.clone());
    job["metadata"]["namespace"] = json!(ns);
    job["metadata"]["uid"] = json!("0b5e2c1e-0000-4000-8000-000000000001");
    job["metadata"]["creationTimestamp"] = json!("2026-11-23T10:00:00Z");
    (StatusCode::CREATED, Json(job))
}

/// Jobs named `slow-…` stay active; the others have completed by the first status read.
async fn job_status(
    State(s): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, StatusCode> {
    record(
        &s,
        "GET",
        format!("/apis/batch/v1/namespaces/{ns}/jobs/{name}/status"),
        &headers,
    );
    let mut job = s
        .lock()
        .unwrap()
        .jobs
        .get(&name)
        .cloned()
        .ok_or(StatusCode::NOT_FOUND)?;
    job["status"] = if name.starts_with("slow-") {
        json!({ "active": 1 })
    } else {
        json!({ "succeeded": 1, "conditions": [
            { "type": "SuccessCriteriaMet", "status": "True" },
            { "type": "Complete", "status": "True" } ] })
    };
    Ok(Json(job))
}

async fn delete_job(
    State(s): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Json<Value> {
    record(
        &s,
        "DELETE",
        format!("/apis/batch/v1/namespaces/{ns}/jobs/{name}"),
        &headers,
    );
    s.lock().unwrap().jobs.remove(&name);
    Json(json!({ "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success" }))
}

async fn list_pods(
    State(s): State<Shared>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Json<Value> {
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    record(
        &s,
        "GET",
        format!("/api/v1/namespaces/{ns}/pods?labelSelector={selector}"),
        &headers,
    );
    let job = selector.strip_prefix("job-name=").unwrap_or_default();
    Json(json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {},
        "items": [{
            "metadata": { "name": format!("{job}-x7k2p"), "namespace": ns,
                          "creationTimestamp": "2026-11-23T10:00:01Z" },
            "status": { "containerStatuses": [{
                "name": "train", "ready": false, "restartCount": 0,
                "image": "python:3.12", "imageID": "",
                "state": { "terminated": { "exitCode": 0 } } }] }
        }]
    }))
}

async fn pod_log(
    State(s): State<Shared>,
    Path((ns, pod)): Path<(String, String)>,
    headers: HeaderMap,
) -> String {
    record(
        &s,
        "GET",
        format!("/api/v1/namespaces/{ns}/pods/{pod}/log"),
        &headers,
    );
    format!("epoch 1 loss=0.12 on {pod}\n")
}

/// Starts the stub on 127.0.0.1 and writes a kubeconfig for it (namespace `ml`, a token).
async fn stub_cluster(dir: &std::path::Path) -> (Shared, std::path::PathBuf) {
    let state: Shared = Arc::default();
    let app = Router::new()
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs",
            axum::routing::post(create_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
            axum::routing::delete(delete_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs/{name}/status",
            get(job_status),
        )
        .route("/api/v1/namespaces/{ns}/pods", get(list_pods))
        .route("/api/v1/namespaces/{ns}/pods/{pod}/log", get(pod_log))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let kubeconfig = shoal_e2e::stub_kubeconfig(dir, addr);
    (state, kubeconfig)
}

fn job_manifest(name: &str) -> String {
    format!(
        r#"apiVersion: batch/v1
kind: CronJob
metadata:
  name: {name}
  annotations:
    shoal.dev/runner: kubernetes
spec:
  schedule: "@daily"
  concurrencyPolicy: Replace
  jobTemplate:
    spec:
      backoffLimit: 2
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: train
              image: python:3.12
              args: ["python", "-m", "train"]
"#
    )
}

async fn start_hub(dir: &std::path::Path, kubeconfig: &std::path::Path) -> Hub {
    Hub::start_on(
        &dir.join("hub"),
        free_port(),
        free_port(),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--kube-poll",
            "100ms",
        ],
    )
    .await
}

async fn wait_status(hub: &Hub, id: &str, status: &str) -> Value {
    let path = format!("/api/v1/runs/{id}");
    wait_until(
        &format!("run {id} to be {status}"),
        Duration::from_secs(20),
        || async { hub.get(&path).await["status"] == status },
    )
    .await;
    hub.get(&path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_submitted_as_a_job_followed_and_its_log_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, kubeconfig) = stub_cluster(dir.path()).await;
    let hub = start_hub(dir.path(), &kubeconfig).await;
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, job_manifest("train")).unwrap();
    let (ok, _, err) = shoal(&hub, &["jobs", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{err}");

    let (ok, out, err) = shoal(&hub, &["jobs", "run", "train", "-o", "json"]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string();
    let run = wait_status(&hub, &id, "succeeded").await;
    assert_eq!(run["attempts"].as_array().map(Vec::len), Some(1), "{run}");

    let (requests, submitted) = {
        let c = cluster.lock().unwrap();
        (c.requests.clone(), c.jobs.get(&id).cloned())
    };
    let create = requests
        .iter()
        .find(|r| r.method == "POST")
        .expect("a Job was created");
    assert_eq!(create.path, "/apis/batch/v1/namespaces/ml/jobs");
    assert!(
        requests
            .iter()
            .all(|r| r.bearer.as_deref() == Some("stub-token")),
        "every request carries the kubeconfig's token: {requests:?}"
    );
    // What was submitted is a valid batch/v1 Job carrying the run's variables.
    let job = submitted.expect("the Job as submitted");
    assert_eq!(job["metadata"]["name"], id.as_str());
    let env = job["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("SHOAL_RUN_ID") && env.contains(&id), "{env}");
    let job_file = dir.path().join("submitted.json");
    std::fs::write(&job_file, serde_json::to_string_pretty(&job).unwrap()).unwrap();
    let (valid, report) = kube_validate(&job_file);
    assert!(valid, "{job}\n{report}");

    let (ok, log, err) = shoal(&hub, &["runs", "logs", &id]);
    assert!(ok, "{err}");
    assert!(log.contains("loss=0.12"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_job_deletes_its_running_kubernetes_job() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, kubeconfig) = stub_cluster(dir.path()).await;
    let hub = start_hub(dir.path(), &kubeconfig).await;
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, job_manifest("slow-train")).unwrap();
    assert!(shoal(&hub, &["jobs", "apply", "-f", file.to_str().unwrap()]).0);
    let (ok, out, err) = shoal(&hub, &["jobs", "run", "slow-train", "-o", "json"]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until(
        "the Job to be followed",
        Duration::from_secs(20),
        || async {
            cluster
                .lock()
                .unwrap()
                .requests
                .iter()
                .any(|r| r.path.ends_with(&format!("/jobs/{id}/status")))
        },
    )
    .await;
    assert_eq!(
        hub.get(&format!("/api/v1/runs/{id}")).await["status"],
        "running"
    );

    let (ok, _, err) = shoal(&hub, &["jobs", "delete", "slow-train"]);
    assert!(ok, "{err}");
    wait_until(
        "the Kubernetes Job to be deleted",
        Duration::from_secs(20),
        || async {
            cluster.lock().unwrap().requests.iter().any(|r| {
                r.method == "DELETE" && r.path == format!("/apis/batch/v1/namespaces/ml/jobs/{id}")
            })
        },
    )
    .await;
}

#[test]
fn an_unreadable_kubeconfig_stops_the_hub_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let out = run_bin(
        "shoal",
        &[
            "serve",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--grpc-listen",
            &grpc,
            "--http-listen",
            &http,
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
}
