//! The book's plain JSON telemetry, so existing `mosquitto_pub` scripts keep working:
//!
//! ```text
//! mosquitto_pub -t sensor/pi-1 -m '{"device":"pi-1","temp":48312,"load":0.42}'
//! ```
//!
//! | JSON field | becomes | metric |
//! |---|---|---|
//! | `device` (string, required) | the device id | |
//! | `temp` (number, millidegrees C, as `/sys/class/thermal/thermal_zone0/temp`) | a temperature in °C, sensor `thermal_zone0` | `temperature_celsius{sensor="thermal_zone0"}` |
//! | `load` (number, as the first field of `/proc/loadavg`) | the 1-minute load average | `load1` |
//! | `collected` or `timestamp_ms` (epoch ms, optional) | the sample's time; otherwise the hub's receive time | |
//!
//! At least one of `temp` and `load` must be present. The hub numbers these samples itself
//! (after the highest seq it holds for the device), so a JSON device is at-least-once, as its
//! script was; an agent later taking over the same device id numbers above them.

use serde::Deserialize;
use shoal_proto::v1::{LoadAverage, Sample, Temperature};

#[derive(Debug, Deserialize)]
struct JsonSample {
    device: Option<String>,
    temp: Option<f64>,
    load: Option<f64>,
    collected: Option<i64>,
    timestamp_ms: Option<i64>,
}

/// Reads one JSON message; `Err` names what is wrong.
pub fn parse(payload: &[u8], now_ms: i64) -> Result<(String, Sample), String> {
    let j: JsonSample =
        serde_json::from_slice(payload).map_err(|e| format!("not a JSON sample: {e}"))?;
    let device = j.device.ok_or("the \"device\" field is missing")?;
    shoal_proto::device_id::validate(&device).map_err(|e| format!("\"device\": {e}"))?;
    if j.temp.is_none() && j.load.is_none() {
        return Err("neither \"temp\" nor \"load\" is present".into());
    }
    let sample = Sample {
        timestamp_ms: j.collected.or(j.timestamp_ms).unwrap_or(now_ms),
        load: j.load.map(|one| LoadAverage {
            one,
            five: None,
            fifteen: None,
        }),
        temperatures: j
            .temp
            .map(|t| {
                vec![Temperature {
                    sensor: "thermal_zone0".into(),
                    celsius: t / 1000.0,
                }]
            })
            .unwrap_or_default(),
        ..Default::default()
    };
    Ok((device, sample))
}

/// Does `topic` match the JSON topic filter (MQTT wildcards)?
pub fn matches(topic: &str, filter: &str) -> bool {
    !filter.is_empty() && rumqttc::matches(topic, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_books_payload() {
        let (d, s) = parse(br#"{"device":"pi-1","temp":48312,"load":0.42}"#, 1_000).unwrap();
        assert_eq!(d, "pi-1");
        assert_eq!(s.timestamp_ms, 1_000);
        assert_eq!(shoal_proto::metrics::value_of(&s, "load1"), Some(0.42));
        assert_eq!(
            shoal_proto::metrics::value_of(&s, "temperature_celsius{sensor=\"thermal_zone0\"}"),
            Some(48.312)
        );
        // Only what the payload says: no 5/15-minute load, uptime or process count as zeros.
        for absent in ["load5", "load15", "uptime_seconds", "process_count"] {
            assert_eq!(shoal_proto::metrics::value_of(&s, absent), None, "{absent}");
        }
    }

    #[test]
    fn uses_the_collected_time() {
        let (_, s) = parse(
            br#"{"device":"pi-1","load":1,"collected":1700000000000}"#,
            5,
        )
        .unwrap();
        assert_eq!(s.timestamp_ms, 1_700_000_000_000);
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(
            parse(b"not json", 0)
                .unwrap_err()
                .contains("not a JSON sample")
        );
        assert!(parse(br#"{"temp":1}"#, 0).unwrap_err().contains("device"));
        assert!(
            parse(br#"{"device":"a/b","temp":1}"#, 0)
                .unwrap_err()
                .contains("'/'")
        );
        assert!(parse(br#"{"device":"x"}"#, 0).unwrap_err().contains("temp"));
        assert!(parse(br#"{"device":"x","temp":"hot"}"#, 0).is_err());
    }

    #[test]
    fn topic_filters() {
        assert!(matches("sensor/pi-1", "sensor/+"));
        assert!(!matches("sensor/pi-1/x", "sensor/+"));
        assert!(!matches("sensor/pi-1", ""));
    }
}
