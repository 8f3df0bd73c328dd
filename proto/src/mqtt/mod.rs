//! The MQTT side of the contract: topic names and broker URLs, written once for agent, hub and
//! embedded broker.
//!
//! Topics (device id `D`):
//! - `shoal/v1/devices/D/hello`: a `DeviceHello`, on every (re)connect (agent → hub);
//! - `shoal/v1/devices/D/telemetry`: `TelemetryBatch`es (agent → hub);
//! - `shoal/v1/devices/D/acks`: the hub's `IngestResponse`s (hub → agent), subscribed QoS 1.
//!
//! [`client`] (feature `mqtt-client`) builds rumqttc options and rustls settings from them.

#[cfg(feature = "mqtt-client")]
pub mod client;

/// Every device topic starts with this.
pub const DEVICE_TOPIC_PREFIX: &str = "shoal/v1/devices/";

/// What a device topic carries.
pub mod kind {
    pub const HELLO: &str = "hello";
    pub const TELEMETRY: &str = "telemetry";
    pub const ACKS: &str = "acks";
}

/// The topic of `kind` (see [`kind`]) for `device_id`.
pub fn topic(device_id: &str, kind: &str) -> String {
    format!("{DEVICE_TOPIC_PREFIX}{device_id}/{kind}")
}

/// The filter matching `kind` for every device, inside the shared-subscription `group` (several
/// hubs then split the devices); an empty group subscribes plainly.
pub fn subscription(group: &str, kind: &str) -> String {
    let filter = format!("{DEVICE_TOPIC_PREFIX}+/{kind}");
    if group.is_empty() {
        filter
    } else {
        format!("$share/{group}/{filter}")
    }
}

/// Where a message was published: `shoal/v1/devices/{device}/{kind}`.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceTopic<'a> {
    pub device_id: &'a str,
    pub kind: &'a str,
}

/// Splits a Shoal device topic; `None` for anything else.
pub fn parse_topic(topic: &str) -> Option<DeviceTopic<'_>> {
    let rest = topic.strip_prefix(DEVICE_TOPIC_PREFIX)?;
    let (device_id, kind) = rest.split_once('/')?;
    if device_id.is_empty() || kind.is_empty() || kind.contains('/') {
        return None;
    }
    Some(DeviceTopic { device_id, kind })
}

/// Where a broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: MQTT over TLS.
    pub tls: bool,
}

