//! `shoal devices`.

use serde_json::Value;
use shoal_proto::metrics::Unit;

use super::client::{CliError, Client, Output, encode};
use super::format::*;

impl Client {
    pub async fn devices_list(&self, output: Output) -> Result<String, CliError> {
        let body = self.get("/api/v1/devices", &[]).await?;
        if output == Output::Json {
            return Ok(pretty(&body));
        }
        let now = crate::store::series::now_ms();
        let rows: Vec<Vec<String>> = body["devices"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|d| {
                vec![
                    str_of(&d["device_id"]),
                    str_of(&d["status"]),
                    ago(now, d["last_seen_ms"].as_i64().unwrap_or(0)),
                    str_of(&d["hostname"]),
                    str_of(&d["arch"]),
                    str_of(&d["agent_version"]),
                    d["stored_up_to_seq"].to_string(),
                    score(&d["anomaly"]),
                ]
            })
            .collect();
        if rows.is_empty() {
            return Ok("no devices have reported yet\n".into());
        }
        Ok(table(
            &[
                "DEVICE",
                "STATUS",
                "LAST SEEN",
                "HOSTNAME",
                "ARCH",
                "AGENT",
                "SEQ",
                "SCORE",
            ],
            &rows,
        ))
    }

    pub async fn devices_show(&self, id: &str, output: Output) -> Result<String, CliError> {
        let d = self
            .get(&format!("/api/v1/devices/{}", encode(id)), &[])
            .await?;
        if output == Output::Json {
            return Ok(pretty(&d));
        }
        let now = crate::store::series::now_ms();
        let mut rows = identity_rows(&d, now);
        let s = &d["latest_sample"];
        if s.is_object() {
            rows.extend(sample_rows(s));
        }
        Ok(rows
            .iter()
            .map(|r| format!("{:<18} {}\n", r[0], r[1]))
            .collect())
    }
}

/// A device's anomaly score, "-" until one is scored.
fn score(a: &Value) -> String {
    a["score"]
        .as_f64()
        .map_or_else(|| "-".into(), |s| format!("{s:.2}"))
}

/// The latest score in full: score, residual, model, when.
fn anomaly(a: &Value) -> String {
    if !a.is_object() {
        return "- (not scored)".into();
    }
    format!(
        "score {} (observed {} vs expected {} {}, residual {:+.2}) by {}:{} at {}",
        score(a),
        num(&a["observed"]),
        num(&a["expected"]),
        str_of(&a["target"]),
        a["residual"].as_f64().unwrap_or(f64::NAN),
        str_of(&a["model"]),
        str_of(&a["version"]),
        time_of(&a["time_ms"])
    )
}

impl Client {
    async fn devices_enroll(
        &self,
        name: &str,
        labels: &[(String, String)],
        ttl: &str,
        output: Output,
    ) -> Result<String, CliError> {
        let map: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let body = serde_json::json!({ "device_id": name, "labels": map, "ttl": ttl });
        let v = self
            .send_json(reqwest::Method::POST, "/api/v1/enrollments", &body)
            .await?;
        if output == Output::Json {
            return Ok(pretty(&v));
        }
        Ok(format!(
            "On the device, run (the token works once, until {}):\n\n  {}\n\nToken (shown once): {}\n",
            rfc3339_of(&v["expires_ms"]),
            str_of(&v["command"]),
            str_of(&v["token"]),
        ))
    }

    async fn devices_identities(&self, output: Output) -> Result<String, CliError> {
        let v = self.get("/api/v1/identities", &[]).await?;
        if output == Output::Json {
            return Ok(pretty(&v));
        }
        let rows: Vec<Vec<String>> = v
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|i| {
                let state = if i["revoked_ms"].is_i64() {
                    "revoked"
                } else {
                    "active"
                };
                vec![
                    str_of(&i["device_id"]),
                    state.to_string(),
                    rfc3339_of(&i["not_after_s"].as_i64().map(|s| s * 1000).into()),
                    str_of(&i["serial"]),
                ]
            })
            .collect();
        if rows.is_empty() {
            return Ok("no device has enrolled yet (shoal devices enroll)\n".into());
        }
        Ok(table(&["DEVICE", "STATE", "CERT EXPIRES", "SERIAL"], &rows))
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// A time in ms as RFC 3339, or "-" when absent.
fn rfc3339_of(ms: &Value) -> String {
    ms.as_i64()
        .map_or_else(|| "-".into(), crate::store::series::rfc3339_ms)
}

/// `devices show`'s rows for what the device is: identity, status, versions and labels.
fn identity_rows(d: &Value, now: i64) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["device".into(), str_of(&d["device_id"])],
        vec!["status".into(), str_of(&d["status"])],
        vec![
            "last seen".into(),
            ago(now, d["last_seen_ms"].as_i64().unwrap_or(0)),
        ],
        vec![
            "first seen".into(),
            ago(now, d["first_seen_ms"].as_i64().unwrap_or(0)),
        ],
        vec!["hostname".into(), str_of(&d["hostname"])],
        vec!["hardware".into(), str_of(&d["hardware_model"])],
        vec![
            "os".into(),
            format!("{} (kernel {})", str_of(&d["os"]), str_of(&d["kernel"])),
        ],
        vec!["arch".into(), str_of(&d["arch"])],
        vec!["agent".into(), str_of(&d["agent_version"])],
        vec!["gpu driver".into(), str_of(&d["gpu_driver_version"])],
        vec!["cuda".into(), str_of(&d["cuda_version"])],
        vec!["stored up to seq".into(), d["stored_up_to_seq"].to_string()],
        vec!["anomaly".into(), anomaly(&d["anomaly"])],
    ];
    if let Some(labels) = d["labels"].as_object().filter(|l| !l.is_empty()) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", str_of(v)))
            .collect();
        rows.push(vec!["labels".into(), l.join(", ")]);
    }
    rows
}

