//! `shoal store`.

use super::client::{CliError, Client, Output};
use super::format::*;

/// The hub's telemetry store: size, age, growth, retention.
#[derive(clap::Subcommand)]
pub enum StoreCommand {
    /// The store's size, oldest sample, growth rate, retention policy and what holds data back,
    /// and whether it takes writes (a full disk, a failed commit). [role: viewer]
    Status,
}

impl StoreCommand {
    pub async fn run(&self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            StoreCommand::Status => client.store_status(output).await,
        }
    }
}

impl Client {
    pub async fn store_status(&self, output: Output) -> Result<String, CliError> {
        let b = self.get("/api/v1/store", &[]).await?;
        if output == Output::Json {
            return Ok(pretty(&b));
        }
        let now = crate::store::series::now_ms();
        let size =
            |v: &serde_json::Value| v.as_f64().map_or_else(|| "-".into(), |x| bytes(Some(x)));
        let when = |v: &serde_json::Value| {
            v.as_i64().map_or_else(
                || "-".into(),
                |t| format!("{} ({})", crate::store::series::rfc3339_ms(t), ago(now, t)),
            )
        };
        let r = &b["retention"];
        let rs = &b["retention_status"];
        let mut lines = vec![
            (
                "file",
                format!("{} ({})", str_of(&b["path"]), size(&b["file_bytes"])),
            ),
            (
                "samples",
                format!("{} ({})", b["samples"], size(&b["sample_bytes"])),
            ),
            ("oldest sample", when(&b["oldest_sample_ms"])),
            ("newest sample", when(&b["newest_sample_ms"])),
            (
                "growth",
                rs["growth_bytes_per_day"].as_f64().map_or_else(
                    || "not measured yet".into(),
                    |g| format!("{}/day", bytes(Some(g))),
                ),
            ),
            (
                "retention",
                match (r["max_age_seconds"].as_u64(), r["max_size_bytes"].as_f64()) {
                    (None, None) => "keep everything (no --retention or --retention-size)".into(),
                    (age, max) => [
                        age.map(|a| {
                            format!(
                                "samples younger than {}",
                                humantime::format_duration(std::time::Duration::from_secs(a))
                            )
                        }),
                        max.map(|m| format!("file under {}", bytes(Some(m)))),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", "),
                },
            ),
            (
                "last pass",
                match rs["last_pass_ms"].as_i64() {
                    None => "none yet".into(),
                    Some(t) => format!(
                        "{}: deleted {} in {} ms ({} since start)",
                        ago(now, t),
                        rs["last_pass_deleted"],
                        rs["last_pass_took_ms"],
                        rs["deleted_total"]
                    ),
                },
            ),
        ];
        let held: Vec<String> = rs["held_back_by"]
            .as_array()
            .map(|a| a.iter().map(str_of).collect())
            .unwrap_or_default();
        lines.push((
            "held back by",
            if held.is_empty() {
                "nothing".into()
            } else {
                held.join("; ")
            },
        ));
        let ws = &b["write_state"];
        lines.push((
            "writes",
            match ws["state"].as_str() {
                Some("writable") => "taken".into(),
                Some("full") => format!(
                    "REFUSED: store full ({} free, under the {} minimum)",
                    size(&ws["free_bytes"]),
                    size(&ws["min_free_bytes"])
                ),
                Some("failed") => format!("REFUSED: last commit failed ({})", str_of(&ws["error"])),
                _ => str_of(ws),
            },
        ));
        lines.push((
            "disk free",
            format!(
                "{} (refuses writes under {})",
                size(&b["free_bytes"]),
                match b["min_free_bytes"].as_f64() {
                    Some(0.0) | None => "nothing: --min-free-space 0".into(),
                    m => size(&serde_json::json!(m)),
                }
            ),
        ));
        let mut out = String::new();
        for (k, v) in lines {
            out.push_str(&format!("{k:<14} {v}\n"));
        }
        Ok(out)
    }
}
