//! `shoal datasets`.

use std::time::Duration;

use serde_json::Value;

use super::client::{CliError, Client, Output, api_error, root_cause};

impl Client {
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
}

#[derive(clap::Subcommand)]
pub enum DatasetsCommand {
    /// Write a window of telemetry as Parquet files plus manifest.json (schema, rows, time
    /// range, devices, SHA-256 of every file) to a folder or an S3 bucket [role: scientist].
    ///
    /// The hub writes it:
    /// a folder is on the hub's machine, and s3:// uses the hub's AWS_* environment
    /// (AWS_ENDPOINT_URL for MinIO or Garage). See docs/datasets.md.
    ///
    ///   shoal datasets export --since 1h --to ./datasets/last-hour
    ///   shoal datasets export --since 24h --devices arch=aarch64 --to s3://telemetry/pi/day
    Export {
        /// Start of the window: a duration back from now (1h, 7d), RFC 3339 or epoch ms.
        #[arg(long)]
        since: String,
        /// End of the window [default: now].
        #[arg(long)]
        until: Option<String>,
        /// Which devices: key=value / key!=value, comma-separated, over labels and id, arch,
        /// os, model, hostname [default: all].
        #[arg(long)]
        devices: Option<String>,
        /// Destination: a folder, file:///…, or s3://BUCKET/PREFIX.
        #[arg(long)]
        to: String,
    },
}

impl DatasetsCommand {
    /// Runs the export with a progress bar on stderr (drawn only on a terminal).
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        let DatasetsCommand::Export {
            since,
            until,
            devices,
            to,
        } = self;
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "exporting {bar:30} {human_pos}/{human_len} rows, {per_sec}, eta {eta}",
            )
            .expect("template"),
        );
        let request = serde_json::json!({
            "since": since, "until": until, "devices": devices, "to": to,
        });
        let result = client
            .datasets_export(request, |rows, total| {
                bar.set_length(total);
                bar.set_position(rows);
            })
            .await;
        bar.finish_and_clear();
        result.map(|m| match output {
            Output::Json => serde_json::to_string_pretty(&m).unwrap_or_default(),
            Output::Table => format!(
                "dataset written to {to}: {} rows from {} device(s) in {} file(s); digest {}",
                m["rows"],
                m["devices"].as_array().map_or(0, Vec::len),
                m["files"].as_array().map_or(0, Vec::len),
                serde_json::from_value::<shoal_ml::dataset::Manifest>(m.clone())
                    .map(|m| m.digest())
                    .unwrap_or_default(),
            ),
        })
    }
}
