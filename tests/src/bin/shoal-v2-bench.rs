//! `shoal-v2-bench`: Shoal's model server (`shoal-ml serve`) against MLServer serving the same
//! model, same client, same machine, same run: latency (p50/p99) of one-row requests over REST
//! and gRPC, one at a time, and throughput with 64 clients at once.
//!
//!   cargo build --release --bins
//!   target/release/shoal-v2-bench --requests 2000 --clients 64 --duration 10s
//!
//! MLServer (PyPI `mlserver` and `mlserver-mlflow`, found on PATH or with --mlserver) loads
//! the model as the MLflow Model Shoal writes (the ONNX file through onnxruntime); Shoal loads
//! the ONNX file into tract. Both are started by this program on 127.0.0.1 and stopped at the
//! end. The client shares the machine with the server under test.

// The report on stdout is this program's output.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use shoal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_proto::inference::model_infer_request::InferInputTensor;
use shoal_proto::inference::{InferTensorContents, ModelInferRequest};

#[derive(Parser)]
struct Args {
    /// Sequential requests per protocol for the latency figures.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent clients for the throughput figures.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// How long each throughput run lasts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// The mlserver executable [default: on PATH].
    #[arg(long)]
    mlserver: Option<PathBuf>,
}

const NAME: &str = "shoal-anomaly";
const FEATURES: [f64; 7] = [37.5, 1.2, 0.9, 1500.0, 0.0, 0.0, 120.0];
const OBSERVED: f64 = 52.0;

struct Server {
    label: &'static str,
    child: Child,
    http: String,
    grpc: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let model = shoal_e2e::bench_model();
    let out = dir.join("model");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("model.onnx"), shoal_ml::onnx::export(&model, &[]))?;
    for (file, text) in shoal_ml::mlmodel::files(&model.target, &model.features, "") {
        std::fs::write(out.join(file), text)?;
    }
    Ok(out)
}

fn port() -> u16 {
    shoal_e2e::free_port()
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(120) {
        if shoal_e2e::http_get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{url} did not answer within 120 s")
}

async fn start_shoal(model: &Path) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?.with_file_name("shoal-ml");
    let (h, g) = (port(), port());
    let child = Command::new(&exe)
        .args(["serve", "--model"])
        .arg(format!("{NAME}:1={}", model.display()))
        .args(["--http-listen", &format!("127.0.0.1:{h}")])
        .args(["--grpc-listen", &format!("127.0.0.1:{g}")])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("{} (cargo build --release --bins)", exe.display()))?;
    let s = Server {
        label: "shoal-ml",
        child,
        http: format!("http://127.0.0.1:{h}"),
        grpc: format!("http://127.0.0.1:{g}"),
    };
    wait_ready(&format!("{}/v2/models/{NAME}/ready", s.http)).await?;
    Ok(s)
}

async fn start_mlserver(bin: &Path, dir: &Path, model: &Path) -> anyhow::Result<Server> {
    let root = dir.join("mlserver");
    std::fs::create_dir_all(root.join(NAME))?;
    let (h, g) = (port(), port());
    // Inference in the server process: MLServer 1.7's worker pool does not start with the
    // uvloop that installs beside it (the default would add a process hop per request).
    std::fs::write(
        root.join("settings.json"),
        json!({ "host": "127.0.0.1", "http_port": h, "grpc_port": g, "metrics_port": port(),
                "parallel_workers": 0 })
        .to_string(),
    )?;
    std::fs::write(
        root.join(NAME).join("model-settings.json"),
        json!({ "name": NAME, "implementation": "mlserver_mlflow.MLflowRuntime",
                "parameters": { "uri": model, "version": "1" } })
        .to_string(),
    )?;
    let child = Command::new(bin)
        .arg("start")
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{} (pip install mlserver mlserver-mlflow)", bin.display()))?;
    let s = Server {
        label: "mlserver",
        child,
        http: format!("http://127.0.0.1:{h}"),
        grpc: format!("http://127.0.0.1:{g}"),
    };
    wait_ready(&format!("{}/v2/models/{NAME}/versions/1/ready", s.http)).await?;
    Ok(s)
}

fn rest_body() -> Value {
    json!({ "inputs": [
        { "name": "features", "shape": [1, FEATURES.len()], "datatype": "FP64", "data": FEATURES },
        { "name": "observed", "shape": [1, 1], "datatype": "FP64", "data": [OBSERVED] },
    ]})
}

