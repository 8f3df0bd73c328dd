//! `shoal-ml-bench`: the telemetry-to-model path at scale. Fills a fresh `shoal serve` with
//! N samples (Raspberry Pi-like: CPU, load, SoC temperature, clock) from D devices over gRPC,
//! exports them with `shoal datasets export`, trains with `shoal-ml train`, and prints rows/s
//! and peak memory of each step.
//!
//!   cargo build --release --bins
//!   target/release/shoal-ml-bench --samples 10000000 --devices 10
//!
//! Peak memory: the hub's resident memory is sampled every 50 ms during the export (its peak
//! over the export, and the growth over what it used before); shoal-ml reports its own
//! high-water mark (VmHWM).

// The report on stdout is this program's output.
#![allow(clippy::print_stdout)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::Parser;
use shoal_e2e::{ingest, pi_sample, spawn_hub};

#[derive(Parser)]
struct Args {
    /// Samples in all.
    #[arg(long, default_value_t = 10_000_000)]
    samples: u64,
    #[arg(long, default_value_t = 10)]
    devices: u64,
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let exe = std::env::current_exe()?;
    let shoal = exe.with_file_name("shoal");
    let shoal_ml = exe.with_file_name("shoal-ml");
    for b in [&shoal, &shoal_ml] {
        if !b.exists() {
            bail!(
                "{} is missing: run `cargo build --release --bins` first",
                b.display()
            );
        }
    }
    let dir = tempfile::tempdir()?;
    let (mut hub, grpc, http, token) = spawn_hub(&shoal, &dir.path().join("hub"))?;
    let hub_pid = hub.id();

    // Timestamps end now, so "--since" covers them all.
    let per_device = args.samples / args.devices;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let start_ms = now_ms - per_device as i64 * 10 - 60_000;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..args.devices {
        let grpc = grpc.clone();
        tasks.push(tokio::spawn(async move {
            ingest(&grpc, &format!("bench-pi-{d:03}"), per_device, move |seq| {
                pi_sample(seq, start_ms, 10, 0.0)
            })
            .await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let total = per_device * args.devices;
    let fill_s = t.elapsed().as_secs_f64();
    println!(
        "filled the hub: {total} samples from {} devices in {fill_s:.1} s ({:.0} samples/s)",
        args.devices,
        total as f64 / fill_s
    );

    // Export, sampling the hub's memory meanwhile.
    let before = rss_bytes(hub_pid);
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(hub_pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let dataset = dir.path().join("dataset");
    let t = Instant::now();
    let out = Command::new(&shoal)
        .args([
            "--hub", &http, "-o", "json", "datasets", "export", "--since", "30d", "--to",
        ])
        .arg(&dataset)
        .env("SHOAL_TOKEN", &token)
        .output()?;
    let export_s = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    if !out.status.success() {
        bail!("export failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rows = manifest["rows"].as_u64().unwrap_or(0);
    let bytes: u64 = manifest["files"]
        .as_array()
        .map(|f| f.iter().filter_map(|f| f["bytes"].as_u64()).sum())
        .unwrap_or(0);
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "export: {rows} rows in {export_s:.1} s = {:.0} rows/s; {} files, {:.1} MiB of Parquet; hub RSS {:.1} MiB before, peak {:.1} MiB during (+{:.1} MiB)",
        rows as f64 / export_s,
        manifest["files"].as_array().map_or(0, Vec::len),
        mib(bytes),
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
    );
    let _ = hub.kill();
    let _ = hub.wait();

    // Train (one thread: shoal-ml decodes and fits on its only runtime thread).
    let model = dir.path().join("model");
    let t = Instant::now();
    let status = Command::new(&shoal_ml)
        .args(["train", "--quiet", "--dataset"])
        .arg(&dataset)
        .arg("--out")
        .arg(&model)
        .env_remove("MLFLOW_TRACKING_URI")
        .stdout(Stdio::null())
        .status()?;
    let train_s = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("training failed ({status})");
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("metrics.json"))?)?;
    println!(
        "train: {rows} rows in {train_s:.1} s wall ({:.0} rows/s, process included); in-loop {:.0} rows/s on one core; peak RSS {:.1} MiB; holdout RMSE {:.3} °C, R² {:.4}",
        rows as f64 / train_s,
        metrics["rows_per_second"].as_f64().unwrap_or(0.0),
        mib(metrics["peak_rss_bytes"].as_u64().unwrap_or(0)),
        metrics["report"]["holdout"]["rmse"].as_f64().unwrap_or(0.0),
        metrics["report"]["holdout"]["r2"].as_f64().unwrap_or(0.0),
    );
    Ok(())
}
