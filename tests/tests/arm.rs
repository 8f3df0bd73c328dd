//! The aarch64 agent (built by `cross/build`) under qemu-aarch64 reports to an x86-64 hub.

use std::process::Command;
use std::time::Duration;

use shoal_e2e::{Hub, Proc, aarch64_agent, which};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu_enrolls_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub")).await;
    let qemu = which("qemu-aarch64")
        .expect("qemu-aarch64 is not installed (tests/run installs qemu-user)");
    let mut cmd = Command::new(qemu);
    cmd.args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(aarch64_agent())
        .args([
            "run",
            "--hub",
            &hub.grpc_url(),
            "--device-id",
            "arm64-qemu",
            "--interval",
            "100ms",
            "--count",
            "20",
        ])
        .arg("--spool-dir")
        .arg(dir.path().join("spool"));
    let mut agent = Proc::spawn("shoal-agent (aarch64, qemu)", cmd);
    assert!(agent.wait(Duration::from_secs(120)).await.success());
    assert_eq!(
        hub.stored_seqs("arm64-qemu").await,
        (1..=20).collect::<Vec<_>>()
    );
    let device = hub.get("/api/v1/devices/arm64-qemu").await;
    assert_eq!(device["arch"], "aarch64", "{device}");
    assert_eq!(device["status"], "online");
}
