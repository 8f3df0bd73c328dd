//! The board collectors against the fixture trees, through the real binary
//! (`shoal-agent sample --once --sysroot DIR`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn sample(name: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
        .args(["sample", "--once", "--sysroot"])
        .arg(fixture(name))
        .output()
        .expect("run shoal-agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON sample")
}

fn read(name: &str, path: &str) -> String {
    std::fs::read_to_string(fixture(name).join(path))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn pi4_throttling_decoded_and_smon_is_a_subset() {
    let s = sample("pi4");
    let pi = &s["pi"];
    assert_eq!(pi["soc_temperature_celsius"], 48.312);
    assert_eq!(pi["cpu_frequency_mhz"], 1500);
    assert_eq!(pi["throttled_known"], true);
    assert_eq!(pi["throttled_flags"], 0x50005);
    let flags =
        shoal_agent::board::decode_throttled(pi["throttled_flags"].as_u64().unwrap() as u32);
    assert_eq!(
        flags,
        vec![
            "under_voltage",
            "throttled",
            "under_voltage_occurred",
            "throttled_occurred"
        ]
    );

    // The book's Signal Monitor publishes {"temp": thermal_zone0/temp, "load": first field of
    // /proc/loadavg}; both are in the agent's sample, exactly.
    let smon_temp: f64 = read("pi4", "sys/class/thermal/thermal_zone0/temp")
        .parse()
        .unwrap();
    let smon_load: f64 = read("pi4", "proc/loadavg")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        pi["soc_temperature_celsius"].as_f64().unwrap() * 1000.0,
        smon_temp
    );
    assert_eq!(s["load"]["one"].as_f64().unwrap(), smon_load);
    assert_eq!(s["temperatures"][0]["sensor"], "cpu-thermal");
    assert_eq!(s["memory"]["total_bytes"], 3_884_596u64 * 1024);
    assert_eq!(s["uptime_seconds"], 86_400);
}

#[test]
fn pi5_finds_the_firmware_under_axi() {
    let pi = &sample("pi5")["pi"];
    assert_eq!(pi["throttled_known"], true);
    assert_eq!(pi["throttled_flags"], 0);
    assert_eq!(pi["cpu_frequency_mhz"], 2400);
    assert_eq!(pi["soc_temperature_celsius"], 61.85);
    assert_eq!(pi["emmc_life_time_a"], 0, "an SD card reports no wear");
}

#[test]
fn cm4_reports_emmc_wear() {
    let pi = &sample("cm4-emmc")["pi"];
    assert_eq!(
        (
            pi["emmc_life_time_a"].as_u64(),
            pi["emmc_life_time_b"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(pi["emmc_pre_eol"], 1);
    let flags =
        shoal_agent::board::decode_throttled(pi["throttled_flags"].as_u64().unwrap() as u32);
    assert_eq!(flags, vec!["soft_temperature_limit_occurred"]);
}

#[test]
fn jetson_gpu_from_sysfs() {
    let s = sample("jetson-orin-nano");
    assert!(s["pi"].is_null());
    let gpu = &s["gpus"][0];
    assert_eq!(gpu["name"], "NVIDIA Jetson Orin Nano Developer Kit GPU");
    assert_eq!(gpu["utilization_percent"], 37.2);
    assert_eq!(gpu["sm_clock_mhz"], 624);
    assert_eq!(gpu["temperature_celsius"], 45.875);
    assert_eq!(gpu["source"], "jetson-sysfs");
    assert_eq!(s["temperatures"].as_array().unwrap().len(), 5);
}

#[test]
fn a_sysroot_without_proc_or_sys_is_refused() {
    let dir = std::env::temp_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
        .args(["sample", "--once", "--sysroot"])
        .arg(dir.join("shoal-no-such-root"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither proc/ nor sys/"));
}
