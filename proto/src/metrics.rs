//! A sample as named metric points, Prometheus style: `name` or `name{label="value"}`.
//!
//! These names are what operators query (`shoal telemetry ID --metric NAME`), so they are part
//! of the contract: add new ones freely, never rename.

use crate::v1::Sample;

/// The Raspberry Pi firmware's `get_throttled` bits, by name.
pub const PI_THROTTLE_BITS: [(u32, &str); 8] = [
    (0, "under_voltage"),
    (1, "arm_frequency_capped"),
    (2, "throttled"),
    (3, "soft_temperature_limit"),
    (16, "under_voltage_occurred"),
    (17, "arm_frequency_capped_occurred"),
    (18, "throttled_occurred"),
    (19, "soft_temperature_limit_occurred"),
];

/// What a metric's values measure, so clients print them with their unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Percent,
    Bytes,
    BytesPerSecond,
    Celsius,
    Seconds,
    Megahertz,
    Watts,
    /// A count, a load average, flags or a 0/1 state: printed as a plain number.
    Number,
}

impl Unit {
    /// The unit's symbol, or `""` for plain numbers.
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::Percent => "%",
            Unit::Bytes => "B",
            Unit::BytesPerSecond => "B/s",
            Unit::Celsius => "°C",
            Unit::Seconds => "s",
            Unit::Megahertz => "MHz",
            Unit::Watts => "W",
            Unit::Number => "",
        }
    }
}

/// A metric family: its name, the label that tells its series apart (if any), its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub label: Option<&'static str>,
    pub unit: Unit,
}

const fn family(name: &'static str, label: Option<&'static str>, unit: Unit) -> Family {
    Family { name, label, unit }
}

/// Every metric family [`for_each_point`] can produce.
pub const FAMILIES: &[Family] = &[
    family("cpu_percent", None, Unit::Percent),
    family("cpu_core_percent", Some("core"), Unit::Percent),
    family("load1", None, Unit::Number),
    family("load5", None, Unit::Number),
    family("load15", None, Unit::Number),
    family("memory_total_bytes", None, Unit::Bytes),
    family("memory_used_bytes", None, Unit::Bytes),
    family("memory_available_bytes", None, Unit::Bytes),
    family("swap_total_bytes", None, Unit::Bytes),
    family("swap_used_bytes", None, Unit::Bytes),
    family("disk_total_bytes", Some("mount"), Unit::Bytes),
    family("disk_used_bytes", Some("mount"), Unit::Bytes),
    family("net_rx_bytes", Some("iface"), Unit::Bytes),
    family("net_tx_bytes", Some("iface"), Unit::Bytes),
    family(
        "net_rx_bytes_per_second",
        Some("iface"),
        Unit::BytesPerSecond,
    ),
    family(
        "net_tx_bytes_per_second",
        Some("iface"),
        Unit::BytesPerSecond,
    ),
    family("uptime_seconds", None, Unit::Seconds),
    family("temperature_celsius", Some("sensor"), Unit::Celsius),
    family("process_count", None, Unit::Number),
    family("gpu_utilization_percent", Some("gpu"), Unit::Percent),
    family("gpu_memory_used_bytes", Some("gpu"), Unit::Bytes),
    family("gpu_memory_total_bytes", Some("gpu"), Unit::Bytes),
    family("gpu_temperature_celsius", Some("gpu"), Unit::Celsius),
    family("gpu_power_watts", Some("gpu"), Unit::Watts),
    family("gpu_sm_clock_mhz", Some("gpu"), Unit::Megahertz),
    family("pi_soc_temperature_celsius", None, Unit::Celsius),
    family("pi_cpu_frequency_mhz", None, Unit::Megahertz),
    family("pi_throttled_flags", None, Unit::Number),
    family("pi_throttle", Some("flag"), Unit::Number),
    family("pi_emmc_life_time_a", None, Unit::Number),
    family("pi_emmc_life_time_b", None, Unit::Number),
    family("pi_emmc_pre_eol", None, Unit::Number),
];

