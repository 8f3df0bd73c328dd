//! `shoal jobs`.

use std::path::PathBuf;

use super::client::{CliError, Client, Output, encode};
use super::format::*;
use super::runs::runs_table;

impl Client {
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
}

#[derive(clap::Subcommand)]
pub enum JobsCommand {
    /// Create or update a job from a Kubernetes CronJob manifest (YAML or JSON; `-` reads stdin). [role: scientist]
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Every job with its schedule, last and next start. [role: viewer]
    List,
    /// One job and its runs. [role: viewer]
    Show { name: String },
    /// Start a run now, whatever the schedule. [role: scientist]
    Run { name: String },
    /// No new runs until resumed (a run in progress goes on). [role: scientist]
    Suspend { name: String },
    /// Runs start again on the schedule. [role: scientist]
    Resume { name: String },
    /// Remove a job (its active runs are stopped). [role: scientist]
    Delete { name: String },
    /// Print a built-in job's manifest (without NAME: list them), ready for `jobs apply -f -`:
    ///
    ///   shoal jobs template dataset-export | shoal jobs apply -f -
    Template {
        name: Option<String>,
        /// Deploy the model each run trains to the hub (`shoal models deploy`), so scores
        /// come from the newest model.
        #[arg(long)]
        auto_deploy: bool,
    },
    /// Print the job as a Kubernetes object (JSON, which `kubectl apply -f -` takes): the
    /// batch/v1 CronJob, or with --job the batch/v1 Job one run would be. [role: viewer]
    Export {
        name: String,
        /// Kubernetes objects (the only export format; accepted for clarity).
        #[arg(long)]
        k8s: bool,
        #[arg(long)]
        job: bool,
    },
}

impl JobsCommand {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            JobsCommand::Apply { file } => {
                let text = if file.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
                } else {
                    std::fs::read_to_string(&file)
                };
                match text {
                    Ok(t) => client.jobs_apply(t, output).await,
                    Err(e) => Err(CliError::Api(format!(
                        "cannot read {}: {e}",
                        file.display()
                    ))),
                }
            }
            JobsCommand::List => client.jobs_list(output).await,
            JobsCommand::Show { name } => client.jobs_show(&name, output).await,
            JobsCommand::Run { name } => client.jobs_action(&name, "run", output).await,
            JobsCommand::Suspend { name } => client.jobs_action(&name, "suspend", output).await,
            JobsCommand::Resume { name } => client.jobs_action(&name, "resume", output).await,
            JobsCommand::Delete { name } => client.jobs_action(&name, "delete", output).await,
            JobsCommand::Export { name, k8s: _, job } => client.jobs_export(&name, job).await,
            JobsCommand::Template { name: None, .. } => Ok(table(
                &["TEMPLATE", "WHAT IT DOES"],
                &crate::jobs::templates::TEMPLATES
                    .iter()
                    .map(|(n, what, _)| vec![n.to_string(), what.to_string()])
                    .collect::<Vec<_>>(),
            )),
            JobsCommand::Template {
                name: Some(name),
                auto_deploy,
            } => crate::jobs::templates::with_deploy(&name, auto_deploy)
                .map(|r| r.map_err(CliError::Api))
                .unwrap_or_else(|| {
                    Err(CliError::Api(format!(
                        "no template {name:?} (known: {})",
                        crate::jobs::templates::TEMPLATES
                            .iter()
                            .map(|t| t.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }),
        }
    }
}
