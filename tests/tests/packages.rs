//! Shoal's Debian packages: right architecture, a binary that runs, a hardened unit, a config
//! file that the agent accepts, and shell completions for the packaged command.

use std::path::Path;
use std::process::Command;

use shoal_e2e::{deb, which};

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn unpack(deb: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    dir
}

fn check_package(arch: &str, run: &[&str]) {
    let deb = deb("shoal-agent", arch);
    assert_eq!(
        dpkg_deb(&["--field"], &deb)
            .lines()
            .find(|l| l.starts_with("Architecture:")),
        Some(&*format!("Architecture: {arch}"))
    );
    assert!(!dpkg_deb(&["--ctrl-tarfile"], &deb).is_empty());
    let root = unpack(&deb);
    let unit = std::fs::read_to_string(root.path().join("lib/systemd/system/shoal-agent.service"))
        .unwrap();
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=shoal-agent",
        "DynamicUser=yes",
        "--config /etc/shoal/agent.toml",
    ] {
        assert!(unit.contains(line), "unit lacks {line}");
    }
    let mut cmd = Command::new(run[0]);
    cmd.args(&run[1..])
        .arg(root.path().join("usr/bin/shoal-agent"))
        .args(["check-config", "--device-id", "deb-test", "--config"])
        .arg(root.path().join("etc/shoal/agent.toml"));
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the packaged agent accepts the packaged config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("interval = \"10s\""));
    check_completions(
        root.path(),
        "shoal-agent",
        &["run", "metrics-listen", "check-config"],
    );
}

/// bash, zsh and fish scripts where each shell looks for them, naming `words`.
fn check_completions(root: &Path, command: &str, words: &[&str]) {
    for (path, opening) in [
        (
            format!("usr/share/bash-completion/completions/{command}"),
            String::new(),
        ),
        (
            format!("usr/share/zsh/vendor-completions/_{command}"),
            format!("#compdef {command}"),
        ),
        (
            format!("usr/share/fish/vendor_completions.d/{command}.fish"),
            format!("complete -c {command}"),
        ),
    ] {
        let script = std::fs::read_to_string(root.join(&path))
            .unwrap_or_else(|e| panic!("{path} is not in the package: {e}"));
        assert!(script.contains(&opening), "{path}: {script}");
        for word in words {
            assert!(script.contains(word), "{path} does not complete {word}");
        }
    }
}

#[test]
fn hub_package() {
    let deb = deb("shoal", "amd64");
    let fields = dpkg_deb(&["--field"], &deb);
    assert!(fields.lines().any(|l| l == "Package: shoal"), "{fields}");
    let root = unpack(&deb);
    let unit =
        std::fs::read_to_string(root.path().join("lib/systemd/system/shoal-hub.service")).unwrap();
    for line in [
        "DynamicUser=yes",
        "StateDirectory=shoal",
        "/usr/bin/shoal serve",
    ] {
        assert!(unit.contains(line), "unit lacks {line}");
    }
    let out = Command::new(root.path().join("usr/bin/shoal"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("shoal "));
    check_completions(root.path(), "shoal", &["devices", "telemetry", "data-dir"]);
}

#[test]
fn amd64_package() {
    check_package("amd64", &["env"]);
}

#[test]
fn arm64_package_runs_under_qemu() {
    let qemu = which("qemu-aarch64")
        .expect("qemu-aarch64 is not installed (tests/run installs qemu-user)");
    check_package(
        "arm64",
        &[qemu.to_str().unwrap(), "-L", "/usr/aarch64-linux-gnu"],
    );
}

#[test]
fn config_is_a_conffile() {
    let conffiles = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --ctrl-tarfile {} | tar -xO ./conffiles",
            deb("shoal-agent", "amd64").display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout).trim(),
        "/etc/shoal/agent.toml"
    );
}
