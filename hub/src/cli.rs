//! Operator commands: talk to a hub's REST API and print tables (or JSON with `--output json`).

use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach the hub at {url}: {reason}. Is `shoal serve` (or `shoal up`) running there? Set --hub or SHOAL_HUB_URL."
    )]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Api(String),
    #[error("the hub answered something that is not JSON: {0}")]
    BadAnswer(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Self {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        self.request(reqwest::Method::GET, path, query, None).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Value, CliError> {
        self.request(method, path, &[], body).await
    }

    /// One REST call; a non-2xx answer becomes the API's own error message.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<String>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).query(query);
        if let Some(b) = body {
            req = req.header("content-type", "application/yaml").body(b);
        }
        let resp = req.send().await.map_err(|e| CliError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| CliError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            let msg = body["error"]
                .as_str()
                .unwrap_or("request failed")
                .to_string();
            return Err(CliError::Api(format!("{msg} (HTTP {status})")));
        }
        Ok(body)
    }

    async fn get_text(&self, path: &str) -> Result<String, CliError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| CliError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| CliError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            return Err(api_error(status, text.as_bytes()));
        }
        Ok(text)
    }

    /// `jobs apply -f FILE`: the CronJob manifest as YAML or JSON.
    pub async fn jobs_apply(&self, manifest: String, output: Output) -> Result<String, CliError> {
        let v = self
            .send(reqwest::Method::POST, "/api/v1/jobs", Some(manifest))
            .await?;
        Ok(if output == Output::Json {
            pretty(&v)
        } else {
            format!("job {} applied\n", str_of(&v["job"]))
        })
    }

    pub async fn jobs_list(&self, output: Output) -> Result<String, CliError> {
        let v = self.get("/api/v1/jobs", &[]).await?;
        if output == Output::Json {
            return Ok(pretty(&v));
        }
        let rows: Vec<Vec<String>> = v["jobs"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|j| {
                vec![
                    str_of(&j["name"]),
                    str_of(&j["schedule"]),
                    str_of(&j["time_zone"]),
                    str_of(&j["concurrency_policy"]),
                    if j["suspend"].as_bool() == Some(true) {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                    time_of(&j["last_schedule_ms"]),
                    time_of(&j["next_schedule_ms"]),
                ]
            })
            .collect();
        if rows.is_empty() {
            return Ok("no jobs; add one with `shoal jobs apply -f cronjob.yaml`\n".into());
        }
        Ok(table(
            &[
                "JOB",
                "SCHEDULE",
                "TIME ZONE",
                "CONCURRENCY",
                "SUSPENDED",
                "LAST SCHEDULE",
                "NEXT",
            ],
            &rows,
        ))
    }

    pub async fn jobs_show(&self, name: &str, output: Output) -> Result<String, CliError> {
        let v = self
            .get(&format!("/api/v1/jobs/{}", encode(name)), &[])
            .await?;
        if output == Output::Json {
            return Ok(pretty(&v));
        }
        let mut out = String::new();
        for key in [
            "name",
            "schedule",
            "time_zone",
            "concurrency_policy",
            "suspend",
        ] {
            out.push_str(&format!(
                "{:<18} {}\n",
                key.replace('_', " "),
                str_of(&v[key])
            ));
        }
        out.push_str(&format!(
            "{:<18} {}\n",
            "last schedule",
            time_of(&v["last_schedule_ms"])
        ));
        out.push_str(&format!(
            "{:<18} {}\n",
            "next schedule",
            time_of(&v["next_schedule_ms"])
        ));
        let runs = self
            .get("/api/v1/runs", &[("job", name.to_string())])
            .await?;
        out.push_str(&format!("\nruns\n{}", runs_table(&runs)));
        Ok(out)
    }

    /// `jobs run|suspend|resume|delete NAME`.
    pub async fn jobs_action(
        &self,
        name: &str,
        action: &str,
        output: Output,
    ) -> Result<String, CliError> {
        let (method, path) = match action {
            "delete" => (
                reqwest::Method::DELETE,
                format!("/api/v1/jobs/{}", encode(name)),
            ),
            other => (
                reqwest::Method::POST,
                format!("/api/v1/jobs/{}/{other}", encode(name)),
            ),
        };
        let v = self.send(method, &path, None).await?;
        if output == Output::Json {
            return Ok(pretty(&v));
        }
        Ok(match action {
            "run" => format!("started run {}\n", str_of(&v["run"])),
            "delete" => format!("job {name} deleted\n"),
            _ => format!("job {name} {action}d\n"),
        })
    }

    /// `jobs export NAME [--job]`: the Kubernetes object as JSON.
    pub async fn jobs_export(&self, name: &str, as_job: bool) -> Result<String, CliError> {
        let kind = if as_job { "job" } else { "cronjob" };
        self.get_text(&format!("/api/v1/jobs/{}/export?kind={kind}", encode(name)))
            .await
    }

    pub async fn runs_list(&self, job: Option<&str>, output: Output) -> Result<String, CliError> {
        let q: Vec<(&str, String)> = job
            .map(|j| vec![("job", j.to_string())])
            .unwrap_or_default();
        let v = self.get("/api/v1/runs", &q).await?;
        Ok(if output == Output::Json {
            pretty(&v)
        } else {
            runs_table(&v)
        })
    }

    pub async fn runs_show(&self, id: &str, output: Output) -> Result<String, CliError> {
        let v = self
            .get(&format!("/api/v1/runs/{}", encode(id)), &[])
            .await?;
        if output == Output::Json {
            return Ok(pretty(&v));
        }
        let mut out = String::new();
        for (k, val) in [
            ("run", str_of(&v["id"])),
            ("job", str_of(&v["job"])),
            ("status", str_of(&v["status"])),
            ("scheduled", time_of(&v["scheduled_ms"])),
            ("started", time_of(&v["started_ms"])),
            ("finished", time_of(&v["finished_ms"])),
            ("attempts", v["attempts"].to_string()),
            ("reason", v["reason"].as_str().unwrap_or("").to_string()),
        ] {
            if !val.is_empty() {
                out.push_str(&format!("{k:<10} {val}\n"));
            }
        }
        Ok(out)
    }

    /// The run's output; with `follow`, keeps printing until the run has finished.
    pub async fn runs_logs(
        &self,
        id: &str,
        follow: bool,
        mut sink: impl FnMut(&str),
    ) -> Result<(), CliError> {
        let mut shown = 0usize;
        loop {
            let run = self
                .get(&format!("/api/v1/runs/{}", encode(id)), &[])
                .await?;
            let text = self
                .get_text(&format!("/api/v1/runs/{}/logs", encode(id)))
                .await?;
            if text.len() > shown {
                sink(&text[shown..]);
                shown = text.len();
            }
            if !follow || run["status"] != "running" {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            if text.len() < shown {
                // A new attempt started: its log begins anew.
                shown = 0;
            }
        }
    }

    pub async fn runs_artifacts(&self, id: &str, output: Output) -> Result<String, CliError> {
        let v = self
            .get(&format!("/api/v1/runs/{}/artifacts", encode(id)), &[])
            .await?;
        if output == Output::Json {
            return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        let rows: Vec<Vec<String>> = v["artifacts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| {
                        vec![
                            f["path"].as_str().unwrap_or_default().to_string(),
                            f["bytes"].to_string(),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(table(&["PATH", "BYTES"], &rows))
    }

    pub async fn runs_fetch(
        &self,
        id: &str,
        path: &str,
        to: &std::path::Path,
    ) -> Result<String, CliError> {
        if path
            .split('/')
            .any(|p| p.is_empty() || p == ".." || p == ".")
        {
            return Err(CliError::Api(format!(
                "{path:?} is not a path inside the run's artifacts (see `shoal runs artifacts {id}`)"
            )));
        }
        let url = format!(
            "{}/api/v1/runs/{}/artifacts/{}",
            self.base,
            encode(id),
            path.split('/').map(encode).collect::<Vec<_>>().join("/")
        );
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .map_err(|e| CliError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        std::fs::write(to, &bytes).map_err(|e| CliError::Api(format!("{}: {e}", to.display())))?;
        Ok(format!("{} bytes written to {}", bytes.len(), to.display()))
    }

    /// `datasets export`: streams the hub's progress lines into `progress(rows, total)` and
    /// returns the manifest.
    pub async fn datasets_export(
        &self,
        request: Value,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Value, CliError> {
        let url = format!("{}/api/v1/datasets/export", self.base);
        let unreachable = |e: reqwest::Error| CliError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        };
        let mut resp = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(7 * 24 * 3600))
            .json(&request)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status, &body));
        }
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let v: Value = serde_json::from_slice(&line)
                    .map_err(|e| CliError::BadAnswer(e.to_string()))?;
                if let Some(p) = v.get("progress") {
                    progress(
                        p["rows"].as_u64().unwrap_or(0),
                        p["total"].as_u64().unwrap_or(0),
                    );
                } else if let Some(m) = v.get("manifest") {
                    return Ok(m.clone());
                } else if let Some(e) = v.get("error") {
                    return Err(CliError::Api(format!(
                        "export failed: {}",
                        e.as_str().unwrap_or_default()
                    )));
                }
            }
        }
        Err(CliError::BadAnswer(
            "the export ended without a manifest (did the hub stop?)".into(),
        ))
    }

    pub async fn devices_list(&self, output: Output) -> Result<String, CliError> {
        let body = self.get("/api/v1/devices", &[]).await?;
        if output == Output::Json {
            return Ok(pretty(&body));
        }
        let now = crate::now_ms();
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
        let now = crate::now_ms();
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
        ];
        if let Some(labels) = d["labels"].as_object().filter(|l| !l.is_empty()) {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}={}", str_of(v)))
                .collect();
            rows.push(vec!["labels".into(), l.join(", ")]);
        }
        let s = &d["latest_sample"];
        if s.is_object() {
            rows.push(vec![
                "cpu".into(),
                format!("{:.1}%", s["cpu"]["total_percent"].as_f64().unwrap_or(0.0)),
            ]);
            rows.push(vec![
                "load".into(),
                format!(
                    "{:.2} {:.2} {:.2}",
                    s["load"]["one"].as_f64().unwrap_or(0.0),
                    s["load"]["five"].as_f64().unwrap_or(0.0),
                    s["load"]["fifteen"].as_f64().unwrap_or(0.0)
                ),
            ]);
            let m = &s["memory"];
            rows.push(vec![
                "memory".into(),
                format!(
                    "{} of {}",
                    bytes(m["used_bytes"].as_f64()),
                    bytes(m["total_bytes"].as_f64())
                ),
            ]);
            for disk in s["disks"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
            {
                rows.push(vec![
                    format!("disk {}", str_of(&disk["mount_point"])),
                    format!(
                        "{} of {}",
                        bytes(disk["used_bytes"].as_f64()),
                        bytes(disk["total_bytes"].as_f64())
                    ),
                ]);
            }
            for t in s["temperatures"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
            {
                rows.push(vec![
                    format!("temp {}", str_of(&t["sensor"])),
                    format!("{:.1} °C", t["celsius"].as_f64().unwrap_or(0.0)),
                ]);
            }
            rows.push(vec!["processes".into(), s["process_count"].to_string()]);
            for g in s["gpus"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
            {
                rows.push(vec![
                    format!("gpu {} ({})", g["index"], str_of(&g["source"])),
                    format!(
                        "{} · {:.0}% · {} of {} · {:.0} °C · {} MHz",
                        str_of(&g["name"]),
                        g["utilization_percent"].as_f64().unwrap_or(0.0),
                        bytes(g["memory_used_bytes"].as_f64()),
                        bytes(g["memory_total_bytes"].as_f64()),
                        g["temperature_celsius"].as_f64().unwrap_or(0.0),
                        g["sm_clock_mhz"]
                    ),
                ]);
            }
            if s["pi"].is_object() {
                let pi = &s["pi"];
                rows.push(vec![
                    "pi".into(),
                    format!(
                        "SoC {:.1} °C · {} MHz · throttle flags {:#x}",
                        pi["soc_temperature_celsius"].as_f64().unwrap_or(0.0),
                        pi["cpu_frequency_mhz"],
                        pi["throttled_flags"].as_u64().unwrap_or(0)
                    ),
                ]);
            }
        }
        Ok(rows
            .iter()
            .map(|r| format!("{:<18} {}\n", r[0], r[1]))
            .collect())
    }

    pub async fn telemetry(
        &self,
        id: &str,
        metric: &str,
        since: Duration,
        step: Option<Duration>,
        output: Output,
    ) -> Result<String, CliError> {
        let mut q = vec![
            ("metric", metric.to_string()),
            ("from", humantime::format_duration(since).to_string()),
        ];
        if let Some(step) = step {
            q.push(("step", humantime::format_duration(step).to_string()));
        }
        let body = self
            .get(&format!("/api/v1/devices/{}/series", encode(id)), &q)
            .await?;
        if output == Output::Json {
            return Ok(pretty(&body));
        }
        let rows: Vec<Vec<String>> = body["points"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let t = std::time::UNIX_EPOCH + Duration::from_millis(p["t"].as_u64().unwrap_or(0));
                vec![
                    humantime::format_rfc3339_seconds(t).to_string(),
                    num(&p["avg"]),
                    num(&p["min"]),
                    num(&p["max"]),
                    p["count"].to_string(),
                ]
            })
            .collect();
        if rows.is_empty() {
            return Ok(format!(
                "no {metric} values for {id} in the last {}\n",
                humantime::format_duration(since)
            ));
        }
        Ok(table(&["TIME", "AVG", "MIN", "MAX", "SAMPLES"], &rows))
    }
}

