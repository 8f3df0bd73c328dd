//! `shoal telemetry`.

use std::time::Duration;

use super::client::{CliError, Client, Output, encode};
use super::format::*;

impl Client {
    pub async fn telemetry(
        &self,
        id: &str,
        metric: &str,
        since: Duration,
        step: Option<Duration>,
        output: Output,
    ) -> Result<String, CliError> {
        // Checked here too, so a typo is named before any request (the hub refuses it anyway).
        let unit = shoal_proto::metrics::family_of(metric)
            .map_err(|e| CliError::Api(e.to_string()))?
            .unit;
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
                vec![
                    crate::store::series::rfc3339_ms(p["t"].as_i64().unwrap_or(0)),
                    with_unit(&p["avg"], unit),
                    with_unit(&p["min"], unit),
                    with_unit(&p["max"], unit),
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

/// `shoal telemetry`'s arguments.
#[derive(clap::Args)]
pub struct TelemetryArgs {
    /// Device id.
    pub id: String,
    /// Metric name, e.g. cpu_percent or disk_used_bytes{mount="/"} (docs/telemetry.md).
    #[arg(long)]
    pub metric: String,
    /// How far back, e.g. 15m, 1h, 2d.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub since: Duration,
    /// Bucket width [default: about 120 buckets over the range].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub step: Option<Duration>,
}

impl TelemetryArgs {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        client
            .telemetry(&self.id, &self.metric, self.since, self.step, output)
            .await
    }
}
