//! From telemetry to a tracked model, with the real engines: the hub exports a dataset,
//! `shoal-ml` trains on it, onnxruntime (PyPI) runs the exported ONNX model, and a real
//! `mlflow server` records the run and registers the model.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use shoal_e2e::shoal_cli as shoal;
use shoal_e2e::{Hub, MlflowServer, bin, ingest, pi_sample};

async fn hub_with_two_pis(dir: &Path) -> Hub {
    let hub = Hub::start(&dir.join("hub")).await;
    let start = shoal_hub_now() - 3_000_000;
    for device in ["pi-a", "pi-b"] {
        ingest(&hub.grpc_url(), device, 2000, move |seq| {
            pi_sample(seq, start, 1000, 0.0)
        })
        .await
        .unwrap();
    }
    hub
}

fn shoal_hub_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn export(hub: &Hub, to: &Path) -> Value {
    let (ok, out, err) = shoal(
        hub,
        &[
            "datasets",
            "export",
            "--since",
            "2h",
            "--to",
            to.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// `shoal-ml train --quiet --dataset DATASET --out OUT`, with no MLflow unless the caller sets
/// one.
fn train_cmd(dataset: impl AsRef<std::ffi::OsStr>, out: &Path) -> Command {
    let mut cmd = Command::new(bin("shoal-ml"));
    cmd.args(["train", "--quiet", "--dataset"])
        .arg(dataset)
        .arg("--out")
        .arg(out)
        .env_remove("MLFLOW_TRACKING_URI")
        .stdin(Stdio::null());
    cmd
}

fn train(dataset: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    train_cmd(dataset, out).args(extra).output().unwrap()
}

fn onnx_run(model: &Path, readings: &Value) -> Value {
    shoal_e2e::python_json("onnx_run.py", &[model.to_str().unwrap()], readings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_train_check_with_onnxruntime_and_track_in_mlflow() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_with_two_pis(dir.path()).await;
    let dataset = dir.path().join("datasets/last-hour");
    let manifest = export(&hub, &dataset);
    assert_eq!(manifest["rows"], 4000);
    assert_eq!(manifest["devices"], serde_json::json!(["pi-a", "pi-b"]));
    assert_eq!(manifest["files"][0]["sha256"].as_str().unwrap().len(), 64);
    assert!(dataset.join("manifest.json").exists());

    let mlflow = MlflowServer::start(&dir.path().join("mlflow")).await;
    let out = dir.path().join("model");
    let keys = dir.path().join("keys");
    let made = shoal_e2e::run_bin(
        "shoal",
        &["keys", "generate", "--out", keys.to_str().unwrap()],
    );
    assert!(made.status.success());
    let result = train_cmd(&dataset, &out)
        .env("MLFLOW_TRACKING_URI", mlflow.url())
        .env("SHOAL_SIGNING_KEY_FILE", keys.join("signing.key"))
        .env("SHOAL_JOB", "nightly-train")
        .env("SHOAL_RUN_ID", "nightly-train-29401921")
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for f in [
        "model.onnx",
        "model.json",
        "metrics.json",
        "MLmodel",
        "mlflow.json",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    let metrics: Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert!(
        metrics["report"]["holdout"]["r2"].as_f64().unwrap() > 0.95,
        "the model explains the temperature: {metrics}"
    );
    let model: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
    let w = model["weights"].as_array().unwrap();
    assert!((w[0].as_f64().unwrap() - 0.25).abs() < 0.02, "{model}");

    // onnxruntime and shoal-ml agree on the same readings, within 1e-5.
    let readings = serde_json::json!({
        "features": [[10.0, 0.5, 0.2, 1500.0, 0.0, 0.0, 120.0], [90.0, 3.9, 2.0, 1500.0, 0.0, 0.0, 120.0], [50.0, 2.0, 1.0, 1500.0, 0.0, 0.0, 120.0]],
        "observed": [41.0, 74.0, 75.0],
    });
    let ours = Command::new(bin("shoal-ml"))
        .args(["score", "--model"])
        .arg(&out)
        .arg("--input")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(readings.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(ours.status.success());
    let ours: Value = serde_json::from_slice(&ours.stdout).unwrap();
    let theirs = onnx_run(&out.join("model.onnx"), &readings);
    for key in ["expected", "score"] {
        for (a, b) in ours[key]
            .as_array()
            .unwrap()
            .iter()
            .zip(theirs[key].as_array().unwrap())
        {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "{key}: shoal-ml {a}, onnxruntime {b}");
        }
    }
    let scores = ours["score"].as_array().unwrap();
    assert!(
        scores[2].as_f64().unwrap() > 3.0,
        "a Pi 10 °C hotter than its load explains is flagged: {ours}"
    );

    // What MLflow recorded, read back through its REST API.
    let record: Value =
        serde_json::from_slice(&std::fs::read(out.join("mlflow.json")).unwrap()).unwrap();
    assert_eq!(record["status"], "logged", "{record}");
    let run_id = record["run_id"].as_str().unwrap();
    let run = mlflow.get("runs/get", &[("run_id", run_id)]).await;
    let info = &run["run"]["info"];
    assert_eq!(info["status"], "FINISHED", "{run}");
    let data = &run["run"]["data"];
    let tag = |k: &str| entry(&data["tags"], k);
    assert_eq!(tag("shoal.job"), "nightly-train");
    assert_eq!(tag("shoal.run_id"), "nightly-train-29401921");
    assert_eq!(tag("shoal.dataset_sha256").as_str().unwrap().len(), 64);
    assert!(
        tag("shoal.code_version")
            .as_str()
            .unwrap()
            .starts_with("shoal-ml ")
    );
    let param = |k: &str| entry(&data["params"], k);
    assert_eq!(param("seed"), "42");
    assert_eq!(param("dataset_rows"), "4000");
    let history = mlflow
        .get(
            "metrics/get-history",
            &[("run_id", run_id), ("metric_key", "holdout_rmse")],
        )
        .await;
    let steps: Vec<i64> = history["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["step"].as_i64().unwrap())
        .collect();
    assert!(
        steps.contains(&0) && steps.contains(&1),
        "per-step metrics: {history}"
    );
    let artifacts = mlflow
        .get("artifacts/list", &[("run_id", run_id), ("path", "model")])
        .await;
    let names: Vec<&str> = artifacts["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"model/model.onnx") && names.contains(&"model/MLmodel"),
        "{artifacts}"
    );
    let stored = mlflow.dir.join("artifacts");
    let onnx_in_mlflow = shoal_e2e::files_below(&stored)
        .into_iter()
        .find(|p| p.ends_with("model/model.onnx"))
        .expect("the ONNX file reached MLflow's artifact store");
    assert_eq!(
        std::fs::read(onnx_in_mlflow).unwrap(),
        std::fs::read(out.join("model.onnx")).unwrap()
    );
    let registered = mlflow
        .get("registered-models/get", &[("name", "shoal-anomaly")])
        .await;
    let versions = registered["registered_model"]["latest_versions"]
        .as_array()
        .unwrap_or_else(|| panic!("{registered}"));
    assert!(
        versions.iter().any(|v| v["run_id"] == run_id),
        "{registered}"
    );
    // The signed provenance went with it: the envelope as an artifact, the statement's
    // digest and the key as the model version's tags.
    let provenance = mlflow
        .get(
            "artifacts/list",
            &[("run_id", run_id), ("path", "provenance")],
        )
        .await;
    assert!(
        provenance
            .to_string()
            .contains("provenance/provenance.dsse.json"),
        "{provenance}"
    );
    let version_info = mlflow
        .get(
            "model-versions/get",
            &[
                ("name", "shoal-anomaly"),
                ("version", versions[0]["version"].as_str().unwrap()),
            ],
        )
        .await;
    let tags = &version_info["model_version"]["tags"];
    assert_eq!(
        entry(tags, "shoal.provenance.statement_sha256")
            .as_str()
            .unwrap()
            .len(),
        64,
        "{version_info}"
    );
    assert!(
        entry(tags, "shoal.provenance.key_id").is_string(),
        "{version_info}"
    );

    // The registered model serves straight from the registry, through MLflow's artifact
    // proxy, and answers what onnxruntime computes from the local file.
    let version = versions[0]["version"].as_str().unwrap().to_string();
    let served = serve_and_infer(
        "mlflow:/models/shoal-anomaly/latest",
        &[("MLFLOW_TRACKING_URI", mlflow.url())],
        &out.join("model.onnx"),
    )
    .await;
    assert_eq!(served["name"], "shoal-anomaly");
    assert_eq!(served["version"], version);

    // MLflow's own tools load the registered model from its MLmodel (signature, environment):
    // `mlflow models predict` and `mlflow models serve` answer what onnxruntime computes.
    mlflow_tools_serve(
        &mlflow.url(),
        &format!("models:/shoal-anomaly/{version}"),
        &out,
    )
    .await;
}

/// `mlflow models predict` and `mlflow models serve` (the pyfunc scoring server) on `uri`,
/// compared with onnxruntime on the run's own `model.onnx`.
async fn mlflow_tools_serve(tracking: &str, uri: &str, out: &Path) {
    let k = 7;
    let features: Vec<Vec<f64>> = (0..3)
        .map(|r| (0..k).map(|i| 10.0 * r as f64 + i as f64).collect())
        .collect();
    let observed = [[45.0], [60.0], [50.0]];
    let reference = onnx_run(
        &out.join("model.onnx"),
        &serde_json::json!({ "features": features, "observed": [45.0, 60.0, 50.0] }),
    );
    let request = serde_json::json!({ "inputs": { "features": features, "observed": observed } });
    let scores = |v: &Value| -> Vec<f64> {
        v["predictions"]["score"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|r| r[0].as_f64().unwrap())
            .collect()
    };
    let close = |got: Vec<f64>| {
        for (g, w) in got.iter().zip(reference["score"].as_array().unwrap()) {
            assert!(
                (g - w.as_f64().unwrap()).abs() < 1e-5,
                "{got:?} vs {reference}"
            );
        }
    };
    let input = out.join("mlflow-input.json");
    let output = out.join("mlflow-output.json");
    std::fs::write(&input, request.to_string()).unwrap();
    let predicted = Command::new("mlflow")
        .args([
            "models",
            "predict",
            "-m",
            uri,
            "--env-manager",
            "local",
            "-t",
            "json",
        ])
        .arg("-i")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .env("MLFLOW_TRACKING_URI", tracking)
        .output()
        .expect("mlflow (PyPI) is installed by the test command");
    assert!(
        predicted.status.success(),
        "mlflow models predict: {}",
        String::from_utf8_lossy(&predicted.stderr)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    close(scores(&v));

    let port = shoal_e2e::free_port();
    let mut cmd = Command::new("mlflow");
    cmd.args([
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
    ])
    .args(["-p", &port.to_string()])
    .env("MLFLOW_TRACKING_URI", tracking)
    .stdout(Stdio::null());
    let _server = shoal_e2e::Proc::spawn("mlflow models serve", cmd);
    let url = format!("http://127.0.0.1:{port}");
    shoal_e2e::wait_until(
        "mlflow models serve",
        std::time::Duration::from_secs(60),
        || {
            let ping = format!("{url}/ping");
            async move {
                shoal_e2e::http_get(&ping)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        },
    )
    .await;
    let v: Value = shoal_e2e::http_client()
        .post(format!("{url}/invocations"))
        .json(&request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    close(scores(&v));
}

/// Starts `shoal-ml serve --model SOURCE` with `env`, checks one inference against
/// onnxruntime on `reference`, and returns the served model's name and version.
async fn serve_and_infer(source: &str, env: &[(&str, String)], reference: &Path) -> Value {
    use std::io::BufRead;
    let mut cmd = Command::new(shoal_e2e::bin("shoal-ml"));
    cmd.args(["serve", "--model", source])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped());
    let mut proc = shoal_e2e::Proc::spawn("shoal-ml serve", cmd);
    let mut line = String::new();
    std::io::BufReader::new(proc.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ep: Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("{source}: no endpoints line"));
    let http = format!("http://{}", ep["http"].as_str().unwrap());
    let name = ep["models"][0].as_str().unwrap().to_string();
    let meta: Value = shoal_e2e::http_get(&format!("{http}/v2/models/{name}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let k = meta["inputs"][0]["shape"][1].as_u64().unwrap() as usize;
    let features: Vec<f64> = (0..k).map(|i| 10.0 + i as f64).collect();
    let readings = serde_json::json!({ "features": [features], "observed": [50.0] });
    let body = serde_json::json!({ "inputs": [
        { "name": "features", "shape": [1, k], "datatype": "FP64", "data": features },
        { "name": "observed", "shape": [1, 1], "datatype": "FP64", "data": [50.0] },
    ]});
    let got: Value = shoal_e2e::http_client()
        .post(format!("{http}/v2/models/{name}/infer"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let want = onnx_run(reference, &readings);
    let score = got["outputs"][1]["data"][0].as_f64().unwrap();
    assert!(
        (score - want["score"][0].as_f64().unwrap()).abs() < 1e-5,
        "{got} vs {want}"
    );
    serde_json::json!({ "name": name, "version": meta["versions"][0] })
}

/// The value of `key` in an MLflow list of `{"key", "value"}` (tags, params); null if absent.
fn entry(list: &Value, key: &str) -> Value {
    list.as_array()
        .and_then(|l| l.iter().find(|e| e["key"] == key))
        .map_or(Value::Null, |e| e["value"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlflow_down_leaves_the_model_and_marks_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_with_two_pis(dir.path()).await;
    let dataset = dir.path().join("ds");
    export(&hub, &dataset);
    let out = dir.path().join("model");
    let port = shoal_e2e::free_port();
    let result = train(
        &dataset,
        &out,
        &["--mlflow-tracking-uri", &format!("http://127.0.0.1:{port}")],
    );
    assert_eq!(
        result.status.code(),
        Some(75),
        "EX_TEMPFAIL, so a scheduled job retries: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        err.contains("MLflow") && err.contains(&port.to_string()),
        "{err}"
    );
    assert!(out.join("model.onnx").exists(), "the model is kept");
    let record: Value =
        serde_json::from_slice(&std::fs::read(out.join("mlflow.json")).unwrap()).unwrap();
    assert_eq!(record["status"], "not_logged");

    // The retry (a scheduled job retries on exit 75), with MLflow back on that port, logs it.
    let mlflow = MlflowServer::start_on(&dir.path().join("mlflow"), port).await;
    // An attempt that died mid-run (killed, or MLflow gone before it could end its run) left
    // a RUNNING run behind; the next attempt of the same Shoal run marks it.
    let experiment = mlflow
        .post("experiments/create", serde_json::json!({ "name": "shoal" }))
        .await["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let stale = mlflow
        .post(
            "runs/create",
            serde_json::json!({
                "experiment_id": experiment,
                "tags": [{ "key": "shoal.run_id", "value": "train-29401921" }],
            }),
        )
        .await["run"]["info"]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let again = train_cmd(&dataset, &out)
        .env("MLFLOW_TRACKING_URI", mlflow.url())
        .env("SHOAL_RUN_ID", "train-29401921")
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let record: Value =
        serde_json::from_slice(&std::fs::read(out.join("mlflow.json")).unwrap()).unwrap();
    assert_eq!(record["status"], "logged");
    let old = mlflow.get("runs/get", &[("run_id", &stale)]).await;
    assert_eq!(old["run"]["info"]["status"], "FAILED", "{old}");
    assert!(old.to_string().contains("shoal.superseded"), "{old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datasets_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dataset");
    let r = train(&missing, &dir.path().join("m"), &[]);
    assert_eq!(r.status.code(), Some(65));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("no-such-dataset") && err.contains("manifest.json"),
        "{err}"
    );

    // An empty window exports an empty dataset, which training refuses.
    let hub = Hub::start(&dir.path().join("hub")).await;
    let empty = dir.path().join("empty");
    let manifest = export(&hub, &empty);
    assert_eq!(manifest["rows"], 0);
    let r = train(&empty, &dir.path().join("m"), &[]);
    assert_eq!(r.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&r.stderr).contains("empty"));

    // Bad export requests change nothing and say which field is wrong.
    for (flags, named) in [
        (&["--since", "yesterday-ish", "--to", "x"][..], "since"),
        (&["--since", "1h", "--to", "ftp://nope/x"][..], "ftp"),
        (
            &["--since", "1h", "--devices", "arch", "--to", "x"][..],
            "devices",
        ),
    ] {
        let mut args = vec!["datasets", "export"];
        args.extend_from_slice(flags);
        let (ok, _, err) = shoal(&hub, &args);
        assert!(!ok && err.contains(named), "{flags:?}: {err}");
    }
    assert!(!dir.path().join("x").exists(), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_go_to_s3_and_train_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let garage = shoal_e2e::Garage::start(&dir.path().join("garage"), "telemetry").await;
    let env = garage.env();
    let hub = Hub::start_with_env(
        &dir.path().join("hub"),
        shoal_e2e::free_port(),
        shoal_e2e::free_port(),
        &[],
        &env,
    )
    .await;
    let start = shoal_hub_now() - 3_000_000;
    ingest(&hub.grpc_url(), "pi-a", 3000, move |seq| {
        pi_sample(seq, start, 1000, 0.0)
    })
    .await
    .unwrap();
    let (ok, out, err) = shoal(
        &hub,
        &[
            "datasets",
            "export",
            "--since",
            "2h",
            "--devices",
            "id=pi-a",
            "--to",
            "s3://telemetry/pi/last-hour",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let manifest: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(manifest["rows"], 3000);
    // An independent S3 client reads what Shoal wrote, and the digest matches.
    let stored: Value =
        serde_json::from_slice(&garage.curl_get("pi/last-hour/manifest.json")).unwrap();
    assert_eq!(stored["rows"], 3000);
    let part = garage.curl_get("pi/last-hour/part-00000.parquet");
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(&part)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, stored["files"][0]["sha256"].as_str().unwrap());

    let model = dir.path().join("model");
    let result = train_cmd("s3://telemetry/pi/last-hour", &model)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let metrics: Value =
        serde_json::from_slice(&std::fs::read(model.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["dataset"]["sha256"].as_str().unwrap().len(), 64);
    assert!(metrics["report"]["holdout"]["r2"].as_f64().unwrap() > 0.95);

    // The model served from the object store by an S3 path.
    garage.curl_put("models/anomaly/model.onnx", &model.join("model.onnx"));
    let served = serve_and_infer(
        "s3://telemetry/models/anomaly",
        &env,
        &model.join("model.onnx"),
    )
    .await;
    assert_eq!(served["name"], "anomaly");

    // Wrong credentials: a clear error, nothing half-written claimed as a dataset.
    let bad = train_cmd("s3://telemetry/pi/last-hour", &dir.path().join("m2"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("AWS_SECRET_ACCESS_KEY", "0".repeat(64))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("s3://telemetry/pi/last-hour"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_training_job_runs_on_schedule_and_is_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let mlflow = MlflowServer::start(&dir.path().join("mlflow")).await;
    let bins = bin("shoal").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let datasets = dir.path().join("datasets");
    // The hub's runs sign what they train, and their statements go into its ledger.
    let keys = dir.path().join("keys");
    let made = shoal_e2e::run_bin(
        "shoal",
        &["keys", "generate", "--out", keys.to_str().unwrap()],
    );
    assert!(made.status.success());
    let hub = Hub::start_with_env(
        &dir.path().join("hub"),
        shoal_e2e::free_port(),
        shoal_e2e::free_port(),
        &[
            "--mlflow-tracking-uri",
            &mlflow.url(),
            "--dataset-uri",
            datasets.to_str().unwrap(),
            "--signing-key",
            keys.join("signing.key").to_str().unwrap(),
        ],
        &[("PATH", path)],
    )
    .await;
    let start = shoal_hub_now() - 3_000_000;
    ingest(&hub.grpc_url(), "pi-a", 2000, move |seq| {
        pi_sample(seq, start, 1000, 0.0)
    })
    .await
    .unwrap();

    let (ok, list, _) = shoal(&hub, &["jobs", "template"]);
    assert!(
        ok && list.contains("train-anomaly") && list.contains("dataset-export"),
        "{list}"
    );
    let (ok, yaml, err) = shoal(
        &hub,
        &["jobs", "template", "train-anomaly", "--auto-deploy"],
    );
    assert!(ok, "{err}");
    let file = dir.path().join("train.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (ok, _, err) = shoal(&hub, &["jobs", "apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = shoal(&hub, &["jobs", "run", "train-anomaly", "-o", "json"]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string();
    let run_path = format!("/api/v1/runs/{id}");
    shoal_e2e::wait_until(
        "the training run to finish",
        std::time::Duration::from_secs(120),
        || async { hub.get(&run_path).await["status"] != "running" },
    )
    .await;
    let run = hub.get(&run_path).await;
    let (_, log, _) = shoal(&hub, &["runs", "logs", &id]);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");

    // The hub keeps what the run produced, MLflow or not.
    let (ok, artifacts, err) = shoal(&hub, &["runs", "artifacts", &id]);
    assert!(ok, "{err}");
    for f in ["model.onnx", "metrics.json", "mlflow.json"] {
        assert!(artifacts.contains(f), "{artifacts}");
    }
    let fetched = dir.path().join("fetched.onnx");
    let (ok, _, err) = shoal(
        &hub,
        &[
            "runs",
            "fetch",
            &id,
            "model.onnx",
            "--to",
            fetched.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(std::fs::metadata(&fetched).unwrap().len() > 100);
    let (ok, _, err) = shoal(&hub, &["runs", "fetch", &id, "../../etc/passwd"]);
    assert!(!ok && err.contains("not a path inside"), "{err}");
    let raw = hub
        .client()
        .get(format!(
            "{}/api/v1/runs/{id}/artifacts/%2e%2e/%2e%2e/hub/shoal.redb",
            hub.http_url()
        ))
        .send()
        .await
        .unwrap();
    assert!(
        raw.status().is_client_error(),
        "the hub serves nothing outside the run's artifacts ({})",
        raw.status()
    );

    // The dataset went where the hub said, and MLflow knows the run by its Shoal job.
    assert!(
        datasets
            .join("train")
            .join(&id)
            .join("manifest.json")
            .exists()
    );
    let experiment = mlflow
        .get("experiments/get-by-name", &[("experiment_name", "shoal")])
        .await["experiment"]["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let found = mlflow
        .post(
            "runs/search",
            serde_json::json!({
                "experiment_ids": [experiment],
                "filter": format!("tags.`shoal.run_id` = '{id}'"),
            }),
        )
        .await;
    let runs = found["runs"].as_array().expect("a tracked run");
    assert_eq!(runs.len(), 1, "{found}");
    assert_eq!(runs[0]["info"]["status"], "FINISHED");
    assert!(found.to_string().contains("train-anomaly"), "{found}");

    // --auto-deploy: the run deployed its model under the version MLflow registered, and the
    // hub scores the fleet with it.
    let registered = mlflow
        .get("registered-models/get", &[("name", "shoal-anomaly")])
        .await;
    let version = registered["registered_model"]["latest_versions"][0]["version"].clone();
    let deployed = hub.get("/api/v1/models/deployments").await;
    assert_eq!(
        deployed["deployments"][0]["name"], "shoal-anomaly",
        "{deployed}\n{log}"
    );
    assert_eq!(deployed["deployments"][0]["version"], version, "{deployed}");
    shoal_e2e::wait_until(
        "pi-a is scored",
        std::time::Duration::from_secs(20),
        || async { hub.get("/api/v1/devices/pi-a").await["anomaly"]["version"] == version },
    )
    .await;

    // The run's model is signed and in the ledger; the registered version verifies against
    // it, downloaded from MLflow with its run's envelope.
    let ledger = hub.get("/api/v1/provenance").await;
    assert_eq!(
        ledger["entries"].as_array().unwrap().len(),
        1,
        "{ledger}\n{log}"
    );
    let (ok, shown, err) = shoal(&hub, &["models", "show", "shoal-anomaly"]);
    assert!(
        ok && shown.contains("provenance  ledger entry 1"),
        "{shown}{err}"
    );
    let model = format!("shoal-anomaly:{}", version.as_str().unwrap());
    let (ok, steps, err) = shoal(
        &hub,
        &[
            "models",
            "verify",
            &model,
            "--public-key",
            keys.join("signing.pub").to_str().unwrap(),
            "--ledger",
            "--mlflow-tracking-uri",
            &mlflow.url(),
        ],
    );
    assert!(ok, "{steps}{err}");
    assert!(
        steps.contains("ok      digest model.onnx")
            && steps.contains("ok      ledger entry 1 records the statement"),
        "{steps}"
    );
}

/// A virtual machine's sample: no thermal sensor; load follows CPU and the process count.
fn vm_sample(seq: u64, start_ms: i64) -> shoal_proto::v1::Sample {
    use shoal_proto::v1::{Cpu, LoadAverage, Memory, Sample};
    let cpu = ((seq * 37) % 100) as f64;
    let procs = 100 + (seq * 13) % 50;
    let noise = ((seq * 7919) % 101) as f64 / 1000.0 - 0.05;
    let load = 0.03 * cpu + 0.01 * procs as f64 + noise;
    Sample {
        seq,
        timestamp_ms: start_ms + seq as i64 * 1000,
        cpu: Some(Cpu {
            total_percent: cpu,
            ..Default::default()
        }),
        load: Some(LoadAverage {
            one: load,
            five: None,
            fifteen: None,
        }),
        memory: Some(Memory {
            used_bytes: (1 << 30) + (seq % 17) * (1 << 20),
            total_bytes: 4 << 30,
            ..Default::default()
        }),
        process_count: Some(procs as u32),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_without_thermal_sensors_gets_a_model_of_what_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub")).await;
    let start = shoal_hub_now() - 3_000_000;
    ingest(&hub.grpc_url(), "vm-1", 2000, move |seq| {
        vm_sample(seq, start)
    })
    .await
    .unwrap();
    let dataset = dir.path().join("vm-dataset");
    export(&hub, &dataset);

    // No temperature anywhere: the model predicts load from the other metrics, and says so.
    // The run signs its provenance with a key `shoal keys generate` made.
    let keys = dir.path().join("keys");
    let made = shoal_e2e::run_bin(
        "shoal",
        &["keys", "generate", "--out", keys.to_str().unwrap()],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let key = keys.join("signing.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = dir.path().join("model");
    let result = train(&dataset, &out, &["--signing-key", key.to_str().unwrap()]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let metrics: Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let choice = &metrics["choice"];
    assert_eq!(choice["target"], "load1", "{metrics}");
    let features: Vec<&str> = choice["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(features.contains(&"cpu_percent") && features.contains(&"process_count"));
    assert!(!features.contains(&"load1") && !features.contains(&"temperature_celsius"));
    assert!(
        choice["reason"]
            .as_str()
            .unwrap()
            .contains("temperature_celsius on 0 of 2000 rows"),
        "{choice}"
    );
    assert!(
        metrics["report"]["holdout"]["r2"].as_f64().unwrap() > 0.95,
        "{metrics}"
    );
    let onnx = std::fs::read(out.join("model.onnx")).unwrap();
    let meta = shoal_ml::onnx::metadata(&onnx);
    assert_eq!(meta["target"], "load1");

    // The provenance verifies; a changed byte in the model, or another signer, does not.
    let public = keys.join("signing.pub");
    let verify = |key: &Path| {
        shoal_e2e::run_bin(
            "shoal",
            &[
                "models",
                "verify",
                out.to_str().unwrap(),
                "--public-key",
                key.to_str().unwrap(),
            ],
        )
    };
    let ok = verify(&public);
    let steps = String::from_utf8_lossy(&ok.stdout).to_string();
    assert!(
        ok.status.success(),
        "{steps}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for step in [
        "ok      signature",
        "ok      digest model.onnx",
        "ok      digest MLmodel",
    ] {
        assert!(steps.contains(step), "{steps}");
    }
    let envelope: Value =
        serde_json::from_slice(&std::fs::read(out.join("provenance.dsse.json")).unwrap()).unwrap();
    use base64::Engine;
    let statement: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(envelope["payload"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    let deps = &statement["predicate"]["buildDefinition"]["resolvedDependencies"];
    assert_eq!(
        deps[0]["digest"]["sha256"], metrics["dataset"]["sha256"],
        "{statement}"
    );
    // OpenSSF's model_signing, a verifier no one here wrote, checks the folder's model.sig.
    let model_signing = |key: &Path| {
        let exe = shoal_e2e::which("model_signing").expect(
            "model_signing is not installed: run tests/run (it installs model-signing from PyPI)",
        );
        let out = std::process::Command::new(exe)
            .args(["verify", "key", "--signature"])
            .arg(out.join("model.sig"))
            .arg("--public_key")
            .arg(key)
            .arg(&out)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (signed, said) = model_signing(&public);
    assert!(signed, "model_signing verify key: {said}");
    let mut onnx_bytes = onnx.clone();
    *onnx_bytes.last_mut().unwrap() ^= 1;
    std::fs::write(out.join("model.onnx"), &onnx_bytes).unwrap();
    let (signed, said) = model_signing(&public);
    assert!(
        !signed && said.contains("Hash mismatch for") && said.contains("model.onnx"),
        "{said}"
    );
    let tampered = verify(&public);
    assert!(!tampered.status.success());
    assert!(
        String::from_utf8_lossy(&tampered.stdout).contains("FAILED  digest model.onnx"),
        "{}",
        String::from_utf8_lossy(&tampered.stdout)
    );
    std::fs::write(out.join("model.onnx"), &onnx).unwrap();
    let other = dir.path().join("other");
    assert!(
        shoal_e2e::run_bin(
            "shoal",
            &["keys", "generate", "--out", other.to_str().unwrap()]
        )
        .status
        .success()
    );
    let foreign = verify(&other.join("signing.pub"));
    assert!(!foreign.status.success());
    let (signed, said) = model_signing(&other.join("signing.pub"));
    assert!(!signed && said.contains("Key mismatch"), "{said}");
    assert!(String::from_utf8_lossy(&foreign.stdout).contains("no signature by key"));

    // The statement goes into a hub's ledger that trusts the key; twice is still once.
    let trusting = Hub::start_on(
        &dir.path().join("hub2"),
        shoal_e2e::free_port(),
        shoal_e2e::free_port(),
        &["--provenance-key", public.to_str().unwrap()],
    )
    .await;
    let envelope_file = out.join("provenance.dsse.json");
    for _ in 0..2 {
        let (ok, said, err) = shoal(
            &trusting,
            &[
                "models",
                "provenance",
                "--push",
                envelope_file.to_str().unwrap(),
            ],
        );
        assert!(ok && said.contains("ledger entry 1"), "{said}{err}");
    }
    let (ok, listed, _) = shoal(&trusting, &["models", "provenance"]);
    assert!(
        ok && listed.contains("chain intact") && listed.contains("model.onnx"),
        "{listed}"
    );

    // Asked for a temperature it does not have: refused, naming the column.
    let refused = train(
        &dataset,
        &dir.path().join("m2"),
        &["--target", "temperature_celsius"],
    );
    assert_eq!(refused.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("no rows with a temperature_celsius value")
    );
}