/// Why a metric name cannot match any point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("unknown metric {name:?}{}", suggest(close))]
    Unknown {
        name: String,
        close: Vec<&'static str>,
    },
    #[error("{family} has one series per {label}: name it, e.g. {family}{{{label}=\"{example}\"}}")]
    NeedsLabel {
        family: &'static str,
        label: &'static str,
        example: &'static str,
    },
    #[error("{family} has no labels; ask for plain {family}")]
    NoLabels { family: &'static str },
    #[error("{family} is told apart by {label}, not by the label given in {name:?}")]
    WrongLabel {
        name: String,
        family: &'static str,
        label: &'static str,
    },
}

fn suggest(close: &[&str]) -> String {
    if close.is_empty() {
        " (see docs/telemetry.md for the names)".into()
    } else {
        format!("; did you mean {}?", close.join(", "))
    }
}

/// The family of a metric name (`name` or `name{label="value"}`), or why there is none.
pub fn family_of(metric: &str) -> Result<&'static Family, NameError> {
    let (base, label) = match metric.split_once('{') {
        Some((base, rest)) => (base, Some(rest)),
        None => (metric, None),
    };
    let Some(f) = FAMILIES.iter().find(|f| f.name == base) else {
        let mut close: Vec<(usize, &'static str)> = FAMILIES
            .iter()
            .map(|f| (edit_distance(base, f.name), f.name))
            .filter(|(d, name)| *d <= 3 || name.contains(base) && !base.is_empty())
            .collect();
        close.sort();
        return Err(NameError::Unknown {
            name: metric.to_string(),
            close: close.into_iter().take(3).map(|(_, n)| n).collect(),
        });
    };
    match (f.label, label) {
        (None, None) => Ok(f),
        (None, Some(_)) => Err(NameError::NoLabels { family: f.name }),
        (Some(l), None) => Err(NameError::NeedsLabel {
            family: f.name,
            label: l,
            example: example_value(l),
        }),
        (Some(l), Some(rest)) => {
            if rest.strip_prefix(l).is_some_and(|r| r.starts_with("=\"")) {
                Ok(f)
            } else {
                Err(NameError::WrongLabel {
                    name: metric.to_string(),
                    family: f.name,
                    label: l,
                })
            }
        }
    }
}

fn example_value(label: &str) -> &'static str {
    match label {
        "core" | "gpu" => "0",
        "mount" => "/",
        "iface" => "eth0",
        "sensor" => "cpu_thermal",
        "flag" => "throttled",
        _ => "...",
    }
}

