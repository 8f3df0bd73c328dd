//! The closed loop: a model deployed to the hub (`shoal models deploy`) is served at `/v2`
//! behind the hub's tokens, scores incoming telemetry off the ingest path, and its scores
//! show per device (CLI, REST, /metrics) and open alerts (list, acknowledge, webhook). A new
//! version swaps in under load without a failed request; a model server that is down delays
//! scores (counted) and loses none.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_e2e::{Hub, Proc, bin, free_port, http_client, ingest, pi_sample, shoal_cli, wait_until};
use shoal_ml::train::Model;

use shoal_e2e::pi_model;

fn write_model(dir: &Path, m: &Model) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.onnx"), shoal_ml::onnx::export(m, &[])).unwrap();
    dir.to_path_buf()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A webhook receiver: every JSON body POSTed to it.
async fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

async fn device(hub: &Hub, id: &str) -> Value {
    hub.get(&format!("/api/v1/devices/{id}")).await
}

/// Waits until `id`'s latest score is of sample `seq`; returns the device.
async fn scored_up_to(hub: &Hub, id: &str, seq: u64) -> Value {
    wait_until(
        &format!("{id} scored up to {seq}"),
        Duration::from_secs(30),
        || async move { device(hub, id).await["anomaly"]["seq"] == seq },
    )
    .await;
    device(hub, id).await
}

