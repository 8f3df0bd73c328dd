//! `shoal-ml serve`, the Open Inference Protocol (V2) server, against clients no one here
//! wrote: Triton's `tritonclient` (PyPI) over HTTP and gRPC, and plain JSON over HTTP; every
//! output is compared with onnxruntime on the same ONNX file within 1e-5. Two versions of one
//! model side by side; bad requests get the protocol's error with a clear message and the
//! server keeps serving. Fails (never skips) when the Python tools are missing.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_e2e::{Proc, bin, free_port, http_client, wait_until};
use shoal_ml::train::Model;

fn model(weight: f64) -> Model {
    Model {
        target: "temperature_celsius".into(),
        features: vec!["load1".into(), "cpu_percent".into()],
        weights: vec![weight, 0.125],
        intercept: 41.0,
        sigma: 1.5,
        threshold: 4.0,
    }
}

fn write_model(dir: &Path, m: &Model) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.onnx"), shoal_ml::onnx::export(m, &[])).unwrap();
    dir.to_path_buf()
}

fn close(a: &Value, b: &Value) {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
    }
}

struct Server {
    _proc: Proc,
    http: String,
    grpc: String,
}

async fn serve(models: &[String]) -> Server {
    let mut cmd = Command::new(bin("shoal-ml"));
    cmd.arg("serve");
    for m in models {
        cmd.arg("--model").arg(m);
    }
    cmd.args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::piped());
    let mut proc = Proc::spawn("shoal-ml serve", cmd);
    let mut line = String::new();
    std::io::BufReader::new(proc.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ep: Value = serde_json::from_str(&line).expect("the endpoints line");
    let server = Server {
        _proc: proc,
        http: format!(
            "127.0.0.1:{}",
            ep["http"].as_str().unwrap().rsplit(':').next().unwrap()
        ),
        grpc: format!(
            "127.0.0.1:{}",
            ep["grpc"].as_str().unwrap().rsplit(':').next().unwrap()
        ),
    };
    let live = format!("http://{}/v2/health/live", server.http);
    wait_until("the server is live", Duration::from_secs(20), || {
        let live = live.clone();
        async move {
            shoal_e2e::http_get(&live)
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_clients_get_what_onnxruntime_computes_from_every_version() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = write_model(&dir.path().join("v1"), &model(2.5));
    let v2 = write_model(&dir.path().join("v2"), &model(3.0));
    let server = serve(&[
        format!("anomaly:1={}", v1.display()),
        format!("anomaly:2={}", v2.display()),
    ])
    .await;
    let readings = json!({
        "features": [[0.5, 20.0], [3.0, 90.0], [1.25, 47.5]],
        "observed": [45.0, 60.0, 44.0],
    });

    for (version, file) in [("1", &v1), ("2", &v2), ("", &v2)] {
        let model_file = file.join("model.onnx");
        let reference =
            shoal_e2e::python_json("onnx_run.py", &[model_file.to_str().unwrap()], &readings);
        // Triton's client, both protocols.
        let mut req = readings.clone();
        req["model"] = json!("anomaly");
        req["version"] = json!(version);
        let got = shoal_e2e::python_json("v2_client.py", &[&server.http, &server.grpc], &req);
        for proto in ["http", "grpc"] {
            let g = &got[proto];
            assert_eq!(g["live"], true, "{got}");
            assert_eq!(g["model_ready"], true);
            assert_eq!(g["versions"], json!(["1", "2"]));
            let served = if version.is_empty() { "2" } else { version };
            assert_eq!(g["model_version"], served, "{proto}");
            close(&g["expected"], &reference["expected"]);
            close(&g["score"], &reference["score"]);
        }
        let binary = &got["http_binary"];
        assert!(
            binary["extensions"]
                .to_string()
                .contains("binary_tensor_data")
        );
        close(&binary["expected"], &reference["expected"]);
        close(&binary["score"], &reference["score"]);
        // 64 concurrent one-row requests: each gets its own row's score; the statistics
        // extension counts every row and at most one run per request.
        let concurrent = &got["concurrent"];
        let scores = reference["score"].as_array().unwrap();
        for pair in concurrent["rows"].as_array().unwrap() {
            let (row, score) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            assert!(
                (score - scores[row].as_f64().unwrap()).abs() <= 1e-5,
                "{pair}"
            );
        }
        let stats = &concurrent["stats"][0];
        let runs = stats["execution_count"].as_u64().unwrap();
        let rows = stats["inference_count"].as_u64().unwrap();
        assert!(rows >= 64 + 3 && runs <= rows, "{stats}");
        let bad = got["grpc"]["bad"].as_str().unwrap();
        assert!(bad.contains("\"features\" is missing"), "{bad}");

        // Plain JSON over HTTP, with curl.
        let path = if version.is_empty() {
            "/v2/models/anomaly/infer".to_string()
        } else {
            format!("/v2/models/anomaly/versions/{version}/infer")
        };
        let body = json!({ "id": "r-1", "inputs": [
            { "name": "features", "shape": [3, 2], "datatype": "FP64", "data": readings["features"] },
            { "name": "observed", "shape": [3, 1], "datatype": "FP64", "data": readings["observed"] },
        ]});
        let curl = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "-H",
                "content-type: application/json",
                "-d",
            ])
            .arg(body.to_string())
            .arg(format!("http://{}{path}", server.http))
            .output()
            .expect("curl is installed by the test command");
        assert!(
            curl.status.success(),
            "{}",
            String::from_utf8_lossy(&curl.stderr)
        );
        let v: Value = serde_json::from_slice(&curl.stdout).unwrap();
        assert_eq!(v["id"], "r-1");
        let out = |name: &str| {
            v["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == name)
                .unwrap()["data"]
                .clone()
        };
        close(&out("expected"), &reference["expected"]);
        close(&out("score"), &reference["score"]);
    }
}

/// One row in the binary tensor data extension; the status and the JSON part of the answer.
async fn binary_infer(url: &str, features: [f64; 2], observed: f64) -> (u16, Value) {
    let header = json!({ "inputs": [
        { "name": "features", "shape": [1, 2], "datatype": "FP64", "parameters": { "binary_data_size": 16 } },
        { "name": "observed", "shape": [1, 1], "datatype": "FP64", "parameters": { "binary_data_size": 8 } },
    ], "outputs": [{ "name": "score", "parameters": { "binary_data": true } }] });
    let mut body = serde_json::to_vec(&header).unwrap();
    let json_len = body.len();
    for x in features.into_iter().chain([observed]) {
        body.extend_from_slice(&x.to_le_bytes());
    }
    let r = http_client()
        .post(url)
        .header("inference-header-content-length", json_len.to_string())
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let len: Option<usize> = r
        .headers()
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let bytes = r.bytes().await.unwrap();
    let mut v: Value = serde_json::from_slice(&bytes[..len.unwrap_or(bytes.len())]).unwrap();
    if let Some(len) = len {
        let score = f64::from_le_bytes(bytes[len..len + 8].try_into().unwrap());
        v["score"] = json!(score);
    }
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_protocols_error_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_model(&dir.path().join("anomaly"), &model(2.5));
    let server = serve(&[m.display().to_string()]).await;
    let url = |p: &str| format!("http://{}{p}", server.http);
    let good = json!({ "inputs": [
        { "name": "features", "shape": [1, 2], "datatype": "FP64", "data": [1.0, 2.0] },
        { "name": "observed", "shape": [1, 1], "datatype": "FP64", "data": [44.0] },
    ]});
    let cases = [
        (
            "/v2/models/nope/infer",
            good.clone(),
            404,
            "no model \"nope\"",
        ),
        (
            "/v2/models/anomaly/versions/7/infer",
            good.clone(),
            404,
            "no version \"7\"",
        ),
        (
            "/v2/models/anomaly/infer",
            json!({ "inputs": [good["inputs"][0]] }),
            400,
            "\"observed\" is missing",
        ),
        (
            "/v2/models/anomaly/infer",
            json!({ "inputs": [
            { "name": "features", "shape": [1, 3], "datatype": "FP64", "data": [1.0, 2.0, 3.0] }, good["inputs"][1]] }),
            400,
            "shape [1, 3]",
        ),
        (
            "/v2/models/anomaly/infer",
            json!({ "inputs": [
            { "name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0] }, good["inputs"][1]] }),
            400,
            "datatype FP32",
        ),
        (
            "/v2/models/anomaly/infer",
            json!({ "inputs": [
            { "name": "features", "shape": [1, 2], "datatype": "FP64", "data": [1.0, "x"] }, good["inputs"][1]] }),
            400,
            "non-number",
        ),
        (
            "/v2/models/anomaly/infer",
            json!({ "inputs": [
            { "name": "features", "shape": [1, 2], "datatype": "FP64", "data": [1.7976931348623157e308, 1e308] }, good["inputs"][1]] }),
            200,
            "",
        ),
    ];
    for (path, body, status, says) in cases {
        let r = http_client()
            .post(url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap_or("").contains(says), "{v}");
    }
    let r = http_client()
        .post(url("/v2/models/anomaly/infer"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // NaN travels only in binary: the binary tensor data extension, refused with the reason.
    let (status, v) = binary_infer(&url("/v2/models/anomaly/infer"), [f64::NAN, 1.0], 44.0).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("NaN"), "{v}");
    let (status, v) = binary_infer(&url("/v2/models/anomaly/infer"), [1.0, 2.0], 44.0).await;
    assert_eq!(status, 200, "{v}");
    // Over the size limit: 413 in the protocol's error form.
    let huge = vec![b' '; (64 << 20) + 1];
    let r = http_client()
        .post(url("/v2/models/anomaly/infer"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("limited to 64 MiB"),
        "{v}"
    );
    let r = http_client()
        .post(url("/v2/models/anomaly/infer"))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving");
    let meta: Value = http_client()
        .get(url("/v2/models/anomaly"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 2]), "{meta}");

    // Without authentication the server stays on loopback: any other address is refused
    // before anything is bound.
    let out = Command::new(bin("shoal-ml"))
        .args([
            "serve",
            "--model",
            m.to_str().unwrap(),
            "--http-listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no authentication") && err.contains("--insecure-no-auth"),
        "{err}"
    );

    // A corrupt ONNX file is refused at load, naming the file.
    let broken = dir.path().join("broken.onnx");
    std::fs::write(&broken, b"not an onnx model").unwrap();
    let out = Command::new(bin("shoal-ml"))
        .args(["serve", "--model", broken.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.onnx"));
}