fn runs_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["runs"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                str_of(&r["id"]),
                str_of(&r["job"]),
                str_of(&r["status"]),
                time_of(&r["scheduled_ms"]),
                r["attempts"].as_array().map_or(0, |a| a.len()).to_string(),
                r["reason"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no runs yet\n".into();
    }
    table(
        &["RUN", "JOB", "STATUS", "SCHEDULED", "ATTEMPTS", "REASON"],
        &rows,
    )
}

/// An epoch-milliseconds field as RFC 3339, or "-".
fn time_of(v: &Value) -> String {
    v.as_i64().map_or_else(
        || "-".into(),
        |ms| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
            )
            .to_string()
        },
    )
}

fn root_cause(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// Percent-encodes a path segment (device ids are already URL-safe; this guards typos).
/// A non-2xx answer as the API's own message (its JSON `error`, else the body as text).
fn api_error(status: reqwest::StatusCode, body: &[u8]) -> CliError {
    let msg = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    CliError::Api(format!("{msg} (HTTP {status})"))
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'-' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("json value serialises");
    s.push('\n');
    s
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.2}"))
}

fn bytes(v: Option<f64>) -> String {
    let v = v.unwrap_or(0.0);
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v;
    let mut i = 0;
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    format!("{x:.1} {}", units[i])
}

fn ago(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "never".into();
    }
    let secs = ((now_ms - then_ms).max(0) / 1000) as u64;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            l.extend(std::iter::repeat_n(' ', w - c.chars().count()));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn formats_units() {
        assert_eq!(bytes(Some(1536.0)), "1.5 KiB");
        assert_eq!(ago(10_000, 0), "never");
        assert_eq!(ago(70_000, 10_000), "1m ago");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
