//! The hub's OpenAPI document (`/api/v1/openapi.json`): valid OpenAPI 3.1 by an independent
//! validator (`openapi-spec-validator`, PyPI), complete (every route the hub serves, and only
//! those), and true to the hub's real answers: every operation is called, on a hub with devices,
//! a job with a finished run and an export, for its successes and its errors, and each answer's
//! status, content type and body are checked against the document by `tests/python/
//! openapi_check.py` (`jsonschema`, PyPI), which also refuses properties the document does not
//! declare. Fails (never skips) when the validators are missing; `tests/run` installs them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use shoal_e2e::{Hub, free_port, http_client, ingest, pi_sample, wait_until, which};
use shoal_proto::v1::{
    Cpu, Disk, Gpu, LoadAverage, Memory, NetInterface, PiBoard, Sample, Temperature,
};

/// Every route the hub serves (method, path as the document writes it). A route added to the
/// hub must be added here, and documented: the test fails otherwise.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/devices"),
    ("get", "/api/v1/devices/{id}"),
    ("get", "/api/v1/devices/{id}/samples"),
    ("get", "/api/v1/devices/{id}/series"),
    ("post", "/api/v1/datasets/export"),
    ("get", "/api/v1/jobs"),
    ("post", "/api/v1/jobs"),
    ("get", "/api/v1/jobs/{name}"),
    ("delete", "/api/v1/jobs/{name}"),
    ("post", "/api/v1/jobs/{name}/run"),
    ("get", "/api/v1/jobs/{name}/export"),
    ("post", "/api/v1/jobs/{name}/suspend"),
    ("post", "/api/v1/jobs/{name}/resume"),
    ("get", "/api/v1/runs"),
    ("get", "/api/v1/runs/{id}"),
    ("get", "/api/v1/runs/{id}/logs"),
    ("get", "/api/v1/runs/{id}/artifacts"),
    ("get", "/api/v1/runs/{id}/artifacts/{path}"),
    ("get", "/api/v1/tokens"),
    ("post", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{id}"),
    ("get", "/api/v1/whoami"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/enrollments"),
    ("post", "/api/v1/enrollments"),
    ("get", "/api/v1/identities"),
    ("post", "/api/v1/devices/{id}/revoke"),
    ("get", "/api/v1/models/deployments"),
    ("get", "/api/v1/models/registry"),
    ("post", "/api/v1/models/deployments"),
    ("delete", "/api/v1/models/deployments/{name}"),
    ("post", "/api/v1/models/seldon"),
    ("get", "/api/v1/alerts"),
    ("post", "/api/v1/alerts/{id}/ack"),
    ("get", "/api/v1/provenance"),
    ("get", "/api/v1/sinks"),
    ("get", "/api/v1/store"),
    ("post", "/api/v1/provenance"),
];

const JOB: &str = r#"apiVersion: batch/v1
kind: CronJob
metadata:
  name: probe
spec:
  schedule: "0 3 * * *"
  timeZone: Europe/Berlin
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: probe
              image: busybox
              command: ["sh", "-c"]
              args: ["echo probing; mkdir -p $SHOAL_ARTIFACTS_DIR/sub && echo 42 > $SHOAL_ARTIFACTS_DIR/sub/answer.txt"]
"#;

/// A sample with every part of the contract filled in, so each of the document's sample
/// schemas meets a real answer.
fn full_sample(seq: u64, start_ms: i64) -> Sample {
    let gpu = Gpu {
        index: 0,
        name: "NVIDIA A100".into(),
        uuid: "GPU-1".into(),
        utilization_percent: 50.0,
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 40 << 30,
        temperature_celsius: 60.0,
        power_watts: 200.0,
        source: "nvml".into(),
        ..Default::default()
    };
    Sample {
        seq,
        timestamp_ms: start_ms + seq as i64 * 1000,
        cpu: Some(Cpu {
            total_percent: 12.5,
            core_percent: vec![10.0, 15.0],
        }),
        load: Some(LoadAverage {
            one: 0.5,
            five: None,
            fifteen: Some(0.25),
        }),
        memory: Some(Memory {
            total_bytes: 8 << 30,
            used_bytes: 2 << 30,
            available_bytes: 6 << 30,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
        }),
        disks: vec![Disk {
            mount_point: "/".into(),
            device: "/dev/sda1".into(),
            filesystem: "ext4".into(),
            total_bytes: 100 << 30,
            used_bytes: 10 << 30,
        }],
        networks: vec![NetInterface {
            name: "eth0".into(),
            rx_bytes: 1000,
            tx_bytes: 2000,
            rx_bytes_per_second: 10.0,
            tx_bytes_per_second: 20.0,
        }],
        uptime_seconds: Some(3600),
        temperatures: vec![Temperature {
            sensor: "cpu".into(),
            celsius: 45.0,
        }],
        process_count: Some(100),
        gpus: vec![Gpu {
            mig_devices: vec![gpu.clone()],
            ..gpu
        }],
        pi: Some(PiBoard {
            soc_temperature_celsius: 50.0,
            throttled_known: true,
            ..Default::default()
        }),
    }
}

/// The answers the test got, kept as files for the checker.
struct Recorder {
    dir: PathBuf,
    base: String,
    token: String,
    cases: Vec<Value>,
}

impl Recorder {
    /// Calls `method path` (the document's `template`), expecting `status`, and records the
    /// answer; returns its body.
    async fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<(&str, &str)>,
        status: u16,
    ) -> Vec<u8> {
        let client = shoal_e2e::authed_client(&self.token);
        let url = format!("{}{path}", self.base);
        let mut req = client.request(method.to_uppercase().parse().unwrap(), &url);
        if let Some((content_type, text)) = body {
            if !content_type.is_empty() {
                req = req.header("content-type", content_type);
            }
            req = req.body(text.to_string());
        }
        let resp = req.send().await.expect("hub REST request");
        let got = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = resp.bytes().await.expect("body").to_vec();
        assert_eq!(
            got,
            status,
            "{} {path}: {}",
            method.to_uppercase(),
            String::from_utf8_lossy(&bytes)
        );
        if status == 404 {
            assert!(
                !String::from_utf8_lossy(&bytes).contains("no such endpoint"),
                "{} {path} reached the fallback: the hub does not serve {template}",
                method.to_uppercase()
            );
        }
        let file = self.dir.join(format!("{}.body", self.cases.len()));
        std::fs::write(&file, &bytes).unwrap();
        self.cases.push(json!({
            "method": method,
            "path": template,
            "status": status,
            "content_type": content_type,
            "body_file": file,
            "note": path,
        }));
        bytes
    }

    async fn get(&mut self, template: &str, path: &str, status: u16) -> Value {
        let body = self.call("get", template, path, None, status).await;
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    }
}

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                out.insert((method.clone(), path.clone()));
            }
        }
    }
    out
}

