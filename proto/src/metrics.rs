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
    let load = if s.load.is_some() { 3 } else { 0 };
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
        + 1 // uptime
        + s.temperatures.len()
        + 1 // process count
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
        // cpu 3 + load 3 + disk 2 + uptime + process count
        assert_eq!(point_count(&s), 10);
    }
}
