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

    /// Properties over what no table covers: every byte string a broker may deliver, every
    /// valid device id and finite reading.
    mod props {
        use proptest::prelude::*;
        use serde_json::{Map, Value, json};

        use super::*;
        use shoal_proto::metrics::value_of;

        /// Any JSON value, nested a little.
        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(".{0,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// An object with the book's keys (and a stray one) holding values of any type.
        fn book_shaped() -> impl Strategy<Value = Value> {
            let key = prop_oneof![
                Just("device".to_string()),
                Just("temp".to_string()),
                Just("load".to_string()),
                Just("collected".to_string()),
                Just("timestamp_ms".to_string()),
                "[a-z]{1,6}",
            ];
            let value = prop_oneof!["[A-Za-z0-9._:/ -]{0,10}".prop_map(Value::from), any_json(),];
            prop::collection::vec((key, value), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
        }

        /// A finite reading, and whether it is written the way devices write theirs (integer
        /// millidegrees, two-decimal loads), which JSON parsing must reproduce exactly. Any
        /// other finite number may come back a few units in the last place off: serde_json's
        /// default float parsing (without `float_roundtrip`) is that close, not exact.
        fn reading() -> impl Strategy<Value = (f64, bool)> {
            prop_oneof![
                (-300_000i64..300_000).prop_map(|t| (t as f64, true)),
                (0u32..100_000).prop_map(|l| (f64::from(l) / 100.0, true)),
                any::<f64>()
                    .prop_filter("finite", |v| v.is_finite())
                    .prop_map(|v| (v, false)),
            ]
        }

        fn finite() -> impl Strategy<Value = f64> {
            reading().prop_map(|(v, _)| v)
        }

        /// `got` is `want`, or (when not `exact`) within 1e-14 of it, relatively.
        fn same_number(got: f64, want: f64, exact: bool) -> bool {
            got == want || (!exact && (got - want).abs() <= want.abs() * 1e-14 + 1e-300)
        }

        proptest! {
            /// Whatever arrives on the JSON topic, `parse` answers Ok or Err: it never panics,
            /// and what it accepts names a valid device and carries a reading.
            #[test]
            fn arbitrary_payloads_never_panic(
                payload in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..256),
                    any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                    book_shaped().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                ],
                now in any::<i64>(),
            ) {
                if let Ok((device, sample)) = parse(&payload, now) {
                    prop_assert!(shoal_proto::device_id::validate(&device).is_ok());
                    prop_assert!(sample.load.is_some() || !sample.temperatures.is_empty());
                }
            }

            /// The book's form `{"device":ID,"temp":T,"load":L}` (either reading may be left
            /// out) becomes exactly those fields, and nothing else.
            #[test]
            fn book_json_round_trips(
                device in "[A-Za-z0-9._:-]{1,128}",
                (temp, load) in prop_oneof![
                    (reading().prop_map(Some), Just(None)),
                    (Just(None), reading().prop_map(Some)),
                    (reading().prop_map(Some), reading().prop_map(Some)),
                ],
                collected in proptest::option::of(any::<i64>()),
                now in any::<i64>(),
            ) {
                let mut obj = Map::new();
                obj.insert("device".into(), json!(device));
                if let Some((t, _)) = temp {
                    obj.insert("temp".into(), json!(t));
                }
                if let Some((l, _)) = load {
                    obj.insert("load".into(), json!(l));
                }
                if let Some(c) = collected {
                    obj.insert("collected".into(), json!(c));
                }
                let payload = serde_json::to_vec(&Value::Object(obj)).unwrap();
                let (got, s) = parse(&payload, now)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&payload))))?;
                prop_assert_eq!(got, device);
                prop_assert_eq!(s.timestamp_ms, collected.unwrap_or(now));
                // The numbers exactly as JSON parsing gives them to `parse`.
                let sent: Value = serde_json::from_slice(&payload).unwrap();
                match temp {
                    Some((t, exact)) => {
                        let millis = sent["temp"].as_f64().unwrap();
                        prop_assert!(same_number(millis, t, exact), "{} read as {}", t, millis);
                        prop_assert_eq!(s.temperatures.len(), 1);
                        prop_assert_eq!(s.temperatures[0].sensor.as_str(), "thermal_zone0");
                        prop_assert_eq!(s.temperatures[0].celsius, millis / 1000.0);
                        prop_assert_eq!(
                            value_of(&s, "temperature_celsius{sensor=\"thermal_zone0\"}"),
                            Some(millis / 1000.0)
                        );
                    }
                    None => prop_assert!(s.temperatures.is_empty()),
                }
                match load {
                    Some((l, exact)) => {
                        let one = sent["load"].as_f64().unwrap();
                        prop_assert!(same_number(one, l, exact), "{} read as {}", l, one);
                        prop_assert_eq!(s.load.map(|l| l.one), Some(one));
                        prop_assert_eq!(value_of(&s, "load1"), Some(one));
                    }
                    None => {
                        prop_assert!(s.load.is_none());
                        prop_assert_eq!(value_of(&s, "load1"), None);
                    }
                }
                // Only what the payload says: no zeros for what the book's form lacks.
                for absent in ["load5", "load15", "uptime_seconds", "process_count"] {
                    prop_assert_eq!(value_of(&s, absent), None, "{}", absent);
                }
                prop_assert_eq!(s.uptime_seconds, None);
                prop_assert_eq!(s.process_count, None);
                prop_assert_eq!(s.seq, 0, "the hub numbers JSON samples itself");
            }

            /// Anything but a valid device id is refused, whatever the readings.
            #[test]
            fn invalid_device_ids_are_refused(
                device in prop_oneof![
                    Just(String::new()),
                    "[A-Za-z0-9]{0,8}[/ #+é\\x00\"][A-Za-z0-9]{0,8}",
                    "[a-z]{129,140}",
                ],
                temp in finite(),
            ) {
                let payload = serde_json::to_vec(&json!({"device": device, "temp": temp})).unwrap();
                let err = parse(&payload, 0).unwrap_err();
                prop_assert!(err.contains("device"), "{}", err);
            }
        }
    }
}
