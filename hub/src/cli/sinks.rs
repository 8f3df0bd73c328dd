//! `shoal sinks`.

use super::client::{CliError, Client, Output};
use super::format::*;

/// Where the hub forwards what it stores (`shoal serve --sink`).
#[derive(clap::Subcommand)]
pub enum SinksCommand {
    /// Every sink: how far it has delivered, its lag (entries and seconds), its errors and
    /// dead letters. [role: viewer]
    Status,
}

impl SinksCommand {
    pub async fn run(&self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            SinksCommand::Status => client.sinks_status(output).await,
        }
    }
}

impl Client {
    pub async fn sinks_status(&self, output: Output) -> Result<String, CliError> {
        let body = self.get("/api/v1/sinks", &[]).await?;
        if output == Output::Json {
            return Ok(pretty(&body));
        }
        let sinks = body["sinks"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default();
        if sinks.is_empty() {
            return Ok(
                "this hub forwards nothing (no --sink); see `shoal serve --help`\n".to_string(),
            );
        }
        let now = crate::store::series::now_ms();
        let rows: Vec<Vec<String>> = sinks
            .iter()
            .map(|s| {
                vec![
                    str_of(&s["name"]),
                    str_of(&s["url"]),
                    str_of(&s["state"]),
                    format!("{}/{}", s["cursor"], s["committed"]),
                    s["lag_entries"].to_string(),
                    format!("{:.1}s", s["lag_seconds"].as_f64().unwrap_or(0.0)),
                    s["delivered_total"].to_string(),
                    s["dead_letters_total"].to_string(),
                    s["errors_total"].to_string(),
                    s["last_delivery_ms"]
                        .as_i64()
                        .map_or_else(|| "never".into(), |t| ago(now, t)),
                ]
            })
            .collect();
        let mut out = table(
            &[
                "NAME",
                "URL",
                "STATE",
                "DELIVERED/STORED",
                "LAG",
                "LAG AGE",
                "SENT",
                "DEAD",
                "ERRORS",
                "LAST DELIVERY",
            ],
            &rows,
        );
        for s in sinks {
            if let Some(e) = s["last_error"].as_str() {
                let at = s["last_error_ms"]
                    .as_i64()
                    .map_or_else(String::new, |t| ago(now, t));
                out.push_str(&format!("{}: last error ({at}): {e}\n", str_of(&s["name"])));
            }
            if let Some(f) = s["dead_letter_file"].as_str() {
                out.push_str(&format!("{}: dead letters in {f}\n", str_of(&s["name"])));
            }
        }
        Ok(out)
    }
}
