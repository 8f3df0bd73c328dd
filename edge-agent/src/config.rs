//! Agent configuration: a TOML file, overridden by environment variables, overridden by flags
//! (the merging happens in `main.rs` through clap; this module holds the types, the defaults in
//! one place and `validate()`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything `shoal-agent run` needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The hub's ingest endpoint: `https://HOST:PORT` for gRPC with this device's certificate
    /// (after `shoal-agent enroll`), `http://HOST:PORT` for plaintext gRPC (a hub run with
    /// `--device-auth none`), `mqtt://HOST:PORT` for MQTT (a broker the hub listens on).
    pub hub: String,
    /// MQTT user name (the broker's per-device credentials).
    pub mqtt_username: Option<String>,
    /// MQTT password; prefer `mqtt_password_file` or the SHOAL_MQTT_PASSWORD variable.
    pub mqtt_password: Option<String>,
    /// A file holding the MQTT password.
    pub mqtt_password_file: Option<PathBuf>,
    /// CA certificates (PEM) that verify the broker of an `mqtts://` hub, or an `https://`
    /// hub whose serving certificate is not from its device CA.
    pub tls_ca: Option<PathBuf>,
    /// Where this device's key, certificate and the hub's CA are kept (`shoal-agent enroll`
    /// writes them); default: beside the config file, else /etc/shoal.
    pub identity_dir: Option<PathBuf>,
    /// With an `https://` hub and no identity yet: enroll first with the token in this file
    /// (a DaemonSet mounts one per node from a Secret), trusting the hub through `ca_sha256`
    /// or `tls_ca`.
    pub enroll_token_file: Option<PathBuf>,
    /// SHA-256 (hex) of the hub's device CA certificate, for enrolling.
    pub ca_sha256: Option<String>,
    /// Resend what the hub has not acknowledged after this long.
    #[serde(with = "humantime_serde_compat")]
    pub ack_timeout: Duration,
    /// This device's id; defaults to the machine id.
    pub device_id: Option<String>,
    /// How often to sample.
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    /// Where the spool lives.
    pub spool_dir: PathBuf,
    /// Bound on the spool's size on disk, e.g. "64MiB".
    pub spool_max_size: String,
    /// Most samples in one batch to the hub.
    pub batch_max_samples: usize,
    /// Labels reported in the hello (e.g. `site = "lab"`).
    pub labels: BTreeMap<String, String>,
    /// Serve the agent's own metrics (Prometheus text format) at `http://ADDR/metrics`, e.g.
    /// `127.0.0.1:9560`; meant for a loopback address. Off when unset or empty.
    pub metrics_listen: Option<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            hub: "http://127.0.0.1:50051".into(),
            mqtt_username: None,
            mqtt_password: None,
            mqtt_password_file: None,
            tls_ca: None,
            identity_dir: None,
            enroll_token_file: None,
            ca_sha256: None,
            ack_timeout: Duration::from_secs(30),
            device_id: None,
            interval: Duration::from_secs(10),
            spool_dir: PathBuf::from("/var/lib/shoal-agent/spool"),
            spool_max_size: "64MiB".into(),
            batch_max_samples: 500,
            labels: BTreeMap::new(),
            metrics_listen: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl AgentConfig {
    /// Reads a TOML file; unknown keys are an error (a typo must not be silently ignored).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Checks every field; the first problem is returned, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let scheme = self.hub.split_once("://").map(|(s, _)| s);
        match scheme {
            Some("http" | "https") => {}
            Some("mqtt" | "mqtts") => {
                let addr =
                    shoal_proto::mqtt::parse_broker(&self.hub).map_err(|e| invalid("hub", e))?;
                if addr.tls && self.tls_ca.is_none() && !self.is_enrolled() {
                    return Err(invalid(
                        "tls-ca",
                        "an mqtts:// hub needs the CA file that signed the broker's certificate (or an enrolled device's identity)",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "hub",
                    format!(
                        "{:?} is not a URL like https://HOST:PORT (gRPC), http://HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT",
                        self.hub
                    ),
                ));
            }
        }
        if let Some(pin) = &self.ca_sha256
            && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(invalid("ca-sha256", "64 hex digits expected"));
        }
        if self.enroll_token_file.is_some() && self.ca_sha256.is_none() && self.tls_ca.is_none() {
            return Err(invalid(
                "enroll-token-file",
                "enrolling needs --ca-sha256 (or --tls-ca) to know the hub is the right one",
            ));
        }
        if let Some(id) = &self.device_id {
            shoal_proto::device_id::validate(id)
                .map_err(|e| invalid("device-id", e.to_string()))?;
        }
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(3600) {
            return Err(invalid("interval", "must be between 10ms and 1h"));
        }
        let max = self.spool_max_bytes()?;
        if max < 64 * 1024 {
            return Err(invalid("spool-max-size", "must be at least 64KiB"));
        }
        if self.ack_timeout < Duration::from_millis(100) {
            return Err(invalid("ack-timeout", "must be at least 100ms"));
        }
        if self.mqtt_password.is_some() && self.mqtt_password_file.is_some() {
            return Err(invalid(
                "mqtt-password",
                "give the password or a password file, not both",
            ));
        }
        if self.batch_max_samples == 0 || self.batch_max_samples > 10_000 {
            return Err(invalid("batch-max-samples", "must be between 1 and 10000"));
        }
        self.metrics_addr()?;
        Ok(())
    }

    /// Whether the hub is reached with this device's certificate: always over `https://`;
    /// over `mqtts://` when the device is enrolled.
    pub fn uses_identity(&self) -> bool {
        self.hub.starts_with("https://") || (self.hub.starts_with("mqtts://") && self.is_enrolled())
    }

    /// Whether the identity directory holds an identity.
    pub fn is_enrolled(&self) -> bool {
        self.identity_dir().join("identity.toml").exists()
    }

    /// Where the identity lives: `identity_dir`, else /etc/shoal (`shoal-agent run --config
    /// FILE` sets it beside FILE).
    pub fn identity_dir(&self) -> PathBuf {
        self.identity_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/shoal"))
    }

    /// Where to serve metrics; `None` when off (unset or empty).
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match self.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => crate::metrics::parse_listen(s)
                .map(Some)
                .map_err(|r| invalid("metrics-listen", r)),
        }
    }

    /// The MQTT password from the config, or read from `mqtt_password_file`.
    pub fn mqtt_password(&self) -> Result<Option<String>, ConfigError> {
        match (&self.mqtt_password, &self.mqtt_password_file) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_string()))
                .map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                }),
            (None, None) => Ok(None),
        }
    }

    pub fn spool_max_bytes(&self) -> Result<u64, ConfigError> {
        parse_size(&self.spool_max_size).map_err(|r| invalid("spool-max-size", r))
    }
}