/// `devices show`'s rows for the latest sample: CPU, load, memory, disks, sensors, GPUs, Pi.
/// A reading the device did not send shows as "-", never as zero.
fn sample_rows(s: &Value) -> Vec<Vec<String>> {
    let fixed = |v: &Value, digits: usize| {
        v.as_f64()
            .map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
    };
    let of = |used: &Value, total: &Value| match (used.as_f64(), total.as_f64()) {
        (None, None) => "-".to_string(),
        (u, t) => format!("{} of {}", bytes(u), bytes(t)),
    };
    let load = &s["load"];
    let mut rows = vec![
        vec![
            "cpu".into(),
            with_unit(&s["cpu"]["total_percent"], Unit::Percent),
        ],
        vec![
            "load".into(),
            if load.is_object() {
                format!(
                    "{} {} {}",
                    fixed(&load["one"], 2),
                    fixed(&load["five"], 2),
                    fixed(&load["fifteen"], 2)
                )
            } else {
                "-".into()
            },
        ],
        vec![
            "memory".into(),
            of(&s["memory"]["used_bytes"], &s["memory"]["total_bytes"]),
        ],
    ];
    for disk in list(&s["disks"]) {
        rows.push(vec![
            format!("disk {}", str_of(&disk["mount_point"])),
            of(&disk["used_bytes"], &disk["total_bytes"]),
        ]);
    }
    for t in list(&s["temperatures"]) {
        rows.push(vec![
            format!("temp {}", str_of(&t["sensor"])),
            with_unit(&t["celsius"], Unit::Celsius),
        ]);
    }
    rows.push(vec![
        "processes".into(),
        s["process_count"]
            .as_u64()
            .map_or_else(|| "-".into(), |n| n.to_string()),
    ]);
    for g in list(&s["gpus"]) {
        rows.push(vec![
            format!("gpu {} ({})", g["index"], str_of(&g["source"])),
            format!(
                "{} · {} · {} · {} · {} MHz",
                str_of(&g["name"]),
                fixed(&g["utilization_percent"], 0) + "%",
                of(&g["memory_used_bytes"], &g["memory_total_bytes"]),
                with_unit(&g["temperature_celsius"], Unit::Celsius),
                g["sm_clock_mhz"]
            ),
        ]);
    }
    let pi = &s["pi"];
    if pi.is_object() {
        let flags = match (
            pi["throttled_known"].as_bool(),
            pi["throttled_flags"].as_u64(),
        ) {
            (Some(true), Some(f)) => format!("throttle flags {f:#x}"),
            _ => "throttle flags unknown".into(),
        };
        rows.push(vec![
            "pi".into(),
            format!(
                "SoC {} · {} MHz · {flags}",
                with_unit(&pi["soc_temperature_celsius"], Unit::Celsius),
                pi["cpu_frequency_mhz"],
            ),
        ]);
    }
    rows
}

/// A JSON array's items; none when `v` is not an array.
fn list(v: &Value) -> &[Value] {
    v.as_array().map(|a| a.as_slice()).unwrap_or_default()
}

#[derive(clap::Subcommand)]
pub enum DevicesCommand {
    /// Every device with its status (online / stale / offline) and last heartbeat. [role: viewer]
    List,
    /// One device: identity, status and its latest sample. [role: viewer]
    Show { id: String },
    /// Make a one-time token that enrolls a device, and print the command to run on it.
    /// [role: admin]
    ///
    /// The device makes its own key and gets a certificate naming it; the hub then takes its
    /// telemetry only with that certificate. Example:
    ///   shoal devices enroll --name pi-7 --labels site=lab,rack=3 --ttl 24h
    Enroll {
        /// The device id it gets (letters, digits, '.', '_', '-', ':').
        #[arg(long)]
        name: String,
        /// Labels it reports, KEY=VALUE[,KEY=VALUE...]; repeatable.
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How long the token can be used.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Revoke a device: its certificate stops working at its next request. What it stored
    /// stays, and so does its spool on the device; enrolling it again lets it back in.
    /// [role: admin]
    Revoke { id: String },
    /// Enrolled devices' certificates: serial, expiry, last renewal, revocation. [role: viewer]
    Identities,
}

impl DevicesCommand {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            DevicesCommand::List => client.devices_list(output).await,
            DevicesCommand::Show { id } => client.devices_show(&id, output).await,
            DevicesCommand::Enroll { name, labels, ttl } => {
                client.devices_enroll(&name, &labels, &ttl, output).await
            }
            DevicesCommand::Revoke { id } => {
                let v = client
                    .send(
                        reqwest::Method::POST,
                        &format!("/api/v1/devices/{}/revoke", encode(&id)),
                        None,
                    )
                    .await?;
                Ok(if output == Output::Json {
                    pretty(&v)
                } else {
                    format!(
                        "revoked {}: it is refused from its next request on; its data and spool are kept\n",
                        str_of(&v["device_id"])
                    )
                })
            }
            DevicesCommand::Identities => client.devices_identities(output).await,
        }
    }
}
