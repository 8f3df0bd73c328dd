//! The device registry: who each device is, when it was first and last seen, and its status.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::v1::DeviceHello;

/// What the hub keeps about a device (persisted as JSON in the store).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub hostname: String,
    pub arch: String,
    pub os: String,
    pub kernel: String,
    pub hardware_model: String,
    pub agent_version: String,
    /// NVIDIA driver and CUDA versions (empty without an NVIDIA GPU).
    #[serde(default)]
    pub gpu_driver_version: String,
    #[serde(default)]
    pub cuda_version: String,
    pub labels: BTreeMap<String, String>,
    /// Epoch milliseconds, hub clock.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

impl DeviceRecord {
    /// Updates what the device says about itself, keeping first-seen.
    pub fn apply_hello(&mut self, hello: &DeviceHello, now_ms: i64) {
        if self.first_seen_ms == 0 {
            self.first_seen_ms = now_ms;
        }
        self.device_id.clone_from(&hello.device_id);
        self.hostname.clone_from(&hello.hostname);
        self.arch.clone_from(&hello.arch);
        self.os.clone_from(&hello.os);
        self.kernel.clone_from(&hello.kernel);
        self.hardware_model.clone_from(&hello.hardware_model);
        self.agent_version.clone_from(&hello.agent_version);
        self.gpu_driver_version
            .clone_from(&hello.gpu_driver_version);
        self.cuda_version.clone_from(&hello.cuda_version);
        self.labels = hello
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.last_seen_ms = self.last_seen_ms.max(now_ms);
    }
}

/// A device's status from the age of its last heartbeat (hello or batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Stale,
    Offline,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Online => "online",
            Status::Stale => "stale",
            Status::Offline => "offline",
        })
    }
}

/// When a silent device turns stale, then offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusThresholds {
    pub stale_after: Duration,
    pub offline_after: Duration,
}

impl Default for StatusThresholds {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(60),
            offline_after: Duration::from_secs(300),
        }
    }
}

impl StatusThresholds {
    pub fn status(&self, last_seen_ms: i64, now_ms: i64) -> Status {
        let age = Duration::from_millis(now_ms.saturating_sub(last_seen_ms).max(0) as u64);
        if age < self.stale_after {
            Status::Online
        } else if age < self.offline_after {
            Status::Stale
        } else {
            Status::Offline
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_heartbeat_age() {
        let t = StatusThresholds {
            stale_after: Duration::from_secs(30),
            offline_after: Duration::from_secs(120),
        };
        let now = 1_000_000;
        assert_eq!(t.status(now, now), Status::Online);
        assert_eq!(t.status(now - 29_999, now), Status::Online);
        assert_eq!(t.status(now - 30_000, now), Status::Stale);
        assert_eq!(t.status(now - 119_999, now), Status::Stale);
        assert_eq!(t.status(now - 120_000, now), Status::Offline);
        // A device clock ahead of the hub's is not "older than now".
        assert_eq!(t.status(now + 5_000, now), Status::Online);
    }

    #[test]
    fn hello_keeps_first_seen() {
        let mut r = DeviceRecord::default();
        let hello = DeviceHello {
            device_id: "d1".into(),
            arch: "aarch64".into(),
            ..Default::default()
        };
        r.apply_hello(&hello, 100);
        r.apply_hello(
            &DeviceHello {
                agent_version: "0.2.0".into(),
                ..hello
            },
            200,
        );
        assert_eq!(r.first_seen_ms, 100);
        assert_eq!(r.last_seen_ms, 200);
        assert_eq!(r.agent_version, "0.2.0");
    }
}
