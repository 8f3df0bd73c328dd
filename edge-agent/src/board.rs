//! Board collectors that read `/sys` and `/proc` through a root path, so the same code runs on
//! the device (root `/`) and in tests against captured trees (`shoal-agent sample --once
//! --sysroot DIR`, fixtures under `edge-agent/tests/fixtures/`).
//!
//! - Raspberry Pi: board model, SoC temperature, the firmware's throttling flags (decoded bit by
//!   bit), CPU frequency, eMMC wear where the storage reports it.
//! - NVIDIA Jetson: no NVML there, so GPU load and frequency come from the GPU's devfreq node
//!   and the GPU temperature from its thermal zone.
//! - Any Linux: thermal zones (type and temperature).

use std::path::{Path, PathBuf};

use shoal_proto::v1::{Gpu, PiBoard, Temperature};

/// A root under which `/sys` and `/proc` are read.
#[derive(Debug, Clone)]
pub struct Sysroot(PathBuf);

impl Default for Sysroot {
    fn default() -> Self {
        Self(PathBuf::from("/"))
    }
}

impl Sysroot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    pub fn path(&self, abs: &str) -> PathBuf {
        self.0.join(abs.trim_start_matches('/'))
    }

    /// A file's text, trimmed of whitespace and device-tree NULs.
    pub fn read(&self, abs: &str) -> Option<String> {
        read_trimmed(&self.path(abs))
    }

    pub fn read_num<T: std::str::FromStr>(&self, abs: &str) -> Option<T> {
        self.read(abs)?.parse().ok()
    }

    /// Entries of a directory, sorted by name.
    pub fn list(&self, abs: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.path(abs))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    Some(s.to_string())
}

/// What kind of board this is, from the device tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Board {
    RaspberryPi { model: String },
    Jetson { model: String },
    Other { model: String },
}

impl Board {
    pub fn detect(root: &Sysroot) -> Self {
        let model = root.read("/proc/device-tree/model").unwrap_or_default();
        let compatible = root
            .read("/proc/device-tree/compatible")
            .unwrap_or_default();
        if model.starts_with("Raspberry Pi") {
            Board::RaspberryPi { model }
        } else if model.contains("Jetson") || compatible.contains("nvidia,tegra") {
            Board::Jetson { model }
        } else if model.is_empty() {
            Board::Other {
                model: root
                    .read("/sys/class/dmi/id/product_name")
                    .unwrap_or_default(),
            }
        } else {
            Board::Other { model }
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Board::RaspberryPi { model } | Board::Jetson { model } | Board::Other { model } => {
                model
            }
        }
    }
}

/// Every thermal zone: its type as the sensor name, °C.
pub fn thermal_zones(root: &Sysroot) -> Vec<Temperature> {
    root.list("/sys/class/thermal")
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("thermal_zone"))
        })
        .filter_map(|zone| {
            let milli: f64 = read_trimmed(&zone.join("temp"))?.parse().ok()?;
            let sensor = read_trimmed(&zone.join("type")).unwrap_or_else(|| {
                zone.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            });
            Some(Temperature {
                sensor,
                celsius: milli / 1000.0,
            })
        })
        .collect()
}

pub use shoal_proto::metrics::PI_THROTTLE_BITS as THROTTLE_BITS;

/// The names of the bits set in a `get_throttled` value.
pub fn decode_throttled(flags: u32) -> Vec<&'static str> {
    THROTTLE_BITS
        .iter()
        .filter(|(bit, _)| flags & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Finds the firmware's `get_throttled` (under `/sys/devices/platform`, its place differs
/// between Pi generations and kernels).
fn find_get_throttled(root: &Sysroot) -> Option<PathBuf> {
    let mut dirs = vec![root.path("/sys/devices/platform")];
    for _ in 0..3 {
        let mut next = Vec::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut entries: Vec<PathBuf> =
                entries.filter_map(Result::ok).map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                if e.file_name().is_some_and(|n| n == "get_throttled") {
                    return Some(e);
                }
                if e.is_dir() && !e.is_symlink() {
                    next.push(e);
                }
            }
        }
        dirs = next;
    }
    None
}

