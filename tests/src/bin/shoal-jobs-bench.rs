//! `shoal-jobs-bench`: N jobs on a minute schedule against a fresh `shoal serve`; prints how
//! late their runs started (p50/p99/max) and the hub's CPU while it scheduled them.
//!
//!   cargo build --release --bins
//!   target/release/shoal-jobs-bench --jobs 1000 --minutes 2
//!
//! Lateness is measured twice: when the scheduler recorded the start (`started_ms` of the run)
//! and when the job's own process ran (it prints `date +%s%3N`), both against the schedule time.

// The report on stdout is this program's output.
#![allow(clippy::print_stdout)]

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Whole minutes of schedule to measure.
    #[arg(long, default_value_t = 2)]
    minutes: u64,
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shoal = std::env::current_exe()?.with_file_name("shoal");
    if !shoal.exists() {
        bail!(
            "{} is missing: run `cargo build --release --bins` first",
            shoal.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (mut hub, _grpc, http, token) = shoal_e2e::spawn_hub(&shoal, dir.path())?;
    let client = shoal_e2e::authed_client(&token);
    for i in 0..args.jobs {
        let manifest = format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: bench-{i:05}\nspec:\n  schedule: \"* * * * *\"\n  successfulJobsHistoryLimit: {keep}\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: c\n              command: [\"date\", \"+%s%3N\"]\n",
            keep = args.minutes + 1
        );
        let r = client
            .post(format!("{http}/api/v1/jobs"))
            .header("content-type", "application/yaml")
            .body(manifest)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("apply failed: {}", r.text().await?);
        }
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let next_minute = (now_ms / 60_000 + 1) * 60_000;
    let end = next_minute + (args.minutes - 1) * 60_000 + 20_000;
    eprintln!(
        "shoal-jobs-bench: {} jobs applied; measuring {} schedule minute(s)",
        args.jobs, args.minutes
    );
    tokio::time::sleep(
        Duration::from_millis(next_minute - now_ms).saturating_sub(Duration::from_millis(2000)),
    )
    .await;
    let hz = 100.0;
    let t0 = cpu_ticks(hub.id())?;
    let w0 = std::time::Instant::now();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(end.saturating_sub(now_ms))).await;
    let cpu = (cpu_ticks(hub.id())? - t0) as f64 / hz / w0.elapsed().as_secs_f64() * 100.0;

    let runs: serde_json::Value = client
        .get(format!("{http}/api/v1/runs"))
        .send()
        .await?
        .json()
        .await?;
    let runs = runs["runs"].as_array().context("runs")?;
    let mut recorded = Vec::new();
    let mut process = Vec::new();
    for r in runs.iter().filter(|r| r["manual"] == false) {
        let scheduled = r["scheduled_ms"].as_i64().unwrap_or(0);
        if let Some(started) = r["started_ms"].as_i64() {
            recorded.push(started - scheduled);
        }
        let log = dir
            .path()
            .join("runs")
            .join(r["id"].as_str().unwrap_or_default())
            .join("attempt-1.log");
        if let Some(ran) = std::fs::read_to_string(log)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
        {
            process.push(ran - scheduled);
        }
    }
    recorded.sort_unstable();
    process.sort_unstable();
    let expected = args.jobs as u64 * args.minutes;
    println!("jobs                      {}", args.jobs);
    println!(
        "runs started              {} (expected {expected})",
        recorded.len()
    );
    println!(
        "lateness, recorded start  p50 {} ms  p99 {} ms  max {} ms",
        percentile(&recorded, 0.5),
        percentile(&recorded, 0.99),
        percentile(&recorded, 1.0)
    );
    println!(
        "lateness, process ran     p50 {} ms  p99 {} ms  max {} ms",
        percentile(&process, 0.5),
        percentile(&process, 0.99),
        percentile(&process, 1.0)
    );
    println!(
        "hub CPU while scheduling  {cpu:.1} % of one core (processes it started not included)"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(hub.id().to_string())
        .status();
    let _ = hub.wait();
    Ok(())
}
