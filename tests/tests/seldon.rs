//! `shoal models deploy --to seldon`: the model uploaded to a real S3 server (Garage) in the
//! layouts Seldon's servers load, the Seldon objects validated against Seldon Core's own CRD
//! schemas (vendored in tests/schemas/seldon), applied through a **stub** of the Kubernetes API
//! (no Kubernetes or Seldon Core installs here; docs/serving.md says so), and the uploaded
//! MLflow Model served by a real V2 server, MLServer (PyPI), which the hub then scores its
//! fleet through: the layout and the V2 requests Shoal makes are what a real server takes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};
use shoal_e2e::{
    Garage, Hub, Proc, free_port, http_get, ingest, pi_sample, python_json, shoal_cli, wait_until,
    which,
};

fn schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/seldon")
}

/// Each object's schema errors against `crd` (empty lists: valid).
fn validate(crd: &str, objects: &[Value]) -> Vec<Vec<String>> {
    let crd = schemas().join(crd);
    let got = python_json(
        "crd_validate.py",
        &[],
        &json!({ "crd": crd, "objects": objects }),
    );
    serde_json::from_value(got["errors"].clone()).unwrap()
}

/// A request the stub API server took: method, path and query, content type, bearer, body.
type Seen = Arc<Mutex<Vec<(String, String, String, String, Value)>>>;

async fn apply(
    State(seen): State<Seen>,
    UrlPath((group, version, ns, plural, name)): UrlPath<(String, String, String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let header = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    // Server-side apply sends YAML or JSON; JSON is YAML.
    let object: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.lock().unwrap().push((
        "PATCH".into(),
        format!(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}?{}",
            query.unwrap_or_default()
        ),
        header("content-type"),
        header("authorization"),
        object.clone(),
    ));
    axum::Json(object)
}

/// The stub Kubernetes API (server-side apply of any namespaced object) and its kubeconfig.
async fn stub_cluster(dir: &Path) -> (Seen, PathBuf) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
            axum::routing::patch(apply),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let kubeconfig = shoal_e2e::stub_kubeconfig(dir, addr);
    (seen, kubeconfig)
}

