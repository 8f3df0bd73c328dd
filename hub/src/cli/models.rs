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
    ///   shoal models deploy shoal-anomaly:3 --to seldon --storage s3://models/shoal | kubectl apply -f -
    ///
    /// With --to seldon the hub uploads the model to --storage in the layouts Seldon's servers
    /// load (Triton: NAME/config.pbtxt, NAME/VERSION/model.onnx; MLServer: NAME/VERSION/mlflow)
    /// and prints the Seldon object as YAML: a v2 Model (--protocol v2) or a v1
    /// SeldonDeployment (--protocol v1, --server triton|mlflow); --apply applies it through
    /// the hub's Kubernetes API access instead.
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
        #[command(flatten)]
        seldon: SeldonArgs,
    },
    /// Deployed models and the one that scores telemetry. [role: viewer]
    List,
    /// MLflow's registry as the hub's tracking server has it: each model's newest versions,
    /// their runs' metrics and the dataset each trained on. [role: viewer]
    Registry,
    /// One deployed model: where it runs, its file's digest, and its provenance (the ledger
    /// entry whose signed statement names its model.onnx, and where that stands on chain:
    /// pending, confirming or anchored). [role: viewer]
    Show { name: String },
    /// Stop serving a model. [role: scientist]
    Undeploy { name: String },
    /// The hub's provenance ledger (its chain re-checked), or with --push record a signed
    /// statement in it. [role: viewer; --push: scientist]
    ///
    ///   shoal models provenance --push ./model/provenance.dsse.json
    Provenance {
        /// A DSSE envelope to record (`shoal-ml train --signing-key` writes one).
        #[arg(long)]
        push: Option<std::path::PathBuf>,
    },
    /// Check a model against its signed provenance, step by step: the envelope, the
    /// signature (by --public-key), the statement, each file's SHA-256; with --ledger the
    /// hub's ledger (re-walked here) has the statement; with --chain-rpc an anchor covering it
    /// is on that chain, its block canonical, with enough confirmations. Prints each step ok
    /// or FAILED with the reason; exit 1 on any failure. Without --ledger or --chain-rpc it
    /// runs locally. [role: viewer, for --ledger and --chain-rpc]
    ///
    ///   shoal models verify ./model --public-key signing.pub
    ///   shoal models verify shoal-anomaly:3 --public-key signing.pub --ledger
    ///   shoal models verify ./model --public-key signing.pub \
    ///       --chain-rpc http://besu-rpc.shoal.svc:8545 --chain-id 20261130 --confirmations 2
    Verify(VerifyArgs),
}

/// `shoal keys`.
#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a P-256 signing key for model provenance: DIR/signing.key (PKCS#8, mode 0600) and
    /// DIR/signing.pub; prints the key id. Give the key to `shoal-ml train --signing-key`
    /// (or SHOAL_SIGNING_KEY_FILE), the public key to whoever verifies. Runs locally.
    Generate {
        /// Where the two files go (created if missing; existing keys are not overwritten).
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
    },
}

impl KeysCommand {
    pub fn run(self, output: Output) -> Result<String, CliError> {
        let KeysCommand::Generate { out } = self;
        let (key, private, public) = shoal_ml::provenance::SigningKey::generate()
            .map_err(|e| CliError::Api(e.to_string()))?;
        let (key_file, pub_file) = (out.join("signing.key"), out.join("signing.pub"));
        if key_file.exists() {
            return Err(CliError::Api(format!(
                "{} exists; not overwriting a key",
                key_file.display()
            )));
        }
        std::fs::create_dir_all(&out)
            .and_then(|()| crate::auth::tokens::write_secret(&key_file, &private))
            .and_then(|()| std::fs::write(&pub_file, public))
            .map_err(|e| CliError::Api(format!("{}: {e}", out.display())))?;
        Ok(if output == Output::Json {
            pretty(&json!({ "key_id": key.key_id(), "key": key_file, "public_key": pub_file }))
        } else {
            format!(
                "key id {}\nprivate key {} (keep it secret)\npublic key  {}\n",
                key.key_id(),
                key_file.display(),
                pub_file.display()
            )
        })
    }
}

