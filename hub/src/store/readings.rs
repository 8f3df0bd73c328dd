//! A device's newest readings in brief: what the fleet table shows for each device without
//! reading the store. The writer keeps one per device, from the newest sample of each batch it
//! commits, and the fleet view loads them at start.
//!
//! A reading the device did not send is `None` (shown as missing), never zero: the book's JSON
//! form, for one, carries only a temperature and the 1-minute load.

use serde::{Deserialize, Serialize};
use shoal_proto::v1::Sample;
use utoipa::ToSchema;

/// The Raspberry Pi firmware's throttling conditions now (`get_throttled` bits 0..3).
const PI_NOW: [(u32, &str); 4] = [
    (0, "under-voltage"),
    (1, "frequency capped"),
    (2, "throttled"),
    (3, "soft temperature limit"),
];

/// The newest sample of a device, in brief.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Readings {
    /// When the sample was taken (epoch milliseconds, device clock).
    pub timestamp_ms: i64,
    /// Total CPU use, percent.
    #[schema(required)]
    pub cpu_percent: Option<f64>,
    /// The 1-minute load average.
    #[schema(required)]
    pub load1: Option<f64>,
    #[schema(required)]
    pub memory_used_bytes: Option<u64>,
    #[schema(required)]
    pub memory_total_bytes: Option<u64>,
    /// The SoC's temperature: the Pi firmware's reading, else the hottest sensor.
    #[schema(required)]
    pub soc_temperature_celsius: Option<f64>,
    /// The hottest GPU's temperature.
    #[schema(required)]
    pub gpu_temperature_celsius: Option<f64>,
    /// The busiest GPU's utilisation, percent.
    #[schema(required)]
    pub gpu_utilization_percent: Option<f64>,
    /// Throttling now: the Pi firmware's conditions (`under-voltage`, `frequency capped`,
    /// `throttled`, `soft temperature limit`) and `gpu N` for a GPU reporting throttle
    /// reasons; empty when none; `null` when the device reports neither.
    #[schema(required)]
    pub throttling: Option<Vec<String>>,
}

impl Readings {
    pub fn of(s: &Sample) -> Self {
        let hottest = |it: &mut dyn Iterator<Item = f64>| it.reduce(f64::max);
        let pi = s.pi.as_ref();
        let soc = pi
            .map(|p| p.soc_temperature_celsius)
            .or_else(|| hottest(&mut s.temperatures.iter().map(|t| t.celsius)));
        let pi_known = pi.filter(|p| p.throttled_known);
        let throttling = (pi_known.is_some() || !s.gpus.is_empty()).then(|| {
            let mut now: Vec<String> = pi_known
                .map(|p| {
                    PI_NOW
                        .iter()
                        .filter(|(bit, _)| p.throttled_flags & (1 << bit) != 0)
                        .map(|(_, name)| (*name).to_string())
                        .collect()
                })
                .unwrap_or_default();
            now.extend(
                s.gpus
                    .iter()
                    .filter(|g| g.throttle_reasons != 0)
                    .map(|g| format!("gpu {}", g.index)),
            );
            now
        });
        Self {
            timestamp_ms: s.timestamp_ms,
            cpu_percent: s.cpu.as_ref().map(|c| c.total_percent),
            load1: s.load.as_ref().map(|l| l.one),
            memory_used_bytes: s.memory.as_ref().map(|m| m.used_bytes),
            memory_total_bytes: s.memory.as_ref().map(|m| m.total_bytes),
            soc_temperature_celsius: soc,
            gpu_temperature_celsius: hottest(&mut s.gpus.iter().map(|g| g.temperature_celsius)),
            gpu_utilization_percent: hottest(&mut s.gpus.iter().map(|g| g.utilization_percent)),
            throttling,
        }
    }
}

#[cfg(test)]
mod tests {
    use shoal_proto::v1::{Cpu, Gpu, LoadAverage, PiBoard, Temperature};

    use super::*;

    #[test]
    fn what_was_not_sent_is_missing_not_zero() {
        let book = Sample {
            seq: 1,
            timestamp_ms: 5,
            load: Some(LoadAverage {
                one: 0.42,
                five: None,
                fifteen: None,
            }),
            temperatures: vec![Temperature {
                sensor: "thermal_zone0".into(),
                celsius: 48.3,
            }],
            ..Default::default()
        };
        let r = Readings::of(&book);
        assert_eq!(r.load1, Some(0.42));
        assert_eq!(r.soc_temperature_celsius, Some(48.3));
        assert_eq!(r.cpu_percent, None);
        assert_eq!(r.memory_total_bytes, None);
        assert_eq!(r.gpu_temperature_celsius, None);
        assert_eq!(r.throttling, None, "neither a Pi nor a GPU said");
    }

    #[test]
    fn throttling_names_the_pi_conditions_and_gpus() {
        let s = Sample {
            cpu: Some(Cpu {
                total_percent: 0.0,
                core_percent: vec![],
            }),
            pi: Some(PiBoard {
                soc_temperature_celsius: 71.0,
                throttled_flags: 0b101 | (1 << 16),
                throttled_known: true,
                ..Default::default()
            }),
            temperatures: vec![Temperature {
                sensor: "x".into(),
                celsius: 90.0,
            }],
            gpus: vec![
                Gpu {
                    index: 0,
                    temperature_celsius: 50.0,
                    utilization_percent: 10.0,
                    ..Default::default()
                },
                Gpu {
                    index: 1,
                    temperature_celsius: 60.0,
                    utilization_percent: 5.0,
                    throttle_reasons: 4,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = Readings::of(&s);
        assert_eq!(r.cpu_percent, Some(0.0), "a real zero stays zero");
        assert_eq!(
            r.soc_temperature_celsius,
            Some(71.0),
            "the firmware's figure"
        );
        assert_eq!(r.gpu_temperature_celsius, Some(60.0));
        assert_eq!(r.gpu_utilization_percent, Some(10.0));
        assert_eq!(
            r.throttling.unwrap(),
            ["under-voltage", "throttled", "gpu 1"],
            "bit 16 happened since boot, not now"
        );
        let unknown = Sample {
            pi: Some(PiBoard {
                throttled_flags: 1,
                throttled_known: false,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(Readings::of(&unknown).throttling, None);
    }
}
