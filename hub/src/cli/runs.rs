//! `shoal runs`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::client::{CliError, Client, Output, api_error, encode, root_cause};
use super::format::*;

impl Client {
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
}

pub(super) fn runs_table(v: &Value) -> String {
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

#[derive(clap::Subcommand)]
pub enum RunsCommand {
    /// Runs, oldest first. [role: viewer]
    List {
        #[arg(long)]
        job: Option<String>,
    },
    /// One run: status, times, attempts, reason. [role: viewer]
    Show { run: String },
    /// Files a run left in its SHOAL_ARTIFACTS_DIR (a trained model, a report). [role: viewer]
    Artifacts { run: String },
    /// Download one artifact of a run. [role: viewer]
    Fetch {
        run: String,
        /// Path as `runs artifacts` lists it, e.g. model.onnx.
        path: String,
        /// Where to write it [default: its file name, here].
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// A run's output (the last attempt's). [role: viewer]
    Logs {
        run: String,
        /// Keep printing until the run has finished.
        #[arg(long)]
        follow: bool,
    },
}

impl RunsCommand {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            RunsCommand::List { job } => client.runs_list(job.as_deref(), output).await,
            RunsCommand::Show { run } => client.runs_show(&run, output).await,
            RunsCommand::Artifacts { run } => client.runs_artifacts(&run, output).await,
            RunsCommand::Fetch { run, path, to } => {
                let to = to.unwrap_or_else(|| {
                    PathBuf::from(path.rsplit('/').next().unwrap_or(path.as_str()))
                });
                client.runs_fetch(&run, &path, &to).await
            }
            RunsCommand::Logs { run, follow } => {
                let printed = client
                    .runs_logs(&run, follow, |chunk| {
                        let _ = std::io::stdout().write_all(chunk.as_bytes());
                        let _ = std::io::stdout().flush();
                    })
                    .await;
                printed.map(|()| String::new())
            }
        }
    }
}