/// Levenshtein distance, for suggesting the name an operator probably meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Calls `f(name, value)` for every metric point in `s`, in a fixed order.
pub fn for_each_point(s: &Sample, mut f: impl FnMut(&str, f64)) {
    let mut name = String::with_capacity(64);
    let mut labelled =
        |f: &mut dyn FnMut(&str, f64), metric: &str, key: &str, val: &str, v: f64| {
            name.clear();
            name.push_str(metric);
            name.push('{');
            name.push_str(key);
            name.push_str("=\"");
            name.push_str(val);
            name.push_str("\"}");
            f(&name, v);
        };
    if let Some(cpu) = &s.cpu {
        f("cpu_percent", cpu.total_percent);
        for (i, c) in cpu.core_percent.iter().enumerate() {
            labelled(&mut f, "cpu_core_percent", "core", &i.to_string(), *c);
        }
    }
    if let Some(l) = &s.load {
        f("load1", l.one);
        if let Some(v) = l.five {
            f("load5", v);
        }
        if let Some(v) = l.fifteen {
            f("load15", v);
        }
    }
    if let Some(m) = &s.memory {
        f("memory_total_bytes", m.total_bytes as f64);
        f("memory_used_bytes", m.used_bytes as f64);
        f("memory_available_bytes", m.available_bytes as f64);
        f("swap_total_bytes", m.swap_total_bytes as f64);
        f("swap_used_bytes", m.swap_used_bytes as f64);
    }
    for d in &s.disks {
        labelled(
            &mut f,
            "disk_total_bytes",
            "mount",
            &d.mount_point,
            d.total_bytes as f64,
        );
        labelled(
            &mut f,
            "disk_used_bytes",
            "mount",
            &d.mount_point,
            d.used_bytes as f64,
        );
    }
    for n in &s.networks {
        labelled(&mut f, "net_rx_bytes", "iface", &n.name, n.rx_bytes as f64);
        labelled(&mut f, "net_tx_bytes", "iface", &n.name, n.tx_bytes as f64);
        labelled(
            &mut f,
            "net_rx_bytes_per_second",
            "iface",
            &n.name,
            n.rx_bytes_per_second,
        );
        labelled(
            &mut f,
            "net_tx_bytes_per_second",
            "iface",
            &n.name,
            n.tx_bytes_per_second,
        );
    }
    if let Some(v) = s.uptime_seconds {
        f("uptime_seconds", v as f64);
    }
    for t in &s.temperatures {
        labelled(
            &mut f,
            "temperature_celsius",
            "sensor",
            &t.sensor,
            t.celsius,
        );
    }
    if let Some(v) = s.process_count {
        f("process_count", f64::from(v));
    }
    for g in &s.gpus {
        let i = g.index.to_string();
        labelled(
            &mut f,
            "gpu_utilization_percent",
            "gpu",
            &i,
            g.utilization_percent,
        );
        labelled(
            &mut f,
            "gpu_memory_used_bytes",
            "gpu",
            &i,
            g.memory_used_bytes as f64,
        );
        labelled(
            &mut f,
            "gpu_memory_total_bytes",
            "gpu",
            &i,
            g.memory_total_bytes as f64,
        );
        labelled(
            &mut f,
            "gpu_temperature_celsius",
            "gpu",
            &i,
            g.temperature_celsius,
        );
        labelled(&mut f, "gpu_power_watts", "gpu", &i, g.power_watts);
        labelled(
            &mut f,
            "gpu_sm_clock_mhz",
            "gpu",
            &i,
            f64::from(g.sm_clock_mhz),
        );
    }
    if let Some(pi) = &s.pi {
        f("pi_soc_temperature_celsius", pi.soc_temperature_celsius);
        f("pi_cpu_frequency_mhz", f64::from(pi.cpu_frequency_mhz));
        if pi.throttled_known {
            f("pi_throttled_flags", f64::from(pi.throttled_flags));
            for (bit, name) in PI_THROTTLE_BITS {
                labelled(
                    &mut f,
                    "pi_throttle",
                    "flag",
                    name,
                    f64::from((pi.throttled_flags >> bit) & 1),
                );
            }
        }
        if pi.emmc_life_time_a != 0 || pi.emmc_life_time_b != 0 {
            f("pi_emmc_life_time_a", f64::from(pi.emmc_life_time_a));
            f("pi_emmc_life_time_b", f64::from(pi.emmc_life_time_b));
            f("pi_emmc_pre_eol", f64::from(pi.emmc_pre_eol));
        }
    }
}

/// The number of metric points in `s` (what [`for_each_point`] visits), counted from the
/// structure without building names: the hub does this for every sample it ingests.
pub fn point_count(s: &Sample) -> usize {
    let cpu = s.cpu.as_ref().map_or(0, |c| 1 + c.core_percent.len());
    let load = s.load.as_ref().map_or(0, |l| {
        1 + usize::from(l.five.is_some()) + usize::from(l.fifteen.is_some())
    });
    let memory = if s.memory.is_some() { 5 } else { 0 };
    let pi = s.pi.as_ref().map_or(0, |pi| {
        2 + if pi.throttled_known {
            1 + PI_THROTTLE_BITS.len()
        } else {
            0
        } + if pi.emmc_life_time_a != 0 || pi.emmc_life_time_b != 0 {
            3
        } else {
            0
        }
    });
    cpu + load
        + memory
        + 2 * s.disks.len()
        + 4 * s.networks.len()
        + usize::from(s.uptime_seconds.is_some())
        + s.temperatures.len()
        + usize::from(s.process_count.is_some())
        + 6 * s.gpus.len()
        + pi
}