fn grpc_request() -> ModelInferRequest {
    let tensor = |name: &str, shape: Vec<i64>, v: Vec<f64>| InferInputTensor {
        name: name.into(),
        datatype: "FP64".into(),
        shape,
        parameters: Default::default(),
        contents: Some(InferTensorContents {
            fp64_contents: v,
            ..Default::default()
        }),
    };
    ModelInferRequest {
        model_name: NAME.into(),
        model_version: "1".into(),
        inputs: vec![
            tensor(
                "features",
                vec![1, FEATURES.len() as i64],
                FEATURES.to_vec(),
            ),
            tensor("observed", vec![1, 1], vec![OBSERVED]),
        ],
        ..Default::default()
    }
}

/// One REST inference; its score.
async fn rest_once(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<f64> {
    let v: Value = client.post(url).json(body).send().await?.json().await?;
    let out = v["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|t| t["name"] == "score"))
        .with_context(|| format!("no score in {v}"))?;
    out["data"][0].as_f64().context("score")
}

async fn grpc_once(
    client: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
) -> anyhow::Result<()> {
    let r = client.model_infer(grpc_request()).await?.into_inner();
    if r.outputs.len() != 2 {
        bail!("{} outputs", r.outputs.len());
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// (p50 ms, p99 ms) over REST and gRPC, one request at a time.
async fn latency(s: &Server, n: usize) -> anyhow::Result<[(f64, f64); 2]> {
    let client = reqwest::Client::new();
    let url = format!("{}/v2/models/{NAME}/versions/1/infer", s.http);
    let body = rest_body();
    let mut grpc = GrpcInferenceServiceClient::connect(s.grpc.clone()).await?;
    for _ in 0..50 {
        rest_once(&client, &url, &body).await?;
        grpc_once(&mut grpc).await?;
    }
    let mut rest = Vec::with_capacity(n);
    let mut g = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        rest_once(&client, &url, &body).await?;
        rest.push(t.elapsed());
        let t = Instant::now();
        grpc_once(&mut grpc).await?;
        g.push(t.elapsed());
    }
    rest.sort();
    g.sort();
    Ok([
        (percentile(&rest, 0.5), percentile(&rest, 0.99)),
        (percentile(&g, 0.5), percentile(&g, 0.99)),
    ])
}

/// Requests/s with `clients` at once, over REST (`grpc` false) or gRPC.
async fn throughput(s: &Server, clients: usize, d: Duration, grpc: bool) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (done, stop) = (done.clone(), stop.clone());
        let url = format!("{}/v2/models/{NAME}/versions/1/infer", s.http);
        let grpc_url = s.grpc.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body = rest_body();
            let mut g = if grpc {
                Some(GrpcInferenceServiceClient::connect(grpc_url).await?)
            } else {
                None
            };
            while !stop.load(Ordering::Relaxed) {
                match &mut g {
                    Some(g) => grpc_once(g).await?,
                    None => {
                        rest_once(&client, &url, &body).await?;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    // A second of warm-up, then the measured window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = done.load(Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(d).await;
    let count = done.load(Ordering::Relaxed) - before;
    let secs = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(count as f64 / secs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mlserver = args
        .mlserver
        .clone()
        .or_else(|| shoal_e2e::which("mlserver"))
        .context("mlserver is not on PATH (pip install mlserver mlserver-mlflow)")?;
    let tmp = tempfile::tempdir()?;
    let model = model_dir(tmp.path())?;
    let servers = [
        start_shoal(&model).await?,
        start_mlserver(&mlserver, tmp.path(), &model).await?,
    ];
    // The same answer from both, or the comparison means nothing.
    let client = reqwest::Client::new();
    let mut scores = Vec::new();
    for s in &servers {
        let url = format!("{}/v2/models/{NAME}/versions/1/infer", s.http);
        scores.push(rest_once(&client, &url, &rest_body()).await?);
    }
    if (scores[0] - scores[1]).abs() > 1e-9 {
        bail!("the servers disagree: {scores:?}");
    }
    println!(
        "one row, {} sequential requests per protocol; {} clients for {}",
        args.requests,
        args.clients,
        humantime::format_duration(args.duration)
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "server", "REST p50", "REST p99", "gRPC p50", "gRPC p99", "REST req/s", "gRPC req/s"
    );
    let mut rates = Vec::new();
    for s in &servers {
        let [rest, grpc] = latency(s, args.requests).await?;
        let rest_rate = throughput(s, args.clients, args.duration, false).await?;
        let grpc_rate = throughput(s, args.clients, args.duration, true).await?;
        println!(
            "{:<10} {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>12.0} {:>12.0}",
            s.label, rest.0, rest.1, grpc.0, grpc.1, rest_rate, grpc_rate
        );
        rates.push((rest_rate, grpc_rate));
    }
    println!(
        "throughput shoal-ml / mlserver: REST {:.1}x, gRPC {:.1}x",
        rates[0].0 / rates[1].0,
        rates[0].1 / rates[1].1
    );
    Ok(())
}
