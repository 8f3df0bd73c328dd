//! The ARM agents (built by `cross/build`) under qemu-user report to an x86-64 hub: aarch64
//! (64-bit boards) under qemu-aarch64 and armv7 (32-bit Raspberry Pi OS) under qemu-arm.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shoal_e2e::{Hub, Proc, aarch64_agent, which};

/// The armv7 agent that `cross/build armv7-unknown-linux-gnueabihf` made (tests/run builds it
/// first), under the same target directory as the test executable. Missing fails the test.
fn armv7_agent() -> PathBuf {
    // TARGET/debug/deps/TEST → TARGET, as `aarch64_agent` does.
    let exe = std::env::current_exe().expect("current exe");
    let target_dir = exe.ancestors().nth(3).expect("target directory");
    let path = target_dir.join("cross/armv7-unknown-linux-gnueabihf/release-agent/shoal-agent");
    assert!(
        path.exists(),
        "{} is missing: run `cross/build armv7-unknown-linux-gnueabihf` (tests/run does)",
        path.display()
    );
    path
}

/// Runs `agent` under `qemu -L sysroot` against a fresh hub; it must enroll as `device_id`
/// with `arch` and deliver 20 samples, each exactly once.
async fn agent_under_qemu_enrolls_and_reports(
    qemu: &str,
    sysroot: &str,
    agent: &Path,
    device_id: &str,
    arch: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub")).await;
    let qemu = which(qemu)
        .unwrap_or_else(|| panic!("{qemu} is not installed (tests/run installs qemu-user)"));
    let mut cmd = Command::new(qemu);
    cmd.args(["-L", sysroot])
        .arg(agent)
        .args([
            "run",
            "--hub",
            &hub.grpc_url(),
            "--device-id",
            device_id,
            "--interval",
            "100ms",
            "--count",
            "20",
        ])
        .arg("--spool-dir")
        .arg(dir.path().join("spool"));
    let mut agent = Proc::spawn(&format!("shoal-agent ({arch}, qemu)"), cmd);
    assert!(agent.wait(Duration::from_secs(120)).await.success());
    assert_eq!(
        hub.stored_seqs(device_id).await,
        (1..=20).collect::<Vec<_>>()
    );
    let device = hub.get(&format!("/api/v1/devices/{device_id}")).await;
    assert_eq!(device["arch"], arch, "{device}");
    assert_eq!(device["status"], "online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu_enrolls_and_reports() {
    agent_under_qemu_enrolls_and_reports(
        "qemu-aarch64",
        "/usr/aarch64-linux-gnu",
        &aarch64_agent(),
        "arm64-qemu",
        "aarch64",
    )
    .await;
}

/// 32-bit Raspberry Pi OS: Rust reports the architecture as `arm`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_under_qemu_enrolls_and_reports() {
    agent_under_qemu_enrolls_and_reports(
        "qemu-arm",
        "/usr/arm-linux-gnueabihf",
        &armv7_agent(),
        "armhf-qemu",
        "arm",
    )
    .await;
}