/// The value of metric `metric` in `s`, if it has one.
pub fn value_of(s: &Sample, metric: &str) -> Option<f64> {
    let mut found = None;
    for_each_point(s, |name, v| {
        if found.is_none() && name == metric {
            found = Some(v);
        }
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Cpu, Disk, LoadAverage};

    #[test]
    fn point_count_matches_the_points_visited() {
        use crate::v1::{Gpu, Memory, NetInterface, PiBoard, Temperature};
        let mut s = Sample {
            cpu: Some(Cpu {
                total_percent: 1.0,
                core_percent: vec![1.0; 4],
            }),
            load: Some(LoadAverage::default()),
            memory: Some(Memory::default()),
            disks: vec![Disk::default(); 2],
            networks: vec![NetInterface::default(); 3],
            temperatures: vec![Temperature::default(); 2],
            gpus: vec![Gpu::default(); 2],
            pi: Some(PiBoard {
                throttled_known: true,
                emmc_life_time_a: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let visited = |s: &Sample| {
            let mut n = 0;
            for_each_point(s, |_, _| n += 1);
            n
        };
        assert_eq!(point_count(&s), visited(&s));
        s.pi = Some(PiBoard::default());
        s.cpu = None;
        assert_eq!(point_count(&s), visited(&s));
        assert_eq!(point_count(&Sample::default()), visited(&Sample::default()));
        s.uptime_seconds = Some(1);
        s.process_count = Some(2);
        s.load = Some(LoadAverage {
            one: 1.0,
            five: Some(1.0),
            fifteen: None,
        });
        assert_eq!(point_count(&s), visited(&s));
    }

    #[test]
    fn every_point_has_a_family() {
        use crate::v1::{Gpu, Memory, NetInterface, PiBoard, Temperature};
        let s = Sample {
            cpu: Some(Cpu {
                total_percent: 1.0,
                core_percent: vec![1.0; 2],
            }),
            load: Some(LoadAverage {
                one: 1.0,
                five: Some(1.0),
                fifteen: Some(1.0),
            }),
            memory: Some(Memory::default()),
            disks: vec![Disk::default()],
            networks: vec![NetInterface::default()],
            temperatures: vec![Temperature::default()],
            gpus: vec![Gpu::default()],
            uptime_seconds: Some(1),
            process_count: Some(1),
            pi: Some(PiBoard {
                throttled_known: true,
                emmc_life_time_a: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut seen = std::collections::BTreeSet::new();
        for_each_point(&s, |name, _| {
            let f = family_of(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            seen.insert(f.name);
        });
        assert_eq!(seen.len(), FAMILIES.len(), "every family is produced");
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        let msg = |m: &str| family_of(m).unwrap_err().to_string();
        assert!(msg("cpu_precent").contains("did you mean cpu_percent"));
        assert!(msg("disk_used_bytes").contains("one series per mount"));
        assert!(msg("disk_used_bytes").contains(r#"disk_used_bytes{mount="/"}"#));
        assert!(msg(r#"cpu_percent{core="0"}"#).contains("no labels"));
        assert!(msg(r#"disk_used_bytes{iface="eth0"}"#).contains("told apart by mount"));
        assert!(msg("zzzzzzzzzzzz").contains("unknown metric"));
        assert_eq!(
            family_of(r#"temperature_celsius{sensor="cpu"}"#)
                .unwrap()
                .unit,
            Unit::Celsius
        );
    }

    #[test]
    fn names_points() {
        let s = Sample {
            seq: 1,
            cpu: Some(Cpu {
                total_percent: 12.5,
                core_percent: vec![10.0, 15.0],
            }),
            load: Some(LoadAverage {
                one: 0.5,
                five: Some(0.25),
                fifteen: Some(0.125),
            }),
            disks: vec![Disk {
                mount_point: "/".into(),
                total_bytes: 100,
                used_bytes: 40,
                ..Default::default()
            }],
            process_count: Some(7),
            ..Default::default()
        };
        assert_eq!(value_of(&s, "cpu_percent"), Some(12.5));
        assert_eq!(value_of(&s, "cpu_core_percent{core=\"1\"}"), Some(15.0));
        assert_eq!(value_of(&s, "load5"), Some(0.25));
        assert_eq!(value_of(&s, "disk_used_bytes{mount=\"/\"}"), Some(40.0));
        assert_eq!(value_of(&s, "process_count"), Some(7.0));
        assert_eq!(value_of(&s, "nope"), None);
        // Not read, so no point: never a 0.
        assert_eq!(value_of(&s, "uptime_seconds"), None);
        // cpu 3 + load 3 + disk 2 + process count
        assert_eq!(point_count(&s), 9);
    }
}
