//! `shoal datasets`.

use std::time::Duration;

use serde_json::Value;

use super::client::{CliError, Client, api_error, root_cause};

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