// What `shoal models verify` checks (the command's help is on `ModelsCommand::Verify`).
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A model folder (a training run's --out), or NAME[:VERSION] of a model in MLflow's
    /// registry (downloaded from --mlflow-tracking-uri with its run's envelope).
    model: String,
    /// The signer's public key (PEM; `shoal keys generate` writes it).
    #[arg(long)]
    public_key: std::path::PathBuf,
    /// The envelope [default: the folder's provenance.dsse.json].
    #[arg(long)]
    envelope: Option<std::path::PathBuf>,
    /// Also check the hub's provenance ledger.
    #[arg(long)]
    ledger: bool,
    /// Also check the anchor on this chain (an Ethereum JSON-RPC URL); implies --ledger.
    #[arg(long, requires = "chain_id")]
    chain_rpc: Option<String>,
    /// The chain id --chain-rpc must serve.
    #[arg(long)]
    chain_id: Option<u64>,
    /// The ShoalProvenance contract [default: the one the hub anchors with].
    #[arg(long)]
    contract: Option<String>,
    /// Blocks, the anchor's own included, the anchor needs.
    #[arg(long, default_value_t = 1)]
    confirmations: u64,
    /// MLflow, for NAME[:VERSION].
    #[arg(long, env = "MLFLOW_TRACKING_URI")]
    mlflow_tracking_uri: Option<String>,
}

/// `shoal models verify`: each step ok or failed; `Err` when any failed.
async fn verify(client: &Client, a: VerifyArgs, output: Output) -> Result<String, CliError> {
    use crate::provenance::verify::{ChainCheckArgs, fetch_registered, ledger_and_chain};
    use shoal_ml::provenance::{ENVELOPE_FILE, PublicKey, verify};
    let key = PublicKey::load(&a.public_key).map_err(|e| CliError::Api(e.to_string()))?;
    let contract = a
        .contract
        .as_deref()
        .map(str::parse::<alloy::primitives::Address>)
        .transpose()
        .map_err(|e| CliError::Api(format!("--contract: {e}")))?;
    // A folder, or a registered model downloaded into a temporary one.
    let downloaded;
    let path = if std::path::Path::new(&a.model).is_dir() {
        std::path::PathBuf::from(&a.model)
    } else {
        let (name, version) = a.model.split_once(':').unwrap_or((&a.model, "latest"));
        let uri = a.mlflow_tracking_uri.as_deref().ok_or_else(|| {
            CliError::Api(format!(
                "{} is not a folder; as a registered model it needs --mlflow-tracking-uri",
                a.model
            ))
        })?;
        downloaded = tempfile::tempdir().map_err(|e| CliError::Api(e.to_string()))?;
        fetch_registered(uri, name, version, downloaded.path())
            .await
            .map_err(CliError::Api)?;
        downloaded.path().to_path_buf()
    };
    let envelope = a.envelope.unwrap_or_else(|| path.join(ENVELOPE_FILE));
    let mut steps = verify(&path, &envelope, &key);
    if (a.ledger || a.chain_rpc.is_some()) && steps.iter().all(|s| s.failure.is_none()) {
        let statement_sha256 = std::fs::read(&envelope)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|e| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(e["payload"].as_str()?)
                    .ok()
            })
            .map(|payload| shoal_ml::dataset::hex(&<sha2::Sha256 as sha2::Digest>::digest(payload)))
            .unwrap_or_default();
        let ledger = client.get("/api/v1/provenance", &[]).await?;
        let chain = match (&a.chain_rpc, a.chain_id) {
            (Some(rpc), Some(chain_id)) => Some(ChainCheckArgs {
                rpc,
                chain_id,
                contract,
                confirmations: a.confirmations,
            }),
            _ => None,
        };
        steps.extend(ledger_and_chain(&ledger, &statement_sha256, chain).await);
    }
    let text = if output == Output::Json {
        pretty(&serde_json::to_value(&steps).expect("steps serialise"))
    } else {
        steps
            .iter()
            .map(|s| match &s.failure {
                None => format!("ok      {}\n", s.check),
                Some(why) => format!("FAILED  {}: {why}\n", s.check),
            })
            .collect()
    };
    if steps.iter().any(|s| s.failure.is_some()) {
        let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
        return Err(CliError::Api(format!(
            "{} does not verify against {}",
            a.model,
            a.public_key.display()
        )));
    }
    Ok(text)
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeployTarget {
    /// The hub's own V2 server.
    Embedded,
    /// An external V2 server (MLServer, Triton, Seldon Core) at --endpoint.
    V2,
    /// Seldon Core on Kubernetes (see --storage, --protocol).
    Seldon,
}