pub use shoal_proto::size::parse as parse_size;

/// Durations in TOML as human strings ("1s", "250ms").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        AgentConfig::default().validate().unwrap();
    }

    #[test]
    fn reads_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "hub = \"http://hub:50051\"\ninterval = \"2s\"\nspool_max_size = \"8MiB\"\n[labels]\nsite = \"lab\"\n",
        )
        .unwrap();
        let c = AgentConfig::from_file(&path).unwrap();
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.spool_max_bytes().unwrap(), 8 << 20);
        assert_eq!(c.labels["site"], "lab");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "hubb = \"x\"\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("hubb"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let bad = [
            AgentConfig {
                hub: "127.0.0.1:50051".into(),
                ..Default::default()
            },
            AgentConfig {
                device_id: Some("a b".into()),
                ..Default::default()
            },
            AgentConfig {
                interval: Duration::from_millis(1),
                ..Default::default()
            },
            AgentConfig {
                spool_max_size: "12 parsecs".into(),
                ..Default::default()
            },
            AgentConfig {
                metrics_listen: Some("not-an-addr".into()),
                ..Default::default()
            },
        ];
        let fields = [
            "hub",
            "device-id",
            "interval",
            "spool-max-size",
            "metrics-listen",
        ];
        for (c, field) in bad.iter().zip(fields) {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn metrics_listen_is_off_unless_set() {
        assert_eq!(AgentConfig::default().metrics_addr().unwrap(), None);
        let blank = AgentConfig {
            metrics_listen: Some(" ".into()),
            ..Default::default()
        };
        assert_eq!(blank.metrics_addr().unwrap(), None);
        let on = AgentConfig {
            metrics_listen: Some("127.0.0.1:9560".into()),
            ..Default::default()
        };
        assert_eq!(
            on.metrics_addr().unwrap(),
            Some("127.0.0.1:9560".parse().unwrap())
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 furlongs").is_err());
    }
}