/// `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]` (TLS, default 8883).
pub fn parse_broker(url: &str) -> Result<BrokerAddr, String> {
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false, 1883)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else {
        return Err(format!("{url:?} does not start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.ends_with(':') => (
            host,
            port.parse()
                .map_err(|_| format!("{url:?} has a bad port"))?,
        ),
        None if !rest.is_empty() => (rest, default_port),
        _ => return Err(format!("{url:?} names no host")),
    };
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    Ok(BrokerAddr {
        host: host.to_string(),
        port,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let addr = |host: &str, port, tls| {
            Ok(BrokerAddr {
                host: host.into(),
                port,
                tls,
            })
        };
        assert_eq!(parse_broker("mqtts://hub.lab"), addr("hub.lab", 8883, true));
        assert_eq!(
            parse_broker("mqtts://hub.lab:9883"),
            addr("hub.lab", 9883, true)
        );
        assert_eq!(
            parse_broker("mqtt://127.0.0.1:1884"),
            addr("127.0.0.1", 1884, false)
        );
        assert_eq!(parse_broker("mqtt://broker"), addr("broker", 1883, false));
        assert_eq!(parse_broker("mqtt://[::1]:1883/"), addr("::1", 1883, false));
        assert!(parse_broker("mqtt://").is_err());
        assert_eq!(
            parse_broker("mqtt://[]:1883"),
            Err("\"mqtt://[]:1883\" names no host".into())
        );
        assert!(parse_broker("mqtt://h:port").is_err());
        assert!(parse_broker("http://h:1").is_err());
    }

    #[test]
    fn topics_round_trip() {
        assert_eq!(
            topic("pi-4", kind::TELEMETRY),
            "shoal/v1/devices/pi-4/telemetry"
        );
        assert_eq!(
            parse_topic("shoal/v1/devices/pi-4/telemetry"),
            Some(DeviceTopic {
                device_id: "pi-4",
                kind: "telemetry"
            })
        );
        assert_eq!(parse_topic("shoal/v1/devices//telemetry"), None);
        assert_eq!(parse_topic("shoal/v1/devices/a/"), None);
        assert_eq!(parse_topic("shoal/v1/devices/a/b/c"), None);
        assert_eq!(parse_topic("sensor/pi-4"), None);
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(
            subscription("shoal", kind::HELLO),
            "$share/shoal/shoal/v1/devices/+/hello"
        );
        assert_eq!(
            subscription("", kind::TELEMETRY),
            "shoal/v1/devices/+/telemetry"
        );
    }

    /// Properties over inputs a table cannot enumerate: every valid device id and kind, every
    /// string a broker flag or a topic can be.
    mod props {
        use proptest::prelude::*;

        use super::*;

        /// A valid device id: 1 to 128 of `[A-Za-z0-9._:-]` (see `crate::device_id`).
        fn device_id() -> impl Strategy<Value = String> {
            "[A-Za-z0-9._:-]{1,128}"
        }

        /// A kind: any non-empty text without '/', the known ones included.
        fn any_kind() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(kind::HELLO.to_string()),
                Just(kind::TELEMETRY.to_string()),
                Just(kind::ACKS.to_string()),
                "[^/]{1,24}",
            ]
        }

        /// A host name or IPv4 address as written in a URL (no ':', '/', '[' or ']').
        fn host() -> impl Strategy<Value = String> {
            prop_oneof![
                "[A-Za-z0-9][A-Za-z0-9.-]{0,40}",
                any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
            ]
        }

        proptest! {
            #[test]
            fn topics_round_trip(id in device_id(), k in any_kind()) {
                let t = topic(&id, &k);
                prop_assert!(crate::device_id::validate(&id).is_ok());
                prop_assert_eq!(
                    parse_topic(&t),
                    Some(DeviceTopic { device_id: &id, kind: &k })
                );
            }

            /// Whatever `parse_topic` accepts is exactly what `topic` writes for its parts.
            #[test]
            fn parse_topic_never_panics_and_accepts_only_what_topic_writes(
                s in prop_oneof![
                    any::<String>(),
                    "shoal/v1/devices/[^#]{0,20}",
                    "(shoal/v1/devices/)?[a-z/+#-]{0,12}",
                ]
            ) {
                if let Some(dt) = parse_topic(&s) {
                    prop_assert!(!dt.device_id.is_empty() && !dt.kind.is_empty());
                    prop_assert!(!dt.kind.contains('/'));
                    prop_assert_eq!(topic(dt.device_id, dt.kind), s);
                }
            }

            /// Arbitrary text never panics, and an accepted URL's scheme decides TLS.
            #[test]
            fn parse_broker_never_panics(
                s in prop_oneof![
                    any::<String>(),
                    "mqtts?://[^/]{0,24}/*",
                    "mqtts?://[\\[\\]:0-9a-f.]{0,16}(:[0-9]{0,7})?",
                ]
            ) {
                if let Ok(addr) = parse_broker(&s) {
                    prop_assert!(!addr.host.is_empty(), "{:?} parsed to an empty host", s);
                    prop_assert_eq!(addr.tls, s.starts_with("mqtts://"));
                    prop_assert!(s.starts_with("mqtt://") || s.starts_with("mqtts://"));
                }
            }

            #[test]
            fn broker_urls_round_trip(
                host in host(),
                port in any::<u16>(),
                tls in any::<bool>(),
                slashes in 0usize..3,
            ) {
                let scheme = if tls { "mqtts" } else { "mqtt" };
                let url = format!("{scheme}://{host}:{port}{}", "/".repeat(slashes));
                prop_assert_eq!(parse_broker(&url), Ok(BrokerAddr { host: host.clone(), port, tls }));
                // Without a port: the scheme's default.
                let url = format!("{scheme}://{host}");
                let default_port = if tls { 8883 } else { 1883 };
                prop_assert_eq!(parse_broker(&url), Ok(BrokerAddr { host, port: default_port, tls }));
            }

            #[test]
            fn ipv6_broker_urls_round_trip(
                ip in any::<std::net::Ipv6Addr>(),
                port in any::<u16>(),
                tls in any::<bool>(),
            ) {
                let scheme = if tls { "mqtts" } else { "mqtt" };
                let url = format!("{scheme}://[{ip}]:{port}");
                prop_assert_eq!(
                    parse_broker(&url),
                    Ok(BrokerAddr { host: ip.to_string(), port, tls })
                );
            }
        }
    }
}