/// The flags of `--to seldon`.
#[derive(clap::Args)]
pub struct SeldonArgs {
    /// Where the model's files go for Seldon's servers: s3://BUCKET/PREFIX.
    #[arg(long, required_if_eq("to", "seldon"))]
    storage: Option<String>,
    /// Seldon Core v2 (a Model) or v1 (a SeldonDeployment).
    #[arg(long, value_parser = ["v1", "v2"], default_value = "v2")]
    protocol: String,
    /// The server of a v1 SeldonDeployment: TRITON_SERVER or MLFLOW_SERVER.
    #[arg(long, value_parser = ["triton", "mlflow"], default_value = "triton")]
    server: String,
    /// Namespace of the object (default: the hub's cluster's, else "default").
    #[arg(long)]
    namespace: Option<String>,
    /// The Secret holding the object store's credentials for Seldon.
    #[arg(long, default_value = "seldon-init-container-secret")]
    secret: String,
    /// Apply the object through the hub's Kubernetes API access (shoal serve --kubeconfig).
    #[arg(long)]
    apply: bool,
}

impl ModelsCommand {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            ModelsCommand::Deploy {
                model,
                to,
                source,
                endpoint,
                seldon,
            } => {
                let (name, version) = match model.split_once(':') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (model.clone(), None),
                };
                let to = match to {
                    DeployTarget::Embedded => "embedded",
                    DeployTarget::V2 => "v2",
                    DeployTarget::Seldon => {
                        return deploy_seldon(client, output, name, version, source, seldon).await;
                    }
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
            ModelsCommand::Registry => {
                let v = client.get("/api/v1/models/registry", &[]).await?;
                if output == Output::Json {
                    return Ok(pretty(&v));
                }
                if v["tracking_uri"].is_null() {
                    return Ok(
                        "this hub has no MLflow tracking server (shoal serve --mlflow-tracking-uri)\n"
                            .into(),
                    );
                }
                let mut rows = Vec::new();
                for m in list(&v["models"]) {
                    for ver in list(&m["versions"]) {
                        let metrics: Vec<String> = ver["metrics"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(k, x)| format!("{k}={}", num(x)))
                            .collect();
                        let tags = &ver["tags"];
                        rows.push(vec![
                            str_of(&m["name"]),
                            str_of(&ver["version"]),
                            str_of(&ver["status"]),
                            if metrics.is_empty() {
                                "-".into()
                            } else {
                                metrics.join(" ")
                            },
                            tags["shoal.dataset_uri"]
                                .as_str()
                                .map_or_else(|| "-".into(), str::to_string),
                            time_of(&ver["created_ms"]),
                        ]);
                    }
                }
                if rows.is_empty() {
                    return Ok(format!(
                        "no model is registered in {} yet\n",
                        str_of(&v["tracking_uri"])
                    ));
                }
                Ok(table(
                    &[
                        "MODEL",
                        "VERSION",
                        "STATUS",
                        "METRICS",
                        "DATASET",
                        "REGISTERED",
                    ],
                    &rows,
                ))
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
            ModelsCommand::Verify(args) => verify(client, args, output).await,
            ModelsCommand::Provenance { push: Some(file) } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| CliError::Api(format!("{}: {e}", file.display())))?;
                let envelope: Value = serde_json::from_str(&text)
                    .map_err(|e| CliError::Api(format!("{}: not JSON: {e}", file.display())))?;
                let e = client
                    .send_json(Method::POST, "/api/v1/provenance", &envelope)
                    .await?;
                Ok(if output == Output::Json {
                    pretty(&e)
                } else {
                    format!(
                        "ledger entry {} (statement sha256 {}, signed by {})\n",
                        e["index"],
                        str_of(&e["statement_sha256"]),
                        str_of(&e["key_id"])
                    )
                })
            }
            ModelsCommand::Provenance { push: None } => {
                let v = client.get("/api/v1/provenance", &[]).await?;
                if output == Output::Json {
                    return Ok(pretty(&v));
                }
                let rows: Vec<Vec<String>> = list(&v["entries"])
                    .iter()
                    .map(|e| {
                        let files: Vec<String> = list(&e["subjects"])
                            .iter()
                            .map(|s| str_of(&s["name"]))
                            .collect();
                        vec![
                            e["index"].to_string(),
                            time_of(&e["time_ms"]),
                            str_of(&e["statement_sha256"]).chars().take(12).collect(),
                            str_of(&e["key_id"]).chars().take(12).collect(),
                            files.join(","),
                            str_of(&e["by"]),
                            on_chain(&e["anchor"]),
                        ]
                    })
                    .collect();
                let anchoring = anchoring_line(&v["anchoring"]);
                let chain = if v["chain"]["intact"] == true {
                    "chain intact".to_string()
                } else {
                    format!("CHAIN BROKEN: {}", str_of(&v["chain"]["reason"]))
                };
                Ok(format!(
                    "{}{chain}; head {}\n{anchoring}",
                    table(
                        &[
                            "#",
                            "RECORDED",
                            "STATEMENT",
                            "KEY",
                            "FILES",
                            "BY",
                            "ON CHAIN"
                        ],
                        &rows
                    ),
                    str_of(&v["head"])
                ))
            }
            ModelsCommand::Show { name } => {
                let v = client.get("/api/v1/models/deployments", &[]).await?;
                let d = list(&v["deployments"])
                    .iter()
                    .find(|d| d["name"].as_str() == Some(name.as_str()))
                    .ok_or_else(|| {
                        CliError::Api(format!("no deployment of {name:?} (shoal models list)"))
                    })?;
                let ledger = client.get("/api/v1/provenance", &[]).await?;
                let sha = str_of(&d["sha256"]);
                let entry = list(&ledger["entries"]).iter().find(|e| {
                    list(&e["subjects"])
                        .iter()
                        .any(|s| s["name"] == "model.onnx" && str_of(&s["sha256"]) == sha)
                });
                if output == Output::Json {
                    return Ok(pretty(&json!({ "deployment": d, "provenance": entry })));
                }
                let provenance = match &entry {
                    Some(e) => format!(
                        "ledger entry {} (statement {}, signed by {}); on chain: {}",
                        e["index"],
                        str_of(&e["statement_sha256"]),
                        str_of(&e["key_id"]),
                        on_chain(&e["anchor"])
                    ),
                    None => {
                        "none: no signed statement in the hub's ledger names this model.onnx".into()
                    }
                };
                Ok(format!(
                    "model       {}\nversion     {}\nto          {}\nsource      {}\nsha256      {sha}\ndeployed    {} by {}\nprovenance  {provenance}\n{}",
                    str_of(&d["name"]),
                    str_of(&d["version"]),
                    str_of(&d["to"]),
                    str_of(&d["source"]),
                    time_of(&d["deployed_ms"]),
                    str_of(&d["deployed_by"]),
                    anchoring_line(&ledger["anchoring"])
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

/// Where a ledger entry stands on chain, in a word or two.
fn on_chain(anchor: &Value) -> String {
    match anchor["state"].as_str() {
        Some("anchored") => format!("anchored, block {}", anchor["anchor"]["block_number"]),
        Some("confirming") => match anchor["anchor"]["block_number"].as_u64() {
            Some(b) => format!(
                "confirming, block {b} ({} so far)",
                anchor["anchor"]["confirmations"]
            ),
            None => "sent, not mined yet".into(),
        },
        Some(other) => other.to_string(),
        None => "-".into(),
    }
}

/// The hub's chain and how anchoring goes; "" without a chain.
fn anchoring_line(a: &Value) -> String {
    if a.is_null() {
        return String::new();
    }
    let contract = a["contract"].as_str().unwrap_or("not deployed yet");
    match a["last_error"].as_str() {
        None => format!(
            "anchored on chain {} at {} (contract {contract}, {} confirmations)\n",
            a["chain_id"],
            str_of(&a["rpc"]),
            a["confirmations"]
        ),
        Some(e) => format!(
            "anchoring on chain {} is failing ({} failed rounds, retrying): {e}\n",
            a["chain_id"], a["errors"]
        ),
    }
}

/// `deploy --to seldon`: the object as YAML (for `kubectl apply -f -`), what was uploaded on
/// stderr.
async fn deploy_seldon(
    client: &Client,
    output: Output,
    name: String,
    version: Option<String>,
    source: Option<String>,
    s: SeldonArgs,
) -> Result<String, CliError> {
    let body = json!({
        "model": name, "version": version, "source": source,
        "storage": s.storage, "protocol": s.protocol, "server": s.server,
        "namespace": s.namespace, "secret": s.secret, "apply": s.apply,
    });
    let d = client
        .send_json(Method::POST, "/api/v1/models/seldon", &body)
        .await?;
    if output == Output::Json {
        return Ok(pretty(&d));
    }
    eprintln!(
        "uploaded {} files of {} version {} under {}{}",
        list(&d["uploaded"]).len(),
        str_of(&d["name"]),
        str_of(&d["version"]),
        s.storage.unwrap_or_default(),
        if d["applied"] == true {
            "; applied to the cluster"
        } else {
            ""
        }
    );
    serde_yaml_ng::to_string(&d["object"]).map_err(|e| CliError::Api(e.to_string()))
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
