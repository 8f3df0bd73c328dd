//! Who may connect to the embedded broker, and what each client may publish and subscribe.
//!
//! The users file has one `NAME:PASSWORD[:ROLE]` per line (`#` starts a comment). ROLE is
//! `device` (the default: NAME is the device id) or `observer` (may subscribe to anything,
//! publish nothing — for dashboards and `mosquitto_sub`). Over TLS, a device may instead show
//! the certificate it got at enrollment: the certificate names it. Without either, on a
//! broker that allows it (a loopback address, or `--device-auth none`), anyone may connect and
//! a client's id stands for its device id.

use std::collections::HashMap;
use std::path::Path;

use shoal_proto::mqtt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Device,
    Observer,
}

#[derive(Debug, Clone)]
pub struct Users {
    users: HashMap<String, (String, Role)>,
}

/// Who a connected client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The device id (user name, or client id when anonymous).
    pub name: String,
    pub role: Role,
    /// False when the broker runs without a users file and the client showed no certificate.
    pub authenticated: bool,
    /// Authenticated by a device certificate (checked again for revocation on every publish).
    pub by_certificate: bool,
}

impl Users {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(3, ':');
            let (Some(name), Some(password)) = (parts.next(), parts.next()) else {
                return Err(format!("line {}: expected NAME:PASSWORD[:ROLE]", i + 1));
            };
            let role = match parts.next() {
                None | Some("device") => Role::Device,
                Some("observer") => Role::Observer,
                Some(other) => {
                    return Err(format!(
                        "line {}: unknown role {other:?} (device or observer)",
                        i + 1
                    ));
                }
            };
            if role == Role::Device {
                shoal_proto::device_id::validate(name)
                    .map_err(|e| format!("line {}: {e}", i + 1))?;
            }
            if password.is_empty() {
                return Err(format!("line {}: empty password for {name:?}", i + 1));
            }
            users.insert(name.to_string(), (password.to_string(), role));
        }
        Ok(Self { users })
    }

    /// Checks a login; constant-time in the password so timing tells nothing.
    pub fn check(&self, username: &str, password: &str) -> Option<Role> {
        let (expected, role) = self.users.get(username)?;
        let same = expected.len() == password.len()
            && expected
                .bytes()
                .zip(password.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some(*role)
    }
}

/// May `who` publish on `topic`? `Err` says why not. `json_topic`: the topic is one of the
/// plain JSON form's, whose last level must be the publisher's own device id.
pub fn may_publish(who: &Identity, topic: &str, json_topic: bool) -> Result<(), String> {
    if who.role == Role::Observer {
        return Err("observers may not publish".into());
    }
    if let Some(rest) = topic.strip_prefix(mqtt::DEVICE_TOPIC_PREFIX) {
        let (device, kind) = rest.split_once('/').unwrap_or((rest, ""));
        if device != who.name {
            return Err(format!(
                "{:?} may not publish under device {device:?}'s topic",
                who.name
            ));
        }
        return match kind {
            mqtt::kind::HELLO | mqtt::kind::TELEMETRY => Ok(()),
            _ => Err(format!(
                "devices publish only hello and telemetry, not {kind:?}"
            )),
        };
    }
    if json_topic && who.authenticated {
        let last = topic.rsplit('/').next().unwrap_or_default();
        return if last == who.name {
            Ok(())
        } else {
            Err(format!(
                "{:?} may not publish JSON for device {last:?}",
                who.name
            ))
        };
    }
    if who.authenticated {
        Err(format!("{topic:?} is not a device topic"))
    } else {
        Ok(())
    }
}

/// May `who` subscribe to `filter`?
pub fn may_subscribe(who: &Identity, filter: &str) -> bool {
    if who.role == Role::Observer || !who.authenticated {
        return true;
    }
    filter == mqtt::topic(&who.name, mqtt::kind::ACKS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, authenticated: bool) -> Identity {
        Identity {
            name: name.into(),
            role: Role::Device,
            authenticated,
            by_certificate: false,
        }
    }

    #[test]
    fn parses_users() {
        let u = Users::parse("# fleet\npi-1:s3cret\ngrafana:pw:observer\n\n").unwrap();
        assert_eq!(u.check("pi-1", "s3cret"), Some(Role::Device));
        assert_eq!(u.check("pi-1", "wrong"), None);
        assert_eq!(u.check("grafana", "pw"), Some(Role::Observer));
        assert_eq!(u.check("nobody", "x"), None);
        assert!(Users::parse("pi 1:x").unwrap_err().contains("line 1"));
        assert!(
            Users::parse("a:b:admin")
                .unwrap_err()
                .contains("unknown role")
        );
        assert!(Users::parse("justname").is_err());
        assert!(Users::parse("a:").is_err());
    }

    #[test]
    fn devices_publish_only_under_their_own_topic() {
        let d = device("pi-1", true);
        assert!(may_publish(&d, "shoal/v1/devices/pi-1/telemetry", false).is_ok());
        assert!(may_publish(&d, "shoal/v1/devices/pi-1/hello", false).is_ok());
        assert!(
            may_publish(&d, "shoal/v1/devices/pi-2/telemetry", false)
                .unwrap_err()
                .contains("pi-2")
        );
        assert!(
            may_publish(&d, "shoal/v1/devices/pi-1/acks", false).is_err(),
            "only the hub acks"
        );
        assert!(may_publish(&d, "random/topic", false).is_err());
        assert!(
            may_publish(&device("pi-1", false), "random/topic", false).is_ok(),
            "open broker without users"
        );
        let obs = Identity {
            name: "g".into(),
            role: Role::Observer,
            authenticated: true,
            by_certificate: false,
        };
        assert!(may_publish(&obs, "shoal/v1/devices/g/telemetry", false).is_err());
    }

    #[test]
    fn devices_subscribe_only_to_their_acks() {
        let d = device("pi-1", true);
        assert!(may_subscribe(&d, "shoal/v1/devices/pi-1/acks"));
        assert!(!may_subscribe(&d, "shoal/v1/devices/+/acks"));
        assert!(!may_subscribe(&d, "#"));
        let obs = Identity {
            name: "g".into(),
            role: Role::Observer,
            authenticated: true,
            by_certificate: false,
        };
        assert!(may_subscribe(&obs, "shoal/v1/devices/+/telemetry"));
    }
}