fn deploy_json(hub: &Hub, args: &[&str]) -> Value {
    let mut all = vec!["models", "deploy"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let (ok, out, err) = shoal_cli(hub, &all);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Starts MLServer on the MLflow Model under `model_dir`, as `name` version `version`.
async fn mlserver(dir: &Path, model_dir: &Path, name: &str, version: &str) -> (Proc, String) {
    let bin = which("mlserver")
        .expect("mlserver (PyPI: mlserver, mlserver-mlflow) is installed by the test command");
    let root = dir.join("mlserver");
    std::fs::create_dir_all(root.join(name)).unwrap();
    let port = free_port();
    std::fs::write(
        root.join("settings.json"),
        json!({
            "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
            "metrics_port": free_port(), "load_models_at_startup": true,
            // Inference in the server process: MLServer 1.7's worker pool does not start
            // with the uvloop that installs beside it.
            "parallel_workers": 0,
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        root.join(name).join("model-settings.json"),
        json!({
            "name": name,
            "implementation": "mlserver_mlflow.MLflowRuntime",
            "parameters": { "uri": model_dir, "version": version },
        })
        .to_string(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("start")
        .arg(&root)
        .stdout(std::process::Stdio::null());
    let proc = Proc::spawn("mlserver", cmd);
    let url = format!("http://127.0.0.1:{port}");
    let ready = format!("{url}/v2/models/{name}/versions/{version}/ready");
    wait_until("MLServer has the model", Duration::from_secs(120), || {
        let ready = ready.clone();
        async move {
            http_get(&ready)
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    (proc, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seldon_deployments_are_uploaded_validated_applied_and_served_by_mlserver() {
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::start(&dir.path().join("garage"), "models").await;
    let (seen, kubeconfig) = stub_cluster(dir.path()).await;
    let model_dir = dir.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let onnx = shoal_ml::onnx::export(&shoal_e2e::pi_model(38.0), &[]);
    std::fs::write(model_dir.join("model.onnx"), &onnx).unwrap();
    let hub = Hub::start_with_env(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--scoring-period",
            "100ms",
        ],
        &garage.env(),
    )
    .await;
    let source = model_dir.to_str().unwrap();

    // Seldon Core v2: a Model, as YAML for kubectl, and the files where it points.
    let (ok, yaml, err) = shoal_cli(
        &hub,
        &[
            "models",
            "deploy",
            "shoal-anomaly:3",
            "--to",
            "seldon",
            "--storage",
            "s3://models/shoal",
            "--source",
            source,
        ],
    );
    assert!(ok, "{err}");
    assert!(
        yaml.contains("kind: Model")
            && yaml.contains("storageUri: s3://models/shoal/shoal-anomaly"),
        "{yaml}"
    );
    assert!(err.contains("uploaded"), "{err}");
    let v2 = deploy_json(
        &hub,
        &[
            "shoal-anomaly:3",
            "--to",
            "seldon",
            "--storage",
            "s3://models/shoal",
            "--source",
            source,
        ],
    );
    assert_eq!(v2["applied"], false);
    let config = String::from_utf8(garage.curl_get("shoal/shoal-anomaly/config.pbtxt")).unwrap();
    assert!(
        config.contains("platform: \"onnxruntime_onnx\"") && config.contains("dims: [ -1, 2 ]"),
        "{config}"
    );
    assert_eq!(garage.curl_get("shoal/shoal-anomaly/3/model.onnx"), onnx);

    // Seldon Core v1: SeldonDeployments with Triton and with MLServer's MLflow runtime.
    let triton = deploy_json(
        &hub,
        &[
            "shoal-anomaly:3",
            "--to",
            "seldon",
            "--protocol",
            "v1",
            "--storage",
            "s3://models/shoal",
            "--source",
            source,
        ],
    );
    let mlflow = deploy_json(
        &hub,
        &[
            "shoal-anomaly:3",
            "--to",
            "seldon",
            "--protocol",
            "v1",
            "--server",
            "mlflow",
            "--storage",
            "s3://models/shoal",
            "--source",
            source,
            "--apply",
        ],
    );
    let graph = &mlflow["object"]["spec"]["predictors"][0]["graph"];
    assert_eq!(graph["implementation"], "MLFLOW_SERVER");
    assert_eq!(
        graph["modelUri"],
        "s3://models/shoal/shoal-anomaly/3/mlflow"
    );
    assert_eq!(graph["envSecretRefName"], "seldon-init-container-secret");
    assert_eq!(
        triton["object"]["spec"]["predictors"][0]["graph"]["implementation"],
        "TRITON_SERVER"
    );

    // Every object passes Seldon Core's own schemas; a misspelt field would not.
    let errors = validate("mlops.seldon.io_models.yaml", &[v2["object"].clone()]);
    assert_eq!(errors, vec![Vec::<String>::new()], "{v2}");
    let mut typo = v2["object"].clone();
    typo["spec"]["storageURI"] = typo["spec"]["storageUri"].take();
    assert!(!validate("mlops.seldon.io_models.yaml", &[typo])[0].is_empty());
    let errors = validate(
        "machinelearning.seldon.io_seldondeployments.yaml.gz",
        &[triton["object"].clone(), mlflow["object"].clone()],
    );
    assert_eq!(errors, vec![Vec::<String>::new(), Vec::new()]);

    // --apply went to the cluster: server-side apply, field manager shoal, the hub's token.
    assert_eq!(mlflow["applied"], true);
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let (method, path, content_type, bearer, body) = &requests[0];
    assert_eq!(method, "PATCH");
    assert!(
        path.starts_with(
            "/apis/machinelearning.seldon.io/v1/namespaces/ml/seldondeployments/shoal-anomaly?"
        ) && path.contains("fieldManager=shoal")
            && path.contains("force=true"),
        "{path}"
    );
    assert_eq!(content_type, "application/apply-patch+yaml");
    assert_eq!(bearer, "Bearer stub-token");
    assert_eq!(body, &mlflow["object"]);

    // Bad storage: refused, nothing uploaded.
    let (ok, _, err) = shoal_cli(
        &hub,
        &[
            "models",
            "deploy",
            "x:1",
            "--to",
            "seldon",
            "--storage",
            "/tmp/models",
            "--source",
            source,
        ],
    );
    assert!(!ok && err.contains("s3://BUCKET/PREFIX"), "{err}");

    // MLServer serves the uploaded MLflow Model (fetched back from S3 with curl), and the hub
    // scores its fleet through it over the V2 protocol.
    let fetched = dir.path().join("fetched/mlflow");
    std::fs::create_dir_all(&fetched).unwrap();
    for file in [
        "MLmodel",
        "model.onnx",
        "requirements.txt",
        "python_env.yaml",
        "conda.yaml",
    ] {
        let bytes = garage.curl_get(&format!("shoal/shoal-anomaly/3/mlflow/{file}"));
        std::fs::write(fetched.join(file), bytes).unwrap();
    }
    let (_mlserver, url) = mlserver(dir.path(), &fetched, "shoal-anomaly", "3").await;
    let deployed = deploy_json(
        &hub,
        &[
            "shoal-anomaly:3",
            "--to",
            "v2",
            "--endpoint",
            &url,
            "--source",
            source,
        ],
    );
    assert_eq!(deployed["to"], "v2");
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 60_000;
    ingest(&hub.grpc_url(), "pi-a", 30, move |s| {
        pi_sample(s, start, 100, if s > 20 { 10.0 } else { 0.0 })
    })
    .await
    .unwrap();
    wait_until(
        "pi-a scored through MLServer",
        Duration::from_secs(30),
        || async { hub.get("/api/v1/devices/pi-a").await["anomaly"]["seq"] == 30 },
    )
    .await;
    let a = hub.get("/api/v1/devices/pi-a").await["anomaly"].clone();
    assert_eq!(a["version"], "3");
    // 10 °C over what the load explains, sigma 0.3: about 33.
    assert!((a["score"].as_f64().unwrap() - 33.3).abs() < 2.0, "{a}");
}