fn run_tool(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn checker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openapi_check.py")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_complete_and_true_to_real_answers() {
    let validator = which("openapi-spec-validator").expect(
        "openapi-spec-validator is not installed (tests/run installs it from PyPI into a venv on PATH)",
    );
    // The checker runs on the validator's venv, which has jsonschema.
    let python = validator.with_file_name("python3");
    assert!(
        python.exists(),
        "{} is missing: openapi-spec-validator should come from a venv",
        python.display()
    );

    let dir = tempfile::tempdir().unwrap();
    // A provenance key the hub trusts, and a statement it signed.
    let (signer, _, public) = shoal_ml::provenance::SigningKey::generate().unwrap();
    let public_key = dir.path().join("provenance.pub");
    std::fs::write(&public_key, public).unwrap();
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        shoal_e2e::free_port(),
        shoal_e2e::free_port(),
        &[
            "--provenance-key",
            public_key.to_str().unwrap(),
            // A sink whose broker is not there: its status has every field, the error too.
            "--sink",
            "kafka://127.0.0.1:1/fleet?name=lake&max_backoff=1s",
        ],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let start = now - 120_000;
    ingest(&hub.grpc_url(), "pi-1", 60, move |seq| {
        pi_sample(seq, start, 1000, 0.0)
    })
    .await
    .unwrap();
    ingest(&hub.grpc_url(), "gpu-1", 3, move |seq| {
        full_sample(seq, start)
    })
    .await
    .unwrap();

    let answers = dir.path().join("answers");
    std::fs::create_dir_all(&answers).unwrap();
    let mut r = Recorder {
        dir: answers.clone(),
        base: hub.http_url(),
        token: hub.token.clone(),
        cases: Vec::new(),
    };

    // The document itself.
    let doc = r
        .get("/api/v1/openapi.json", "/api/v1/openapi.json", 200)
        .await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "Shoal hub API");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let spec = dir.path().join("openapi.json");
    std::fs::write(&spec, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();

    // (a) Valid OpenAPI 3.1, by a validator that is not the generator.
    let (ok, report) = run_tool(Command::new(&validator).arg(&spec));
    assert!(
        ok && report.contains("OK"),
        "openapi-spec-validator: {report}"
    );

    // Complete: the document's operations are the hub's routes.
    let documented = operations(&doc);
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, expected,
        "the document's operations differ from the routes the hub serves"
    );

    // (b) Real answers: ops.
    r.get("/healthz", "/healthz", 200).await;
    r.get("/readyz", "/readyz", 200).await;
    r.call("get", "/metrics", "/metrics", None, 200).await;

    // Devices.
    let list = r.get("/api/v1/devices", "/api/v1/devices", 200).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 2, "{list}");
    for id in ["pi-1", "gpu-1"] {
        let d = r
            .get(
                "/api/v1/devices/{id}",
                &format!("/api/v1/devices/{id}"),
                200,
            )
            .await;
        assert!(d["latest_sample"].is_object(), "{d}");
        r.get(
            "/api/v1/devices/{id}/samples",
            &format!("/api/v1/devices/{id}/samples"),
            200,
        )
        .await;
    }
    let page = r
        .get(
            "/api/v1/devices/{id}/samples",
            "/api/v1/devices/pi-1/samples?after_seq=10&limit=5",
            200,
        )
        .await;
    assert_eq!(page["next_after_seq"], 15, "{page}");
    let series = r
        .get(
            "/api/v1/devices/{id}/series",
            "/api/v1/devices/pi-1/series?metric=cpu_percent&from=10m&step=30s",
            200,
        )
        .await;
    assert!(!series["points"].as_array().unwrap().is_empty(), "{series}");
    r.get("/api/v1/devices/{id}", "/api/v1/devices/nope", 404)
        .await;
    r.get(
        "/api/v1/devices/{id}/samples",
        "/api/v1/devices/nope/samples",
        404,
    )
    .await;
    r.get(
        "/api/v1/devices/{id}/samples",
        "/api/v1/devices/pi-1/samples?limit=0",
        400,
    )
    .await;
    let bad_query = r
        .get(
            "/api/v1/devices/{id}/samples",
            "/api/v1/devices/pi-1/samples?limit=many",
            400,
        )
        .await;
    assert!(
        bad_query["error"].is_string(),
        "a refused query string answers the API's error form: {bad_query}"
    );
    r.get(
        "/api/v1/devices/{id}/series",
        "/api/v1/devices/pi-1/series",
        400,
    )
    .await;
    r.get(
        "/api/v1/devices/{id}/series",
        "/api/v1/devices/nope/series?metric=cpu_percent",
        404,
    )
    .await;

    // Datasets.
    let to = dir.path().join("datasets/probe");
    let request = json!({ "since": "1h", "to": to }).to_string();
    let lines = r
        .call(
            "post",
            "/api/v1/datasets/export",
            "/api/v1/datasets/export",
            Some(("application/json", &request)),
            200,
        )
        .await;
    let last: Value = serde_json::from_str(
        String::from_utf8_lossy(&lines)
            .lines()
            .last()
            .expect("a line"),
    )
    .unwrap();
    assert_eq!(last["manifest"]["rows"], 63, "{last}");
    for (content_type, body, status) in [
        (
            "application/json",
            json!({ "since": "soon", "to": "x" }),
            400,
        ),
        ("application/json", json!({ "since": "1h" }), 422),
        (
            "application/json",
            json!({ "since": "1h", "to": "x", "x": 1 }),
            422,
        ),
        ("", json!({ "since": "1h", "to": "x" }), 415),
    ] {
        r.call(
            "post",
            "/api/v1/datasets/export",
            "/api/v1/datasets/export",
            Some((content_type, &body.to_string())),
            status,
        )
        .await;
    }
    r.call(
        "post",
        "/api/v1/datasets/export",
        "/api/v1/datasets/export",
        Some(("application/json", "{not json")),
        400,
    )
    .await;

    // Jobs.
    r.call(
        "post",
        "/api/v1/jobs",
        "/api/v1/jobs",
        Some(("application/yaml", JOB)),
        200,
    )
    .await;
    let refused = r
        .call(
            "post",
            "/api/v1/jobs",
            "/api/v1/jobs",
            Some(("application/yaml", &JOB.replace("0 3 * * *", "0 25 * * *"))),
            400,
        )
        .await;
    assert!(String::from_utf8_lossy(&refused).contains("spec.schedule"));
    let jobs = r.get("/api/v1/jobs", "/api/v1/jobs", 200).await;
    assert_eq!(jobs["jobs"][0]["name"], "probe", "{jobs}");
    r.get("/api/v1/jobs/{name}", "/api/v1/jobs/probe", 200)
        .await;
    r.get("/api/v1/jobs/{name}", "/api/v1/jobs/nope", 404).await;
    for (query, status) in [("", 200), ("?kind=job", 200), ("?kind=pod", 400)] {
        r.get(
            "/api/v1/jobs/{name}/export",
            &format!("/api/v1/jobs/probe/export{query}"),
            status,
        )
        .await;
    }
    r.get(
        "/api/v1/jobs/{name}/export",
        "/api/v1/jobs/nope/export",
        404,
    )
    .await;
    for action in ["suspend", "resume"] {
        let template = format!("/api/v1/jobs/{{name}}/{action}");
        r.call(
            "post",
            &template,
            &format!("/api/v1/jobs/probe/{action}"),
            None,
            200,
        )
        .await;
        r.call(
            "post",
            &template,
            &format!("/api/v1/jobs/nope/{action}"),
            None,
            404,
        )
        .await;
    }
    r.call(
        "post",
        "/api/v1/jobs/{name}/run",
        "/api/v1/jobs/nope/run",
        None,
        404,
    )
    .await;
    let started: Value = serde_json::from_slice(
        &r.call(
            "post",
            "/api/v1/jobs/{name}/run",
            "/api/v1/jobs/probe/run",
            None,
            200,
        )
        .await,
    )
    .unwrap();
    let id = started["run"].as_str().unwrap().to_string();

    // Runs: the one just started, once it finished.
    let hub_ref = &hub;
    wait_until("the run to finish", Duration::from_secs(30), || {
        let path = format!("/api/v1/runs/{id}");
        async move { hub_ref.get(&path).await["status"] != "running" }
    })
    .await;
    let run = r
        .get("/api/v1/runs/{id}", &format!("/api/v1/runs/{id}"), 200)
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    r.get("/api/v1/runs/{id}", "/api/v1/runs/nope", 404).await;
    let runs = r.get("/api/v1/runs", "/api/v1/runs", 200).await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1, "{runs}");
    r.get("/api/v1/runs", "/api/v1/runs?job=probe", 200).await;
    let logs = r
        .call(
            "get",
            "/api/v1/runs/{id}/logs",
            &format!("/api/v1/runs/{id}/logs"),
            None,
            200,
        )
        .await;
    assert!(String::from_utf8_lossy(&logs).contains("probing"));
    r.get(
        "/api/v1/runs/{id}/logs",
        &format!("/api/v1/runs/{id}/logs?attempt=9"),
        400,
    )
    .await;
    r.get("/api/v1/runs/{id}/logs", "/api/v1/runs/nope/logs", 404)
        .await;
    let artifacts = r
        .get(
            "/api/v1/runs/{id}/artifacts",
            &format!("/api/v1/runs/{id}/artifacts"),
            200,
        )
        .await;
    assert_eq!(
        artifacts["artifacts"][0]["path"], "sub/answer.txt",
        "{artifacts}"
    );
    r.get(
        "/api/v1/runs/{id}/artifacts",
        "/api/v1/runs/nope/artifacts",
        404,
    )
    .await;
    let file = r
        .call(
            "get",
            "/api/v1/runs/{id}/artifacts/{path}",
            &format!("/api/v1/runs/{id}/artifacts/sub/answer.txt"),
            None,
            200,
        )
        .await;
    assert_eq!(file, b"42\n");
    for (rest, status) in [("sub/missing.txt", 404), ("sub//answer.txt", 400)] {
        r.get(
            "/api/v1/runs/{id}/artifacts/{path}",
            &format!("/api/v1/runs/{id}/artifacts/{rest}"),
            status,
        )
        .await;
    }
    r.call(
        "delete",
        "/api/v1/jobs/{name}",
        "/api/v1/jobs/probe",
        None,
        200,
    )
    .await;
    r.call(
        "delete",
        "/api/v1/jobs/{name}",
        "/api/v1/jobs/probe",
        None,
        404,
    )
    .await;

    // Access: tokens, identity, refusals, the audit log.
    let json_body = |v: Value| v.to_string();
    let made = r
        .call(
            "post",
            "/api/v1/tokens",
            "/api/v1/tokens",
            Some((
                "application/json",
                &json_body(json!({"name": "dash", "role": "viewer", "expires_in": "30d"})),
            )),
            201,
        )
        .await;
    let viewer = serde_json::from_slice::<Value>(&made).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    for (body, status) in [
        (json!({"name": "dash", "role": "viewer"}), 409),
        (json!({"name": "has space", "role": "viewer"}), 400),
        (
            json!({"name": "x", "role": "viewer", "expires_in": "soon"}),
            400,
        ),
    ] {
        r.call(
            "post",
            "/api/v1/tokens",
            "/api/v1/tokens",
            Some(("application/json", &json_body(body))),
            status,
        )
        .await;
    }
    r.get("/api/v1/tokens", "/api/v1/tokens", 200).await;
    r.get("/api/v1/whoami", "/api/v1/whoami", 200).await;
    let admin = std::mem::replace(&mut r.token, viewer);
    r.call(
        "post",
        "/api/v1/jobs",
        "/api/v1/jobs",
        Some(("application/yaml", JOB)),
        403,
    )
    .await;
    r.token = String::new();
    r.get("/api/v1/devices", "/api/v1/devices", 401).await;
    r.token = admin;
    r.call(
        "delete",
        "/api/v1/tokens/{id}",
        "/api/v1/tokens/dash",
        None,
        200,
    )
    .await;
    r.call(
        "delete",
        "/api/v1/tokens/{id}",
        "/api/v1/tokens/nope",
        None,
        404,
    )
    .await;
    r.get("/api/v1/audit", "/api/v1/audit?limit=5", 200).await;
    r.get("/api/v1/audit", "/api/v1/audit?limit=100000", 400)
        .await;

    // Device identity: off on this hub (its devices send without certificates)...
    let enroll_body =
        json_body(json!({"device_id": "pi-9", "labels": {"site": "lab"}, "ttl": "1h"}));
    r.call(
        "post",
        "/api/v1/enrollments",
        "/api/v1/enrollments",
        Some(("application/json", &enroll_body)),
        409,
    )
    .await;
    // ...and on a hub as deployed, where devices need certificates.
    let secure = Hub::start_on(
        &dir.path().join("secure"),
        free_port(),
        free_port(),
        &["--device-auth", "cert"],
    )
    .await;
    let plain = (
        std::mem::replace(&mut r.base, secure.http_url()),
        std::mem::replace(&mut r.token, secure.token.clone()),
    );
    let made = r
        .call(
            "post",
            "/api/v1/enrollments",
            "/api/v1/enrollments",
            Some(("application/json", &enroll_body)),
            201,
        )
        .await;
    let made: Value = serde_json::from_slice(&made).unwrap();
    for (body, status) in [
        (json!({"device_id": "no spaces"}), 400),
        (json!({"device_id": "pi-9", "ttl": "soon"}), 400),
    ] {
        r.call(
            "post",
            "/api/v1/enrollments",
            "/api/v1/enrollments",
            Some(("application/json", &json_body(body))),
            status,
        )
        .await;
    }
    let id_dir = dir.path().join("pi-9-identity");
    let out = shoal_e2e::enroll_agent(&made, &id_dir, &[]);
    assert!(out.status.success(), "{out:?}");
    r.get("/api/v1/enrollments", "/api/v1/enrollments", 200)
        .await;
    let ids = r.get("/api/v1/identities", "/api/v1/identities", 200).await;
    assert_eq!(ids[0]["device_id"], "pi-9", "{ids}");
    r.call(
        "post",
        "/api/v1/devices/{id}/revoke",
        "/api/v1/devices/pi-9/revoke",
        None,
        200,
    )
    .await;
    r.call(
        "post",
        "/api/v1/devices/{id}/revoke",
        "/api/v1/devices/nope/revoke",
        None,
        404,
    )
    .await;
    (r.base, r.token) = plain;

    // Models and alerts.
    let model_dir = dir.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let model = shoal_e2e::pi_model(38.0);
    std::fs::write(
        model_dir.join("model.onnx"),
        shoal_ml::onnx::export(&model, &[]),
    )
    .unwrap();
    let deploy =
        json!({ "model": "shoal-anomaly", "version": "1", "source": model_dir }).to_string();
    r.call(
        "post",
        "/api/v1/models/deployments",
        "/api/v1/models/deployments",
        Some(("application/json", &deploy)),
        201,
    )
    .await;
    let listed = r
        .get(
            "/api/v1/models/deployments",
            "/api/v1/models/deployments",
            200,
        )
        .await;
    // Without a tracking server, the registry is empty (the real one: tests/tests/dashboard.rs).
    let registry = r
        .get("/api/v1/models/registry", "/api/v1/models/registry", 200)
        .await;
    assert_eq!(registry["tracking_uri"], Value::Null, "{registry}");
    assert_eq!(listed["deployments"][0]["version"], "1", "{listed}");
    let seldon =
        json!({ "model": "shoal-anomaly", "source": model_dir, "storage": "/tmp/x" }).to_string();
    r.call(
        "post",
        "/api/v1/models/seldon",
        "/api/v1/models/seldon",
        Some(("application/json", &seldon)),
        400,
    )
    .await;
    r.get("/api/v1/alerts", "/api/v1/alerts?all=true", 200)
        .await;
    let statement = json!({ "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "name": "model.onnx", "digest": { "sha256": "ab".repeat(32) } }],
        "predicateType": "https://slsa.dev/provenance/v1", "predicate": {} });
    let envelope = signer.sign(&statement).unwrap().to_string();
    for status in [201, 200] {
        r.call(
            "post",
            "/api/v1/provenance",
            "/api/v1/provenance",
            Some(("application/json", &envelope)),
            status,
        )
        .await;
    }
    let mut forged: Value = serde_json::from_str(&envelope).unwrap();
    forged["payload"] = json!("e30=");
    r.call(
        "post",
        "/api/v1/provenance",
        "/api/v1/provenance",
        Some(("application/json", &forged.to_string())),
        422,
    )
    .await;
    let ledger = r.get("/api/v1/provenance", "/api/v1/provenance", 200).await;
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(ledger["chain"]["intact"], true);
    wait_until(
        "the sink's first error",
        Duration::from_secs(30),
        || async { hub.get("/api/v1/sinks").await["sinks"][0]["last_error"].is_string() },
    )
    .await;
    r.call("get", "/api/v1/sinks", "/api/v1/sinks", None, 200)
        .await;
    let store = r.get("/api/v1/store", "/api/v1/store", 200).await;
    assert_eq!(store["write_state"]["state"], "writable", "{store}");
    r.call(
        "post",
        "/api/v1/alerts/{id}/ack",
        "/api/v1/alerts/nope/ack",
        None,
        404,
    )
    .await;
    r.call(
        "delete",
        "/api/v1/models/deployments/{name}",
        "/api/v1/models/deployments/shoal-anomaly",
        None,
        200,
    )
    .await;

    // The fallback: not an operation, but the documented error form.
    let client = http_client();
    let resp = client
        .get(format!("{}/api/v2/devices", hub.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let fallback = answers.join("fallback.body");
    std::fs::write(&fallback, resp.bytes().await.unwrap()).unwrap();
    r.cases.push(json!({
        "component": "ErrorBody", "status": 404, "content_type": "application/json",
        "body_file": fallback, "note": "the fallback",
    }));

    // Every documented operation was called.
    let called: BTreeSet<(String, String)> = r
        .cases
        .iter()
        .filter_map(|c| Some((c["method"].as_str()?.into(), c["path"].as_str()?.into())))
        .collect();
    let uncalled: Vec<_> = documented.difference(&called).collect();
    assert!(uncalled.is_empty(), "not exercised: {uncalled:?}");

    // Every route template the hub counted an answer for is a documented path.
    let metrics = client
        .get(format!("{}/metrics", hub.http_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let paths: BTreeSet<&str> = documented.iter().map(|(_, p)| p.as_str()).collect();
    let mut counted = 0;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("shoal_http_requests_total{route=\"") else {
            continue;
        };
        let route = &rest[..rest.find('"').unwrap()];
        counted += 1;
        if route != "unmatched" {
            assert!(
                paths.contains(route.replace("{*", "{").as_str()),
                "the hub served {route}, which the document lacks"
            );
        }
    }
    assert!(counted > 10, "{metrics}");

    // (b) The answers against the document.
    let cases = dir.path().join("cases.json");
    std::fs::write(&cases, serde_json::to_vec_pretty(&r.cases).unwrap()).unwrap();
    let (ok, report) = run_tool(
        Command::new(&python)
            .arg(checker_script())
            .arg(&spec)
            .arg(&cases),
    );
    eprintln!("{report}");
    assert!(ok, "answers that do not match the document:\n{report}");
    assert!(
        report.contains(&format!(
            "{} answers match the document, 0 do not",
            r.cases.len()
        )),
        "{report}"
    );
}
