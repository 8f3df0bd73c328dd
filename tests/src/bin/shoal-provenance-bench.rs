//! `shoal-provenance-bench`: what provenance costs.
//!
//! 1. Signing and recording: per model, the statement over its files, the P-256 signature and
//!    the hub's ledger append (`POST /api/v1/provenance`), p50/p99 over `--appends` models.
//! 2. Anchoring on a local chain (anvil, from npm `@foundry-rs/anvil`): `--statements`
//!    statements recorded as fast as one client can, timed until every one is anchored and
//!    confirmed; statements per second, transactions, and gas per transaction and per
//!    statement (batched, against the gas of one anchor per statement).
//! 3. Verifying a `--model-mb` MB model: `shoal models verify` against OpenSSF's
//!    `model_signing verify key` (PyPI `model-signing`) on the same folder, same run, and
//!    `sha256sum` of the model file for scale.
//!
//!   cargo build --release -p shoal-hub -p shoal-e2e --bin shoal --bin shoal-provenance-bench
//!   target/release/shoal-provenance-bench --appends 200 --statements 500 --model-mb 100
//!
//! anvil, model_signing and sha256sum are found on PATH (tests/run installs the first two under
//! its cache folder). Everything runs on 127.0.0.1 and is stopped at the end.

// The report on stdout is this program's output.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::Value;
use shoal_ml::provenance::{Build, ENVELOPE_FILE, SigningKey, statement};

#[derive(Parser)]
struct Args {
    /// Models signed and recorded one after another.
    #[arg(long, default_value_t = 200)]
    appends: usize,
    /// Statements recorded for the anchoring run.
    #[arg(long, default_value_t = 500)]
    statements: usize,
    /// Size of the model verified, in MB.
    #[arg(long, default_value_t = 100)]
    model_mb: usize,
    /// Runs of each verifier (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build() -> Build<'static> {
    Build {
        dataset_uri: "file:///datasets/bench",
        dataset_sha256: "0000000000000000000000000000000000000000000000000000000000000000",
        arguments: vec!["train".into()],
        builder: "shoal-provenance-bench".into(),
        run_id: None,
        mlflow_run_id: None,
        started: "2026-11-30T00:00:00Z".into(),
        finished: "2026-11-30T00:00:01Z".into(),
    }
}