fn events(got: &Arc<Mutex<Vec<Value>>>) -> Vec<(String, String)> {
    got.lock()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or("").to_string(),
                e["alert"]["device_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_scores_its_fleet_with_the_deployed_model_and_alerts_on_anomalies() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = write_model(&dir.path().join("v1"), &pi_model(38.0));
    let (hook, received) = webhook().await;
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &[
            "--scoring-period",
            "100ms",
            "--alert-samples",
            "3",
            "--alert-webhook",
            &hook,
            "--metrics-auth",
            "token",
        ],
    )
    .await;

    // Nothing deployed yet: devices show no score.
    let start = now_ms() - 60_000;
    ingest(&hub.grpc_url(), "pi-ok", 20, move |s| {
        pi_sample(s, start, 100, 0.0)
    })
    .await
    .unwrap();
    assert_eq!(device(&hub, "pi-ok").await["anomaly"], Value::Null);

    let (ok, out, err) = shoal_cli(
        &hub,
        &[
            "models",
            "deploy",
            "shoal-anomaly:1",
            "--source",
            v1.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("deployed shoal-anomaly version 1"), "{out}");
    let (ok, out, _) = shoal_cli(&hub, &["models", "list"]);
    assert!(
        ok && out.contains("shoal-anomaly") && out.contains("yes"),
        "{out}"
    );

    // A healthy board and one running 10 °C hotter than its load explains.
    ingest(&hub.grpc_url(), "pi-hot", 40, move |s| {
        pi_sample(s, start, 100, if s > 30 { 10.0 } else { 0.0 })
    })
    .await
    .unwrap();
    let ok_dev = scored_up_to(&hub, "pi-ok", 20).await;
    let hot = scored_up_to(&hub, "pi-hot", 40).await;
    let a = &ok_dev["anomaly"];
    assert!(a["score"].as_f64().unwrap() < 3.0, "{a}");
    assert_eq!(a["model"], "shoal-anomaly");
    assert_eq!(a["version"], "1");
    let h = &hot["anomaly"];
    assert!(h["score"].as_f64().unwrap() > 20.0, "{h}");
    let residual = h["residual"].as_f64().unwrap();
    assert!((residual - 10.0).abs() < 0.6, "{h}");
    assert_eq!(h["target"], "temperature_celsius");

    let (ok, out, _) = shoal_cli(&hub, &["devices", "list"]);
    assert!(ok && out.contains("SCORE"), "{out}");
    let hot_line = out.lines().find(|l| l.starts_with("pi-hot")).unwrap();
    assert!(
        hot_line
            .trim_end()
            .ends_with(&format!("{:.2}", h["score"].as_f64().unwrap())),
        "{out}"
    );
    let (_, out, _) = shoal_cli(&hub, &["devices", "show", "pi-hot"]);
    assert!(
        out.contains("residual +") && out.contains("shoal-anomaly:1"),
        "{out}"
    );

    // An alert opened for pi-hot only, reached the webhook, and is acknowledged.
    wait_until(
        "the opened alert reached the webhook",
        Duration::from_secs(10),
        || async { events(&received).contains(&("opened".into(), "pi-hot".into())) },
    )
    .await;
    assert!(!events(&received).iter().any(|(_, d)| d == "pi-ok"));
    let alerts = hub.get("/api/v1/alerts").await;
    let alert = &alerts["alerts"][0];
    assert_eq!(alert["device_id"], "pi-hot", "{alerts}");
    assert_eq!(alert["state"], "open");
    assert_eq!(alerts["alerts"].as_array().unwrap().len(), 1);
    let id = alert["id"].as_str().unwrap().to_string();
    let (ok, out, _) = shoal_cli(&hub, &["alerts", "list"]);
    assert!(ok && out.contains(&id) && out.contains("open"), "{out}");
    let (ok, out, err) = shoal_cli(&hub, &["alerts", "ack", &id]);
    assert!(ok && out.contains("acknowledged"), "{out}{err}");
    assert_eq!(
        hub.get("/api/v1/alerts").await["alerts"][0]["state"],
        "acknowledged"
    );

    // /metrics: the scorer's counters and each device's score (it needs a token here).
    let scored = hub.metric("shoal_scoring_samples_total").await;
    assert!(scored >= 60.0, "{scored}");
    assert_eq!(hub.metric("shoal_alerts_open").await, 1.0);
    let text = hub
        .client()
        .get(format!("{}/metrics", hub.http_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            "shoal_device_anomaly_score{device_id=\"pi-hot\",model=\"shoal-anomaly\",version=\"1\"}"
        ),
        "{text}"
    );

    // The board cools down: the alert resolves and the webhook hears it.
    let mut next = 41;
    for _ in 0..2 {
        let from = next;
        ingest_more(&hub, "pi-hot", from, 5, start).await;
        next += 5;
    }
    wait_until(
        "the resolved alert reached the webhook",
        Duration::from_secs(10),
        || async { events(&received).contains(&("resolved".into(), "pi-hot".into())) },
    )
    .await;
    assert_eq!(hub.get("/api/v1/alerts").await["alerts"], json!([]));
    assert_eq!(
        hub.get("/api/v1/alerts?all=true").await["alerts"][0]["state"],
        "resolved"
    );
}

/// Samples `from..from+n` of `device`, healthy.
async fn ingest_more(hub: &Hub, device: &str, from: u64, n: u64, start: i64) {
    // `ingest` sends 1..=N; samples up to `from` are already stored and are deduplicated.
    ingest(&hub.grpc_url(), device, from + n - 1, move |s| {
        pi_sample(s, start, 100, if s >= from { 0.0 } else { 10.0 })
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_server_needs_a_token_and_swaps_versions_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = write_model(&dir.path().join("v1"), &pi_model(38.0));
    let v2 = write_model(&dir.path().join("v2"), &pi_model(40.0));
    let hub = Hub::start(&dir.path().join("hub")).await;
    let (ok, _, err) = shoal_cli(
        &hub,
        &[
            "models",
            "deploy",
            "shoal-anomaly:1",
            "--source",
            v1.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let infer = format!("{}/v2/models/shoal-anomaly/infer", hub.http_url());
    let body = json!({ "inputs": [
        { "name": "features", "shape": [1, 2], "datatype": "FP64", "data": [50.0, 1.0] },
        { "name": "observed", "shape": [1, 1], "datatype": "FP64", "data": [54.0] },
    ]});
    let r = http_client().post(&infer).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token, no inference");
    let r = hub.client().post(&infer).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Every role may infer; changing what is served, or recording provenance, needs a
    // scientist, acknowledging alerts an operator; anonymous callers get 401.
    let token = |role: &'static str| {
        let client = hub.client();
        let url = format!("{}/api/v1/tokens", hub.http_url());
        async move {
            let v: Value = client
                .post(url)
                .json(&json!({ "name": format!("{role}-1"), "role": role }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["token"].as_str().unwrap().to_string()
        }
    };
    let (viewer, operator, scientist) = (
        token("viewer").await,
        token("operator").await,
        token("scientist").await,
    );
    let as_role = |t: &str| shoal_e2e::authed_client(t);
    let r = as_role(&viewer)
        .post(&infer)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a viewer infers");
    let url = |p: &str| format!("{}{p}", hub.http_url());
    let deploy = json!({ "model": "x", "source": "/nonexistent" });
    for (who, method, path, status) in [
        ("", "POST", "/api/v1/models/deployments", 401),
        (viewer.as_str(), "POST", "/api/v1/models/deployments", 403),
        (operator.as_str(), "POST", "/api/v1/models/deployments", 403),
        (
            viewer.as_str(),
            "DELETE",
            "/api/v1/models/deployments/shoal-anomaly",
            403,
        ),
        (viewer.as_str(), "POST", "/api/v1/models/seldon", 403),
        (viewer.as_str(), "POST", "/api/v1/provenance", 403),
        (viewer.as_str(), "POST", "/api/v1/alerts/a-1/ack", 403),
        (scientist.as_str(), "POST", "/api/v1/alerts/a-1/ack", 403),
        ("", "GET", "/api/v1/alerts", 401),
        ("", "GET", "/v2/models/shoal-anomaly", 401),
    ] {
        let client = if who.is_empty() {
            http_client()
        } else {
            as_role(who)
        };
        let r = client
            .request(method.parse().unwrap(), url(path))
            .json(&deploy)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
    }
    assert_eq!(
        hub.get("/api/v1/models/deployments").await["deployments"][0]["version"],
        "1"
    );
    let r = hub.client().post(&infer).json(&body).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    let expected = v["outputs"][0]["data"][0].as_f64().unwrap();
    assert!((expected - (38.0 + 12.5 + 3.0)).abs() < 1e-9, "{v}");
    let meta = hub.get("/v2/models/shoal-anomaly").await;
    assert_eq!(meta["versions"], json!(["1"]));
    // Triton's client over the hub's REST /v2 and its gRPC port, with the token; onnxruntime
    // computes the same; without the token, gRPC says unauthenticated.
    let readings = json!({ "features": [[50.0, 1.0], [10.0, 0.5]], "observed": [54.0, 41.0] });
    let reference = shoal_e2e::python_json(
        "onnx_run.py",
        &[v1.join("model.onnx").to_str().unwrap()],
        &readings,
    );
    let mut req = readings.clone();
    req["model"] = json!("shoal-anomaly");
    req["version"] = json!("");
    let got = shoal_e2e::python_json(
        "v2_client.py",
        &[&hub.http.to_string(), &hub.grpc.to_string(), &hub.token],
        &req,
    );
    for proto in ["http", "grpc", "http_binary"] {
        for (g, w) in got[proto]["score"]
            .as_array()
            .unwrap()
            .iter()
            .zip(reference["score"].as_array().unwrap())
        {
            assert!(
                (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-5,
                "{proto}: {got}"
            );
        }
    }
    assert_eq!(got["grpc"]["model_version"], "1");
    let anonymous = got["anonymous"].as_str().unwrap();
    assert!(
        anonymous.contains("UNAUTHENTICATED") || anonymous.contains("Unauthenticated"),
        "{anonymous}"
    );

    // Eight clients keep inferring while version 2 is deployed: no request fails, and the
    // answers move from version 1 to version 2.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (client, infer, body, stop) =
                (hub.client(), infer.clone(), body.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = client.post(&infer).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200, "a request failed during the swap");
                    let v: Value = r.json().await.unwrap();
                    seen.push(v["model_version"].as_str().unwrap().to_string());
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, _, err) = shoal_cli(
        &hub,
        &[
            "models",
            "deploy",
            "shoal-anomaly:2",
            "--source",
            v2.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = 0;
    for c in clients {
        let seen = c.await.expect("a client failed");
        answers += seen.len();
        assert_eq!(seen.last().map(String::as_str), Some("2"));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "never back to 1");
    }
    assert!(answers > 16, "{answers}");
    assert_eq!(
        hub.get("/v2/models/shoal-anomaly").await["versions"],
        json!(["2"])
    );

    // A viewer may infer; a corrupt model is refused and the deployed one keeps serving.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model.onnx"), b"not onnx").unwrap();
    let (ok, _, err) = shoal_cli(
        &hub,
        &[
            "models",
            "deploy",
            "shoal-anomaly:3",
            "--source",
            bad.to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("does not load"), "{err}");
    let (ok, _, err) = shoal_cli(
        &hub,
        &["models", "deploy", "nope:1", "--source", "/nonexistent"],
    );
    assert!(!ok && err.contains("/nonexistent"), "{err}");
    let r = hub.client().post(&infer).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        hub.get("/api/v1/models/deployments").await["deployments"][0]["version"],
        "2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_server_that_is_down_delays_scores_and_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(&dir.path().join("m"), &pi_model(38.0));
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--scoring-period", "100ms"],
    )
    .await;
    // Scored through an external V2 server that is not up yet.
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (ok, out, err) = shoal_cli(
        &hub,
        &[
            "models",
            "deploy",
            "shoal-anomaly:7",
            "--to",
            "v2",
            "--endpoint",
            &endpoint,
            "--source",
            model.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains(&format!("scored through {endpoint}")), "{out}");
    let start = now_ms() - 60_000;
    ingest(&hub.grpc_url(), "pi-a", 200, move |s| {
        pi_sample(s, start, 100, 0.0)
    })
    .await
    .unwrap();
    // Ingest took everything; scoring waits, counted.
    assert_eq!(hub.stored_up_to("pi-a").await, 200);
    wait_until(
        "scoring failures are counted",
        Duration::from_secs(10),
        || async { hub.metric("shoal_scoring_failures_total").await >= 1.0 },
    )
    .await;
    assert!(hub.metric("shoal_scoring_lag_samples").await >= 100.0);
    assert_eq!(device(&hub, "pi-a").await["anomaly"], Value::Null);

    // The model server comes up: scores catch up to the newest sample.
    let mut cmd = std::process::Command::new(bin("shoal-ml"));
    cmd.args(["serve", "--model"])
        .arg(format!("shoal-anomaly:7={}", model.display()))
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(std::process::Stdio::null());
    let _server = Proc::spawn("shoal-ml serve", cmd);
    let d = scored_up_to(&hub, "pi-a", 200).await;
    assert_eq!(d["anomaly"]["version"], "7");
    assert!(d["anomaly"]["score"].as_f64().unwrap() < 3.0);
    wait_until("the lag is gone", Duration::from_secs(10), || async {
        hub.metric("shoal_scoring_lag_samples").await == 0.0
    })
    .await;
    // 100 samples at first sight (the backlog) plus none lost after.
    assert!(hub.metric("shoal_scoring_samples_total").await >= 100.0);
}