/// Parses `0x1` style JEDEC values (`life_time` holds two: "0x01 0x02").
fn hex_values(s: &str) -> Vec<u32> {
    s.split_whitespace()
        .filter_map(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// The Raspberry Pi part of a sample.
pub fn pi(root: &Sysroot) -> PiBoard {
    let mut pi = PiBoard {
        soc_temperature_celsius: root
            .read_num::<f64>("/sys/class/thermal/thermal_zone0/temp")
            .map_or(0.0, |m| m / 1000.0),
        cpu_frequency_mhz: root
            .read_num::<u32>("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
            .map_or(0, |khz| khz / 1000),
        ..Default::default()
    };
    if let Some(flags) = find_get_throttled(root)
        .and_then(|p| read_trimmed(&p))
        .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
    {
        pi.throttled_flags = flags;
        pi.throttled_known = true;
    }
    if let Some(v) = root
        .read("/sys/block/mmcblk0/device/life_time")
        .map(|s| hex_values(&s))
    {
        pi.emmc_life_time_a = v.first().copied().unwrap_or(0);
        pi.emmc_life_time_b = v.get(1).copied().unwrap_or(0);
    }
    if let Some(v) = root
        .read("/sys/block/mmcblk0/device/pre_eol_info")
        .map(|s| hex_values(&s))
    {
        pi.emmc_pre_eol = v.first().copied().unwrap_or(0);
    }
    pi
}

/// The Jetson's integrated GPU from sysfs: load (per mille in `device/load`), frequency
/// (`cur_freq`, Hz) of the devfreq node whose name says GPU, temperature from the GPU thermal
/// zone.
pub fn jetson_gpu(root: &Sysroot, model: &str) -> Option<Gpu> {
    let node = root.list("/sys/class/devfreq").into_iter().find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.ends_with(".gpu") || n.contains("gv11b") || n.contains("ga10b") || n.contains("gp10b")
        })
    })?;
    let load: Option<f64> = read_trimmed(&node.join("device/load"))
        .or_else(|| root.read("/sys/devices/gpu.0/load"))
        .and_then(|s| s.parse().ok());
    let hz: Option<u64> = read_trimmed(&node.join("cur_freq")).and_then(|s| s.parse().ok());
    let temperature = thermal_zones(root)
        .into_iter()
        .find(|t| t.sensor.to_ascii_lowercase().starts_with("gpu"))
        .map_or(0.0, |t| t.celsius);
    Some(Gpu {
        index: 0,
        name: if model.is_empty() {
            "Jetson GPU".into()
        } else {
            format!("{model} GPU")
        },
        utilization_percent: load.map_or(0.0, |l| l / 10.0),
        sm_clock_mhz: hz.map_or(0, |h| (h / 1_000_000) as u32),
        temperature_celsius: temperature,
        source: "jetson-sysfs".into(),
        ..Default::default()
    })
}

/// Adds what the board knows to `sample`: the Pi part, a Jetson's GPU, and the thermal zones
/// when no other temperature source gave any.
pub fn enrich(root: &Sysroot, board: &Board, sample: &mut shoal_proto::v1::Sample) {
    match board {
        Board::RaspberryPi { .. } => sample.pi = Some(pi(root)),
        Board::Jetson { model } => sample.gpus.extend(jetson_gpu(root, model)),
        Board::Other { .. } => {}
    }
    if sample.temperatures.is_empty() {
        sample.temperatures = thermal_zones(root);
    }
}

/// A sample read wholly from `root`'s `/proc` and `/sys` (load, uptime, memory, processes,
/// temperatures and the board parts; CPU usage needs two readings over time and is left out).
pub fn snapshot(root: &Sysroot) -> shoal_proto::v1::Sample {
    use shoal_proto::v1::{LoadAverage, Memory, Sample};
    let load = root.read("/proc/loadavg").and_then(|s| {
        let mut it = s.split_whitespace().map(|v| v.parse::<f64>().ok());
        Some(LoadAverage {
            one: it.next()??,
            five: Some(it.next()??),
            fifteen: Some(it.next()??),
        })
    });
    let meminfo = root.read("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    let memory = (!meminfo.is_empty()).then(|| Memory {
        total_bytes: kib("MemTotal"),
        used_bytes: kib("MemTotal").saturating_sub(kib("MemAvailable")),
        available_bytes: kib("MemAvailable"),
        swap_total_bytes: kib("SwapTotal"),
        swap_used_bytes: kib("SwapTotal").saturating_sub(kib("SwapFree")),
    });
    let mut sample = Sample {
        timestamp_ms: crate::clock::now_ms(),
        load,
        memory,
        uptime_seconds: root
            .read("/proc/uptime")
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map(|s| s as u64),
        process_count: Some(root.list("/proc"))
            .filter(|entries| !entries.is_empty())
            .map(|entries| {
                entries
                    .iter()
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .count() as u32
            }),
        ..Default::default()
    };
    enrich(root, &Board::detect(root), &mut sample);
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_throttle_bits() {
        assert_eq!(decode_throttled(0), Vec::<&str>::new());
        assert_eq!(
            decode_throttled(0x50005),
            vec![
                "under_voltage",
                "throttled",
                "under_voltage_occurred",
                "throttled_occurred"
            ]
        );
        assert_eq!(
            decode_throttled(0x80008),
            vec!["soft_temperature_limit", "soft_temperature_limit_occurred"]
        );
    }

    #[test]
    fn jedec_values() {
        assert_eq!(hex_values("0x01 0x02"), vec![1, 2]);
        assert_eq!(hex_values("0x0b"), vec![11]);
        assert!(hex_values("").is_empty());
    }
}
