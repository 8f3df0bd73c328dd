//! The web dashboard in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven by Selenium (tests/python/dashboard.py) against a hub with real
//! agents, a device sending the book's JSON form, and a job. Signs in through the page, checks
//! every page draws with no console error, runs the job from the page and reads its log, and
//! checks that every request the pages made is an operation of the hub's documented API.
//! Screenshots land in `$CARGO_TARGET_TMPDIR/dashboard` (the ones in docs/ are from there).

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_e2e::{
    Hub, MlflowServer, agent_with, free_port, pi_model, python_json, shoal_cli, wait_until, which,
};
use shoal_ml::mlflow::{Metric, Mlflow};
use shoal_ml::provenance::{Build, SigningKey, statement};

/// The signed statement (a DSSE envelope) over a folder holding the registered model's file.
fn signed_statement(dir: &std::path::Path, key: &SigningKey) -> Value {
    let folder = dir.join("signed-model");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("model.onnx"),
        shoal_ml::onnx::export(&pi_model(38.0), &[]),
    )
    .unwrap();
    let build = Build {
        dataset_uri: "s3://datasets/fleet-2026-11",
        dataset_sha256: "4be1c3a0d9f2e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3",
        arguments: vec!["train".into()],
        builder: "dashboard-test".into(),
        run_id: None,
        mlflow_run_id: None,
        started: "2026-11-30T00:00:00Z".into(),
        finished: "2026-11-30T00:00:01Z".into(),
    };
    serde_json::to_value(key.sign(&statement(&folder, &build).unwrap()).unwrap()).unwrap()
}

