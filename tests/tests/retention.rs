//! Retention on a real hub: samples older than `--retention` go, what is younger stays, each
//! device's newest sample stays, and a hub SIGKILLed in the middle of retention passes loses
//! nothing it should have kept. `shoal store status` and `GET /api/v1/store` say what it did.

use std::time::Duration;

use shoal_e2e::*;

const DEVICES: u64 = 6;
const PER_DEVICE: u64 = 30_000;
const STEP_MS: i64 = 240;

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_what_is_old_and_a_crash_mid_pass_loses_nothing_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Two hours of samples per device, 0.24 s apart, the newest a minute ago.
    let start = now - 60_000 - PER_DEVICE as i64 * STEP_MS;
    {
        let hub = Hub::start(&data).await;
        for d in 0..DEVICES {
            ingest(&hub.grpc_url(), &format!("r-{d}"), PER_DEVICE, move |seq| {
                pi_sample(seq, start, STEP_MS, 0.0)
            })
            .await
            .unwrap();
        }
        // A device silent for longer than the retention.
        ingest(&hub.grpc_url(), "r-silent", 3, move |seq| {
            pi_sample(seq, start - 3_600_000, 1_000, 0.0)
        })
        .await
        .unwrap();
        let status = hub.get("/api/v1/store").await;
        assert_eq!(
            status["samples"].as_u64(),
            Some(DEVICES * PER_DEVICE + 3),
            "{status}"
        );
        assert!(status["retention"]["max_age_seconds"].is_null());
    }

    // Keep one hour. Kill the hub again and again in its first pass (its work goes on from
    // where the last one stopped), counting what the store holds after each kill, until a kill has
    // landed while samples were being deleted.
    let keep = Duration::from_secs(3600);
    let total = DEVICES * PER_DEVICE + 3;
    let about_kept = DEVICES * (keep.as_millis() as u64 / STEP_MS as u64);
    let mut seen = Vec::new();
    for i in 0..40u64 {
        let mut cmd = std::process::Command::new(bin("shoal"));
        cmd.args(["serve", "--device-auth", "none", "--retention", "1h"])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::null());
        let mut proc = Proc::spawn("shoal serve", cmd);
        // Longer each time, until one run outlasts the start and a transaction of the pass.
        tokio::time::sleep(Duration::from_millis(300 + 100 * i)).await;
        proc.kill9();
        let store = shoal_hub::store::Store::open(&data).expect("the store opens after a kill");
        let n = store.sample_totals().unwrap().1;
        seen.push(n);
        if n < total && n > about_kept + 5_000 {
            break;
        }
    }
    let hub = Hub::start_on(&data, free_port(), free_port(), &["--retention", "1h"]).await;
    wait_until("retention to finish", Duration::from_secs(60), || async {
        hub.get("/api/v1/store").await["retention_status"]["last_pass_ms"].is_i64()
    })
    .await;
    let done = hub.get("/api/v1/store").await["samples"].as_u64().unwrap();
    assert!(
        seen.iter().any(|n| *n > done + 1_000 && *n < total),
        "a kill landed while a pass was deleting: {seen:?}, {done} at the end"
    );

    // What must stay, by the samples' own timestamps: the cut moves on with the clock (a pass
    // every 10 s), so each device is checked against the cut as of reading it.
    let cut = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            - keep.as_millis() as i64
    };
    for d in 0..DEVICES {
        let before = cut();
        let seqs = hub.stored_seqs(&format!("r-{d}")).await;
        let after = cut();
        let first = seqs[0];
        let first_ts = start + first as i64 * STEP_MS;
        assert!(
            first_ts <= after + STEP_MS,
            "r-{d}: a sample {} s younger than the cut was deleted",
            (first_ts - after) / 1000
        );
        assert!(
            first_ts >= before - 120_000,
            "r-{d}: a sample {} s older than the cut is still there",
            (before - first_ts) / 1000
        );
        assert_eq!(
            seqs,
            (first..=PER_DEVICE).collect::<Vec<_>>(),
            "r-{d}: everything younger kept, no holes"
        );
    }
    // A silent device keeps its newest sample, and nothing older than that sample's minute
    // (which stays until it is rolled up).
    let silent = hub.stored_seqs("r-silent").await;
    assert_eq!(
        silent.last(),
        Some(&3),
        "a silent device keeps its newest sample"
    );
    let minute = |seq: u64| (start - 3_600_000 + seq as i64 * 1_000).div_euclid(60_000);
    assert!(
        silent.iter().all(|s| minute(*s) == minute(3)),
        "only the newest sample's minute is left of a silent device: {silent:?}"
    );

    let status = hub.get("/api/v1/store").await;
    assert_eq!(status["retention"]["max_age_seconds"], 3600);
    assert!(status["file_bytes"].as_u64().unwrap() > 0);
    assert!(
        status["retention_status"]["held_back_by"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let (ok, out, err) = shoal_cli(&hub, &["store", "status"]);
    assert!(ok, "{err}");
    for want in [
        "samples younger than 1h",
        "oldest sample",
        "held back by   nothing",
        "writes         taken",
    ] {
        assert!(
            out.contains(want),
            "`shoal store status` says {want:?}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_settings_are_checked_and_read_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, says) in [
        ("--retention", "30s", "at least 1m"),
        ("--retention", "a while", "retention"),
        ("--retention-size", "12 parsecs", "unknown unit"),
        ("--retention-size", "100kB", "at least 1MB"),
        ("--min-free-space", "lots", "not a size"),
    ] {
        let out = run_bin(
            "shoal",
            &[
                "serve",
                "--data-dir",
                dir.path().join("bad").to_str().unwrap(),
                "--http-listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
                flag,
                value,
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} refused");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
        assert!(
            !dir.path().join("bad/shoal.redb").exists(),
            "a refused setting changes nothing"
        );
    }
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "retention = \"30d\"\nretention-size = \"2GB\"\nmin-free-space = \"1GB\"\n",
    )
    .unwrap();
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let status = hub.get("/api/v1/store").await;
    assert_eq!(status["retention"]["max_age_seconds"], 30 * 86_400);
    assert_eq!(status["retention"]["max_size_bytes"], 2_000_000_000u64);
    assert_eq!(status["min_free_bytes"], 1_000_000_000u64);
}
