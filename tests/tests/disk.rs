//! A hub on a small filesystem that fills up during ingest, and recovers when space is freed,
//! without a restart: real agents, a real tmpfs of a few megabytes.
//!
//! - Under the watermark (`--min-free-space`) the hub refuses batches with "store full" before the
//!   disk is full: not ready, counted in `/metrics`, nothing acknowledged.
//! - With the watermark off the disk really fills and a commit fails with ENOSPC: the store is
//!   latched by redb until reopened, which the hub does by itself once writing works again.
//!
//! In both, once space is freed every sample the agents spooled arrives: no gaps, no duplicates.
//! Mounting the tmpfs needs root (CI runs as root); without it the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_e2e::*;

/// A tmpfs of `size` mounted on `dir`, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this suite mounts a {size} tmpfs to fill a disk for real and needs root for it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }

    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Writes a filler file until only `leave` bytes are free (0: until the filesystem says
    /// ENOSPC).
    fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xA5u8; 64 * 1024];
        loop {
            let free = self.free();
            if free <= leave {
                break;
            }
            let n = ((free - leave) as usize).min(chunk.len());
            if f.write_all(&chunk[..n]).and_then(|_| f.flush()).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn readiness(hub: &Hub) -> (u16, serde_json::Value) {
    let resp = http_client()
        .get(format!("{}/readyz", hub.http_url()))
        .send()
        .await
        .expect("readyz");
    let code = resp.status().as_u16();
    (code, resp.json().await.expect("readyz JSON"))
}

/// Samples stored so far, from `/metrics` (which, unlike the audited API, needs no disk).
async fn total_stored(hub: &Hub) -> u64 {
    hub.metric("shoal_ingest_samples_accepted_total").await as u64
}

/// Runs `agents` agents of `count` samples at 20 ms into a hub on a small tmpfs, fills the disk
/// (to `leave` bytes free) while they send, checks the refusal with `expect`, frees the space,
/// and checks that every sample arrives exactly once.
async fn fill_and_free(min_free: &str, leave: u64, expect: &str, refusal_metric: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&dir.path().join("small"), "48m");
    let data = dir.path().join("small/hub");
    let hub = Hub::start_on(
        &data,
        free_port(),
        free_port(),
        &["--min-free-space", min_free],
    )
    .await;
    assert_eq!(readiness(&hub).await.0, 200);

    let count = 1_200u64;
    let devices: Vec<String> = (0..4).map(|i| format!("disk-{i}")).collect();
    let mut agents: Vec<Proc> = devices
        .iter()
        .map(|d| {
            // Spools on the big disk: the agents keep everything the hub cannot take.
            agent(
                &hub.grpc_url(),
                d,
                &dir.path().join(format!("spool-{d}")),
                "20ms",
                Some(count),
            )
        })
        .collect();
    wait_until("ingest under way", Duration::from_secs(30), || async {
        total_stored(&hub).await > 200
    })
    .await;

    let filler = fs.fill(leave);
    let mut body = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let (code, b) = readiness(&hub).await;
        if code == 503 {
            body = b;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reason = body["error"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains(expect),
        "readyz says why: {body} (want {expect:?})"
    );
    assert_eq!(
        reqwest::get(format!("{}/healthz", hub.http_url()))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200,
        "alive all the same"
    );
    assert!(hub.metric(refusal_metric).await > 0.0, "{refusal_metric}");
    let held = total_stored(&hub).await;
    if min_free != "0" {
        // Under the watermark the store stays refused and nothing more is stored (or
        // acknowledged). On a really full disk the store is reopened each second and a small
        // commit (a reconnecting agent's hello) may fit in pages its file has free, so it may
        // read as writable again in between: what counts there is that nothing is acknowledged
        // unstored, which the check for gaps below shows.
        assert_eq!(hub.metric("shoal_store_writable").await, 0.0);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    if min_free != "0" {
        assert_eq!(total_stored(&hub).await, held, "stored while full");
    }

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let at_free = total_stored(&hub).await;
    wait_until("the hub ready again", Duration::from_secs(15), || async {
        readiness(&hub).await.0 == 200
    })
    .await;
    wait_until("ingest to resume", Duration::from_secs(15), || async {
        total_stored(&hub).await > at_free
    })
    .await;
    let resumed = freed.elapsed();
    assert!(
        resumed < Duration::from_secs(5),
        "agents came back {resumed:?} after space was freed"
    );
    assert_eq!(hub.metric("shoal_store_writable").await, 1.0);

    for a in &mut agents {
        assert!(
            a.wait(Duration::from_secs(90)).await.success(),
            "the agent drained its spool"
        );
    }
    for d in &devices {
        let seqs = hub.stored_seqs(d).await;
        assert_eq!(
            seqs,
            (1..=count).collect::<Vec<_>>(),
            "{d}: every sample once, no gaps"
        );
    }
    eprintln!("{expect}: ingest resumed {resumed:?} after space was freed");
}

#[tokio::test(flavor = "multi_thread")]
async fn under_the_watermark_the_hub_refuses_with_store_full_and_resumes_when_space_is_freed() {
    fill_and_free(
        "8MB",
        4_000_000,
        "store full",
        "shoal_store_refused_commits_total{reason=\"full\"}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_failing_with_enospc_does_not_latch_the_store() {
    fill_and_free(
        "0",
        0,
        "last commit failed",
        "shoal_store_commit_failures_total",
    )
    .await;
}
