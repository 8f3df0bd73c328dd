//! `shoal jobs`.

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