/// A folder with a small model file (its bytes from `n`) and its signed envelope.
fn envelope_for(dir: &Path, key: &SigningKey, n: usize) -> anyhow::Result<Value> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("model.onnx"), format!("model {n}").repeat(64))?;
    Ok(key.sign(&statement(dir, &build())?)?)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median_of<F: FnMut() -> anyhow::Result<()>>(runs: usize, mut f: F) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(quantile(&times, 0.5))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shoal = std::env::current_exe()?.with_file_name("shoal");
    let work = tempfile::tempdir()?;
    let (key, private, public) = SigningKey::generate()?;
    let (key_file, pub_file) = (
        work.path().join("signing.key"),
        work.path().join("signing.pub"),
    );
    std::fs::write(&key_file, private)?;
    std::fs::write(&pub_file, public)?;
    let http = shoal_e2e::http_client();

    // 1. Sign and record, one model at a time.
    let (hub, _, url, token) = shoal_e2e::spawn_hub_with(
        &shoal,
        &work.path().join("hub-ledger"),
        &["--provenance-key", pub_file.to_str().context("path")?],
    )?;
    let _hub = Killed(hub);
    let (mut total, mut signing, mut appending) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..args.appends {
        let t0 = Instant::now();
        let envelope = envelope_for(&work.path().join("m").join(n.to_string()), &key, n)?;
        let t1 = Instant::now();
        let r = http
            .post(format!("{url}/api/v1/provenance"))
            .bearer_auth(&token)
            .json(&envelope)
            .send()
            .await?;
        if r.status() != reqwest::StatusCode::CREATED {
            bail!("append {n}: {}", r.text().await?);
        }
        let t2 = Instant::now();
        signing.push((t1 - t0).as_secs_f64() * 1e3);
        appending.push((t2 - t1).as_secs_f64() * 1e3);
        total.push((t2 - t0).as_secs_f64() * 1e3);
    }
    for v in [&mut total, &mut signing, &mut appending] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "## Signing and recording ({} models, one at a time)",
        args.appends
    );
    println!("{:<40} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "max ms");
    for (label, v) in [
        ("statement + signature (in process)", &signing),
        ("ledger append (POST, round trip)", &appending),
        ("both", &total),
    ] {
        println!(
            "{label:<40} {:>8.2} {:>8.2} {:>8.2}",
            quantile(v, 0.5),
            quantile(v, 0.99),
            v[v.len() - 1]
        );
    }
    drop(_hub);

    // 2. Anchoring on anvil.
    let anvil = shoal_e2e::Anvil::start(&work.path().join("anvil"), 31337).await;
    let chain_key = work.path().join("chain.key");
    std::fs::write(&chain_key, shoal_e2e::ANVIL_KEY)?;
    let anvil_url = anvil.url();
    let (hub, _, url, token) = shoal_e2e::spawn_hub_with(
        &shoal,
        &work.path().join("hub-chain"),
        &[
            "--provenance-key",
            pub_file.to_str().context("path")?,
            "--chain-rpc",
            &anvil_url,
            "--chain-id",
            "31337",
            "--chain-key-file",
            chain_key.to_str().context("path")?,
            "--chain-confirmations",
            "1",
        ],
    )?;
    let _hub = Killed(hub);
    let envelopes = (0..args.statements)
        .map(|n| envelope_for(&work.path().join("a").join(n.to_string()), &key, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The contract is deployed at the hub's first round: wait for it before timing.
    let ledger = || async {
        http.get(format!("{url}/api/v1/provenance"))
            .bearer_auth(&token)
            .send()
            .await?
            .json::<Value>()
            .await
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger().await?["anchoring"]["contract"].is_null() {
        anyhow::ensure!(Instant::now() < deadline, "the hub deployed no contract");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    for e in &envelopes {
        http.post(format!("{url}/api/v1/provenance"))
            .bearer_auth(&token)
            .json(e)
            .send()
            .await?
            .error_for_status()?;
    }
    let recorded = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let l = ledger().await?;
        let entries = l["entries"].as_array().cloned().unwrap_or_default();
        if entries.len() == args.statements
            && entries.iter().all(|e| e["anchor"]["state"] == "anchored")
        {
            break l;
        }
        anyhow::ensure!(Instant::now() < deadline, "not anchored within 600 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let anchored = started.elapsed();
    let mut txs = std::collections::BTreeMap::new();
    for e in done["entries"].as_array().context("entries")? {
        let a = &e["anchor"]["anchor"];
        txs.insert(
            a["tx_hash"].as_str().unwrap_or_default().to_string(),
            a["gas_used"].as_u64().unwrap_or_default(),
        );
    }
    let gas: u64 = txs.values().sum();
    println!();
    println!(
        "## Anchoring on anvil (a block a second, 1 confirmation, {} statements)",
        args.statements
    );
    println!(
        "recorded in {:.2} s; all anchored and confirmed after {:.2} s: {:.1} statements/s",
        recorded.as_secs_f64(),
        anchored.as_secs_f64(),
        args.statements as f64 / anchored.as_secs_f64()
    );
    println!(
        "{} transactions; gas {} per transaction, {:.0} per statement (a transaction per statement would cost {} each)",
        txs.len(),
        gas / txs.len().max(1) as u64,
        gas as f64 / args.statements as f64,
        gas / txs.len().max(1) as u64
    );
    drop(_hub);
    drop(anvil);

    // 3. Verifying a large model.
    let folder = work.path().join("large");
    std::fs::create_dir_all(&folder)?;
    let mut bytes = vec![0u8; args.model_mb << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(folder.join("model.onnx"), &bytes)?;
    drop(bytes);
    let envelope = key.sign(&statement(&folder, &build())?)?;
    std::fs::write(folder.join(ENVELOPE_FILE), serde_json::to_vec(&envelope)?)?;
    shoal_ml::model_signing::sign_dir(&key, &folder)?;
    let run = |cmd: &mut Command| -> anyhow::Result<()> {
        let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let shoal_verify = median_of(args.runs, || {
        run(Command::new(&shoal)
            .args(["models", "verify"])
            .arg(&folder)
            .arg("--public-key")
            .arg(&pub_file))
    })?;
    let model_signing = which("model_signing")?;
    let peer = median_of(args.runs, || {
        run(Command::new(&model_signing)
            .args(["verify", "key", "--signature"])
            .arg(folder.join("model.sig"))
            .arg("--public_key")
            .arg(&pub_file)
            .arg(&folder))
    })?;
    let floor = median_of(args.runs, || {
        run(Command::new("sha256sum").arg(folder.join("model.onnx")))
    })?;
    println!();
    println!(
        "## Verifying a {} MB model (median of {} runs, whole process)",
        args.model_mb, args.runs
    );
    println!("shoal models verify           {shoal_verify:>7.3} s");
    println!(
        "model_signing verify key      {peer:>7.3} s  ({:.1}x shoal's time)",
        peer / shoal_verify
    );
    println!("sha256sum of the model file   {floor:>7.3} s  (coreutils, for scale)");
    Ok(())
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    shoal_e2e::which(name).with_context(|| format!("{name} is not on PATH (tests/run installs it)"))
}