/// Registers version 1 of `shoal-anomaly` in MLflow as a training run does: a run with
/// Shoal's dataset tags, parameters and metrics, the ONNX file under `model/`.
async fn register(mlflow: &str) {
    let c = Mlflow::new(mlflow).unwrap();
    let experiment = c.experiment("fleet-anomaly").await.unwrap();
    let tags = [
        ("shoal.dataset_uri", "s3://datasets/fleet-2026-11"),
        (
            "shoal.dataset_sha256",
            "4be1c3a0d9f2e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3",
        ),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let run = c
        .create_run(&experiment, "train-nightly", &tags)
        .await
        .unwrap();
    let params = [
        ("target", "temperature_celsius"),
        ("dataset_rows", "86400"),
        ("dataset_files", "24"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let metric = |key: &str, value: f64| Metric {
        key: key.into(),
        value,
        step: 0,
        timestamp_ms: 1_796_000_000_000,
    };
    c.log_batch(
        &run.run_id,
        &params,
        &[metric("holdout_rmse", 0.412), metric("holdout_r2", 0.931)],
        &[],
    )
    .await
    .unwrap();
    c.upload(
        &run,
        "model/model.onnx",
        shoal_ml::onnx::export(&pi_model(38.0), &[]),
    )
    .await
    .unwrap();
    c.end_run(&run.run_id, "FINISHED").await.unwrap();
    let source = format!("{}/model", run.artifact_uri);
    let version = c
        .register("shoal-anomaly", &source, &run.run_id, &[])
        .await
        .unwrap();
    assert_eq!(version, "1");
}

const JOB: &str = r#"apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly-train
spec:
  schedule: "0 3 * * *"
  timeZone: Europe/Berlin
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: train
              image: python:3.12
              command: ["sh", "-c"]
              args: ["echo training for $SHOAL_JOB; for i in 1 2 3; do echo epoch $i; sleep 1; done; echo weights > $SHOAL_ARTIFACTS_DIR/model.txt; echo training finished"]
"#;

/// The OpenAPI path templates as patterns: `{id}` matches one segment, `{path}` the rest.
fn documented(doc: &Value) -> Vec<(String, Vec<String>)> {
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(p, item)| {
            let methods = item
                .as_object()
                .map_or_else(Vec::new, |o| o.keys().cloned().collect());
            (p.clone(), methods)
        })
        .collect()
}

fn matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    for (i, seg) in t.iter().enumerate() {
        if *seg == "{path}" {
            return p.len() > i;
        }
        match p.get(i) {
            Some(s) if seg.starts_with('{') => {
                if s.is_empty() {
                    return false;
                }
            }
            Some(s) if s == seg => {}
            _ => return false,
        }
    }
    t.len() == p.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    for tool in ["chromium", "chromedriver"] {
        assert!(
            which(tool).is_some() || std::path::Path::new(&format!("/usr/bin/{tool}")).exists(),
            "{tool} is not installed (tests/run installs Debian's chromium and chromium-driver)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mlflow = MlflowServer::start(&dir.path().join("mlflow")).await;
    register(&mlflow.url()).await;
    let (signing, _, public) = SigningKey::generate().unwrap();
    let public_key = dir.path().join("signing.pub");
    std::fs::write(&public_key, public).unwrap();
    let mqtt = free_port();
    let mqtt_addr = format!("127.0.0.1:{mqtt}");
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &[
            "--mqtt-listen",
            &mqtt_addr,
            "--mlflow-tracking-uri",
            &mlflow.url(),
            "--provenance-key",
            public_key.to_str().unwrap(),
        ],
    )
    .await;
    // The registry's newest version, deployed: the Models page shows both, joined.
    let (ok, _, err) = shoal_cli(&hub, &["models", "deploy", "shoal-anomaly"]);
    assert!(ok, "{err}");
    // Its signed statement in the ledger (no chain here: recorded, not anchored).
    let recorded = hub
        .client()
        .post(format!("{}/api/v1/provenance", hub.http_url()))
        .json(&signed_statement(dir.path(), &signing))
        .send()
        .await
        .unwrap();
    assert!(
        recorded.status().is_success(),
        "{:?}",
        recorded.text().await
    );
    // The CLI reads the same registry the page does.
    let (ok, registered, err) = shoal_cli(&hub, &["models", "registry"]);
    assert!(ok, "{err}");
    assert!(
        registered.contains("holdout_rmse=0.41")
            && registered.contains("s3://datasets/fleet-2026-11"),
        "{registered}"
    );
    let mut agents = Vec::new();
    for (id, site) in [("edge-lab-1", "lab"), ("edge-field-2", "field")] {
        agents.push(agent_with(
            &hub.grpc_url(),
            id,
            &dir.path().join(id),
            "1s",
            None,
            &["--label", &format!("site={site}")],
        ));
    }
    // A device as the book's script sends it: a temperature and the 1-minute load only.
    let publish = which("mosquitto_pub")
        .expect("mosquitto_pub is not installed (tests/run installs mosquitto-clients)");
    let book = |temp: u32, load: &str| {
        let ok = Command::new(&publish)
            .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-q", "1"])
            .args(["-i", "pi-book", "-t", "sensor/pi-book"])
            .args([
                "-m",
                &format!("{{\"device\":\"pi-book\",\"temp\":{temp},\"load\":{load}}}"),
            ])
            .stdin(Stdio::null())
            .status()
            .expect("run mosquitto_pub");
        assert!(ok.success());
    };
    book(48312, "0.42");
    book(49000, "0.50");
    wait_until(
        "three devices with samples",
        Duration::from_secs(30),
        || async {
            hub.stored_up_to("edge-lab-1").await >= 3
                && hub.stored_up_to("edge-field-2").await >= 3
                && hub.stored_up_to("pi-book").await == 2
        },
    )
    .await;
    let client = hub.client();
    let url = hub.http_url();
    let applied = client
        .post(format!("{url}/api/v1/jobs"))
        .header("content-type", "application/yaml")
        .body(JOB)
        .send()
        .await
        .unwrap();
    assert!(applied.status().is_success(), "{:?}", applied.text().await);
    let viewer: Value = client
        .post(format!("{url}/api/v1/tokens"))
        .json(&json!({"name": "dashboard-viewer", "role": "viewer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // The pages are open (they hold no data); the API behind them is not.
    let page = reqwest::get(format!("{url}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("<title>Fleet · Shoal</title>")
    );
    let icon = reqwest::get(format!("{url}/favicon.ico")).await.unwrap();
    assert_eq!(
        (
            icon.status().as_u16(),
            icon.headers()["content-type"].to_str().unwrap()
        ),
        (200, "image/svg+xml")
    );
    // An anonymous caller gets every page's frame and nothing of the fleet in it: no device,
    // label, reading, job or model; each page's data comes only from the API, which refuses it.
    for page in [
        "/",
        "/ui/devices/edge-lab-1",
        "/ui/jobs",
        "/ui/models",
        "/ui/runs/x",
    ] {
        let r = reqwest::get(format!("{url}{page}")).await.unwrap();
        assert_eq!(r.status(), 200, "{page}");
        let body = r.text().await.unwrap();
        for data in [
            "site=lab",
            "edge-field-2",
            "x86_64",
            "nightly-train",
            "holdout_rmse",
            "pi-book",
        ] {
            assert!(
                !body.contains(data),
                "{page} holds {data:?} for an anonymous caller"
            );
        }
    }
    for path in [
        "/api/v1/devices/edge-lab-1",
        "/api/v1/devices/edge-lab-1/series?metric=cpu_percent",
        "/api/v1/runs",
        "/api/v1/models/registry",
        "/api/v1/alerts",
    ] {
        let r = reqwest::get(format!("{url}{path}")).await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
    }
    let api = reqwest::get(format!("{url}/api/v1/devices")).await.unwrap();
    assert_eq!(api.status(), 401);

    // Once more, so that the JSON device is still online (60 s) however long the set-up took.
    book(49000, "0.50");
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let out = python_json(
        "dashboard.py",
        &[],
        &json!({
            "hub": url,
            "token": hub.token,
            "viewer": viewer["token"],
            "devices": ["edge-lab-1", "edge-field-2", "pi-book"],
            "chart_device": "edge-lab-1",
            "json_device": "pi-book",
            "job": "nightly-train",
            "log_text": "training finished",
            "shots": shots,
        }),
    );
    for a in &mut agents {
        a.kill9();
    }
    let o = &out;
    let console: Vec<(&str, &Value)> = [
        "fleet",
        "device",
        "json_device",
        "jobs",
        "run",
        "models",
        "viewer",
    ]
    .iter()
    .map(|p| (*p, &o[p]["console"]))
    .chain([
        ("device windows", &o["device"]["console_windows"]),
        ("phone", &o["phone_console"]),
    ])
    .collect();
    for (page, errors) in console {
        assert_eq!(errors, &json!([]), "console errors on the {page} page");
    }
    assert!(
        o["refused"].as_str().unwrap().contains("token"),
        "a wrong token is refused with the hub's reason: {}",
        o["refused"]
    );

    // Fleet: every device, its status, readings, and missing ones shown as missing.
    let rows = &o["fleet"]["rows"];
    let headers: Vec<&str> = o["fleet"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().trim_end_matches([' ', '▲', '▼']))
        .collect();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} column: {headers:?}"))
    };
    for (id, row) in rows.as_object().unwrap() {
        assert_eq!(row[col("Status")], "online", "{id}: {row}");
    }
    let lab = &rows["edge-lab-1"];
    assert!(lab[col("CPU")].as_str().unwrap().ends_with('%'), "{lab}");
    assert!(lab[col("Memory")].as_str().unwrap().ends_with('%'), "{lab}");
    assert_eq!(lab[col("Labels")], "site=lab", "{lab}");
    let book = &rows["pi-book"];
    for missing in ["CPU", "Memory", "GPU °C", "Throttling"] {
        assert_eq!(book[col(missing)], "—", "pi-book's {missing}: {book}");
    }
    assert_eq!(book[col("SoC °C")], "49.0", "{book}");
    assert!(
        o["fleet"]["counts"]
            .as_str()
            .unwrap()
            .starts_with("3\ndevices\n3\nonline"),
        "{}",
        o["fleet"]["counts"]
    );
    assert_eq!(o["fleet"]["searched"], json!(["edge-lab-1"]));
    assert_eq!(
        o["fleet"]["sorted_desc"],
        json!(["pi-book", "edge-lab-1", "edge-field-2"])
    );
    assert!(o["fleet"]["who"].as_str().unwrap().contains("admin"));

    // Keyboard.
    assert_eq!(
        o["keyboard"]["tabs"][0], "Skip to content",
        "{}",
        o["keyboard"]
    );
    assert_eq!(o["keyboard"]["slash_focuses"], "q");
    assert_eq!(o["keyboard"]["enter_sorts"], "ascending");

    // Device: charts with points, drawn, at one bucket per pixel or coarser.
    let charts = &o["device"]["charts"];
    for chart in ["CPU", "Load average", "Memory"] {
        assert!(charts[chart].as_u64().unwrap_or(0) > 0, "{chart}: {charts}");
    }
    assert!(
        o["device"]["canvases"].as_u64().unwrap() >= 3,
        "{}",
        o["device"]
    );
    assert!(
        o["device"]["facts"]
            .as_str()
            .unwrap()
            .contains("Gaps\nnone"),
        "{}",
        o["device"]["facts"]
    );
    let step: u64 = o["device"]["step_7d"].as_str().unwrap().parse().unwrap();
    assert!(
        step >= 600 && step.is_multiple_of(60),
        "7 days at {step} s a bucket"
    );
    let jd = &o["json_device"];
    assert!(jd["charts"]["Temperatures"].as_u64().unwrap() > 0, "{jd}");
    assert!(jd["charts"]["Load average"].as_u64().unwrap() > 0, "{jd}");
    assert!(
        jd["charts"].get("CPU").is_none(),
        "no CPU chart for a device that sends none: {jd}"
    );

    // Jobs: run from the page, its log followed to the end, its artifact listed.
    assert!(
        o["jobs"]["jobs"]
            .as_str()
            .unwrap()
            .contains("nightly-train")
    );
    assert!(
        o["run"]["url"]
            .as_str()
            .unwrap()
            .contains("/ui/runs/nightly-train-")
    );
    assert!(
        o["run"]["log"]
            .as_str()
            .unwrap()
            .contains("epoch 3\ntraining finished"),
        "{}",
        o["run"]
    );
    assert!(
        o["run"]["facts"].as_str().unwrap().contains("succeeded"),
        "{}",
        o["run"]
    );
    assert!(
        o["run"]["artifacts"]
            .as_str()
            .unwrap()
            .contains("model.txt"),
        "{}",
        o["run"]
    );
    assert_eq!(
        o["run"]["downloaded"], "weights\n",
        "the artifact, downloaded through the page: {}",
        o["run"]
    );
    let registry = o["models"]["registry"].as_str().unwrap();
    for shown in [
        "shoal-anomaly",
        "holdout_rmse 0.4120",
        "s3://datasets/fleet-2026-11",
        "manifest 4be1c3a0d9f2",
        "86,400 rows in 24 files",
        "/v2/models/shoal-anomaly",
    ] {
        assert!(
            registry.contains(shown),
            "the registry shows {shown:?}: {registry}"
        );
    }
    let models = o["models"]["text"].as_str().unwrap();
    assert!(models.contains("entry #1 · not anchored"), "{models}");
    assert!(
        models.contains("The ledger holds 1 entry, each following from the one before"),
        "{models}"
    );
    assert!(
        o["models"]["ledger"]
            .as_str()
            .unwrap()
            .contains("model.onnx"),
        "{}",
        o["models"]
    );

    // Dark and light, a phone's width, and a viewer's narrower page.
    assert_eq!(o["dark_background"], "rgb(15, 20, 25)");
    assert_eq!(o["light_background"], "rgb(247, 248, 250)");
    for (page, w) in o["phone"].as_object().unwrap() {
        assert!(
            w[0].as_u64() <= w[1].as_u64(),
            "{page} is wider than a phone: {w}"
        );
    }
    assert!(o["viewer"]["who"].as_str().unwrap().contains("viewer"));
    assert_eq!(
        o["viewer"]["run_buttons"], 0,
        "a viewer is offered no Run now"
    );
    assert!(
        o["viewer"]["jobs"]
            .as_str()
            .unwrap()
            .contains("nightly-train")
    );

    // Every request the pages made is an operation of the documented API, or a page or asset.
    let doc: Value = reqwest::get(format!("{url}/api/v1/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ops = documented(&doc);
    let requests = o["requests"].as_array().unwrap();
    assert!(requests.len() > 5, "{requests:?}");
    for r in requests {
        let path = r
            .as_str()
            .unwrap()
            .strip_prefix(&url)
            .unwrap_or_else(|| panic!("a request elsewhere: {r}"));
        let path = path.split('?').next().unwrap();
        if path == "/" || path == "/favicon.ico" || path.starts_with("/ui/") {
            continue;
        }
        assert!(
            ops.iter().any(|(t, _)| matches(t, path)),
            "the dashboard asked for {path}, which the API does not document"
        );
    }
    for shot in [
        "fleet",
        "device",
        "jobs",
        "run",
        "models",
        "fleet-dark",
        "fleet-phone",
    ] {
        assert!(
            shots.join(format!("{shot}.png")).is_file(),
            "no {shot} screenshot"
        );
    }
}
