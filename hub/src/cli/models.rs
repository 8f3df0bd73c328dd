//! `shoal models` and `shoal alerts`.

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{CliError, Client, Output, encode};
use super::format::*;

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// Deploy a model: served by the hub's embedded V2 server (/v2, the hub's tokens) or
    /// scored through an external V2 server. Another version replaces the deployed one
    /// without dropping requests. [role: scientist]
    ///
    ///   shoal models deploy shoal-anomaly            # newest version in MLflow's registry
    ///   shoal models deploy shoal-anomaly:3 --to embedded
    ///   shoal models deploy shoal-anomaly:3 --source s3://models/anomaly/3
    ///   shoal models deploy shoal-anomaly:3 --to v2 --endpoint http://mlserver:8080
    Deploy {
        /// The model, NAME[:VERSION] (VERSION: the registry's newest when omitted).
        model: String,
        /// Where it runs.
        #[arg(long, value_enum, default_value = "embedded")]
        to: DeployTarget,
        /// Where the hub fetches it: a folder or .onnx file on the hub, s3://…, or
        /// mlflow:/models/NAME/VERSION (the default, from the hub's --mlflow-tracking-uri).
        #[arg(long)]
        source: Option<String>,
        /// The external V2 server's URL (--to v2).
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Deployed models and the one that scores telemetry. [role: viewer]
    List,
    /// Stop serving a model. [role: scientist]
    Undeploy { name: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DeployTarget {
    /// The hub's own V2 server.
    Embedded,
    /// An external V2 server (MLServer, Triton, Seldon Core) at --endpoint.
    V2,
}

impl ModelsCommand {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            ModelsCommand::Deploy {
                model,
                to,
                source,
                endpoint,
            } => {
                let (name, version) = match model.split_once(':') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (model.clone(), None),
                };
                let to = match to {
                    DeployTarget::Embedded => "embedded",
                    DeployTarget::V2 => "v2",
                };
                let body = json!({
                    "model": name, "version": version, "source": source,
                    "to": to, "endpoint": endpoint,
                });
                let d = client
                    .send_json(Method::POST, "/api/v1/models/deployments", &body)
                    .await?;
                Ok(if output == Output::Json {
                    pretty(&d)
                } else {
                    let at = match str_of(&d["to"]).as_str() {
                        "v2" => format!("scored through {}", str_of(&d["endpoint"])),
                        _ => format!("served at /v2/models/{}", str_of(&d["name"])),
                    };
                    format!(
                        "deployed {} version {} ({at}); sha256 {}\n",
                        str_of(&d["name"]),
                        str_of(&d["version"]),
                        str_of(&d["sha256"])
                    )
                })
            }
            ModelsCommand::List => {
                let v = client.get("/api/v1/models/deployments", &[]).await?;
                if output == Output::Json {
                    return Ok(pretty(&v));
                }
                let scoring = str_of(&v["scoring_model"]);
                let rows: Vec<Vec<String>> = list(&v["deployments"])
                    .iter()
                    .map(|d| {
                        vec![
                            str_of(&d["name"]),
                            str_of(&d["version"]),
                            str_of(&d["to"]),
                            if d["name"].as_str() == Some(scoring.as_str()) {
                                "yes".into()
                            } else {
                                "-".into()
                            },
                            str_of(&d["source"]),
                            time_of(&d["deployed_ms"]),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    return Ok("no models deployed (shoal models deploy NAME)\n".into());
                }
                Ok(table(
                    &["MODEL", "VERSION", "TO", "SCORING", "SOURCE", "DEPLOYED"],
                    &rows,
                ))
            }
            ModelsCommand::Undeploy { name } => {
                let d = client
                    .send(
                        Method::DELETE,
                        &format!("/api/v1/models/deployments/{}", encode(&name)),
                        None,
                    )
                    .await?;
                Ok(if output == Output::Json {
                    pretty(&d)
                } else {
                    format!("{} is no longer served\n", str_of(&d["name"]))
                })
            }
        }
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(|a| a.as_slice()).unwrap_or_default()
}

#[derive(clap::Subcommand)]
pub enum AlertsCommand {
    /// Open and acknowledged alerts on anomaly scores, newest first. [role: viewer]
    List {
        /// Resolved ones too.
        #[arg(long)]
        all: bool,
    },
    /// Acknowledge an alert: someone is on it (it resolves when the device's scores
    /// recover). [role: operator]
    Ack { id: String },
}

impl AlertsCommand {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            AlertsCommand::List { all } => {
                let v = client
                    .get("/api/v1/alerts", &[("all", all.to_string())])
                    .await?;
                if output == Output::Json {
                    return Ok(pretty(&v));
                }
                let rows: Vec<Vec<String>> = list(&v["alerts"])
                    .iter()
                    .map(|a| {
                        vec![
                            str_of(&a["id"]),
                            str_of(&a["device_id"]),
                            str_of(&a["state"]),
                            format!("{:.2}", a["peak_score"].as_f64().unwrap_or(f64::NAN)),
                            format!("{:.2}", a["threshold"].as_f64().unwrap_or(f64::NAN)),
                            format!("{}:{}", str_of(&a["model"]), str_of(&a["version"])),
                            time_of(&a["opened_ms"]),
                            str_of(&a["acknowledged_by"]),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    return Ok(if all {
                        "no alerts\n".into()
                    } else {
                        "no open alerts\n".into()
                    });
                }
                Ok(table(
                    &[
                        "ALERT",
                        "DEVICE",
                        "STATE",
                        "PEAK",
                        "THRESHOLD",
                        "MODEL",
                        "OPENED",
                        "ACK BY",
                    ],
                    &rows,
                ))
            }
            AlertsCommand::Ack { id } => {
                let a = client
                    .send(
                        Method::POST,
                        &format!("/api/v1/alerts/{}/ack", encode(&id)),
                        None,
                    )
                    .await?;
                Ok(if output == Output::Json {
                    pretty(&a)
                } else {
                    format!(
                        "acknowledged {} ({})\n",
                        str_of(&a["id"]),
                        str_of(&a["device_id"])
                    )
                })
            }
        }
    }
}
