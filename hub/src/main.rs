//! `shoal`: the hub (`serve`, `up`) and the operators' commands. Thin: parse, validate (exit 64
//! on bad config), run until a signal.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal_hub::cli::{Client, Output};
use shoal_hub::ingest::IngestLimits;
use shoal_hub::ingest::mqtt::BrokerConfig;
use shoal_hub::jobs::cluster::ClusterSource;
use shoal_hub::mqtt::acl::Users;
use shoal_hub::mqtt::tls::server_config;
use shoal_hub::registry::StatusThresholds;
use shoal_hub::up::UpOptions;
use shoal_hub::{HubConfig, HubError, Listeners};
use tokio::sync::watch;

/// Shoal: an edge-and-ML fleet manager. Run a hub, then point `shoal-agent`s at it.
///
/// Try it:  shoal up          (hub + a local agent, data in ./shoal-data)
///          shoal devices list
///          shoal telemetry DEVICE --metric cpu_percent --since 15m
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// The hub's REST URL, for the operator commands.
    #[arg(
        long,
        global = true,
        env = "SHOAL_HUB_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    hub: String,
    /// Output format of the operator commands.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum DatasetsCommand {
    /// Write a window of telemetry as Parquet files plus manifest.json (schema, rows, time
    /// range, devices, SHA-256 of every file) to a folder or an S3 bucket. The hub writes it:
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

#[derive(Subcommand)]
enum Command {
    /// Run the hub: gRPC ingest, REST API, /metrics. Prints its endpoints as one JSON line.
    Serve(Box<ServeArgs>),
    /// The one-command demo: a hub plus a local agent reporting to it; Ctrl-C stops both.
    Up {
        /// Everything goes under this folder (hub store and agent spool).
        #[arg(long, default_value = "./shoal-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc_listen: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_listen: String,
        /// The embedded MQTT broker, for agents and `mosquitto_pub` scripts.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt_listen: String,
        /// The local agent's sampling interval.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        interval: Duration,
    },
    /// Scheduled jobs: Kubernetes CronJob manifests run on the hub (or as Kubernetes Jobs).
    ///
    /// The book's hrdump CronJob applies unchanged:  shoal jobs apply -f hrdump.yaml
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Runs of scheduled jobs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Datasets: telemetry windows as Parquet files for training.
    Datasets {
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// The fleet's devices.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// A device's metric over time, downsampled (avg/min/max per step).
    ///
    /// Metric names: cpu_percent, load1, memory_used_bytes, uptime_seconds, process_count,
    /// cpu_core_percent{core="0"}, disk_used_bytes{mount="/"}, net_rx_bytes_per_second{iface="eth0"},
    /// temperature_celsius{sensor="..."} and more (see docs/telemetry.md).
    Telemetry {
        /// Device id.
        id: String,
        #[arg(long)]
        metric: String,
        /// How far back, e.g. 15m, 1h, 2d.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        since: Duration,
        /// Bucket width [default: about 120 buckets over the range].
        #[arg(long, value_parser = humantime::parse_duration)]
        step: Option<Duration>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where the store lives (one redb file inside).
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "./shoal-data/hub")]
    data_dir: PathBuf,
    /// Address for agents (gRPC).
    #[arg(long, env = "SHOAL_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: String,
    /// Address for the REST API, /healthz and /metrics.
    #[arg(long, env = "SHOAL_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: String,
    /// A device silent this long is "stale".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    stale_after: Duration,
    /// A device silent this long is "offline".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    offline_after: Duration,
    /// Samples timestamped further ahead of the hub's clock are rejected.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    max_clock_skew: Duration,
    /// Largest gRPC message or MQTT payload accepted, in bytes.
    #[arg(long, default_value_t = shoal_proto::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Run the embedded MQTT broker on this address (agents use --hub mqtt://ADDR).
    #[arg(long, env = "SHOAL_MQTT_LISTEN")]
    mqtt_listen: Option<String>,
    /// Users of the embedded broker, one NAME:PASSWORD[:ROLE] per line (ROLE device or
    /// observer); without it any client may connect and its client id is its device id.
    #[arg(long, env = "SHOAL_MQTT_USERS")]
    mqtt_users: Option<PathBuf>,
    /// Topic filter of the plain JSON form {"device":…,"temp":…,"load":…} (the book's
    /// mosquitto_pub scripts); "" turns it off. See docs/mqtt.md for the mapping.
    #[arg(long, default_value = "sensor/+")]
    mqtt_json_topic: String,
    /// Certificate chain (PEM) of the embedded broker: with --mqtt-tls-key it speaks MQTT over
    /// TLS only (agents use --hub mqtts://ADDR --tls-ca CA).
    #[arg(long, env = "SHOAL_MQTT_TLS_CERT")]
    mqtt_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the embedded broker's certificate.
    #[arg(long, env = "SHOAL_MQTT_TLS_KEY")]
    mqtt_tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that verify an mqtts:// --mqtt-broker.
    #[arg(long, env = "SHOAL_MQTT_TLS_CA")]
    mqtt_tls_ca: Option<PathBuf>,
    /// Also ingest from this MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (agents run with --hub mqtt://...).
    #[arg(long, env = "SHOAL_MQTT_BROKER")]
    mqtt_broker: Option<String>,
    /// Run `shoal.dev/runner: kubernetes` jobs as Jobs in the cluster of this kubeconfig (its
    /// current context).
    #[arg(long, env = "SHOAL_KUBECONFIG", conflicts_with = "kube_in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Run `shoal.dev/runner: kubernetes` jobs in the cluster the hub runs in (its pod's
    /// service account; see deploy/kubernetes for the RBAC it needs).
    #[arg(long, env = "SHOAL_KUBE_IN_CLUSTER")]
    kube_in_cluster: bool,
    /// Namespace for Jobs whose manifest names none (default: the kubeconfig context's, or the
    /// pod's own).
    #[arg(long, env = "SHOAL_KUBE_NAMESPACE")]
    kube_namespace: Option<String>,
    /// How often a running Kubernetes Job's status is read.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    kube_poll: Duration,
    /// MLflow tracking server given to every job run as MLFLOW_TRACKING_URI.
    #[arg(long, env = "MLFLOW_TRACKING_URI")]
    mlflow_tracking_uri: Option<String>,
    /// Where datasets live (s3://BUCKET/PREFIX or a folder), given to every job run as
    /// SHOAL_DATASET_URI.
    #[arg(long, env = "SHOAL_DATASET_URI")]
    dataset_uri: Option<String>,
    /// Client id of the hub's persistent session on the broker.
    #[arg(long, default_value = "shoal-hub")]
    mqtt_client_id: String,
    /// Shared-subscription group, so several hubs split the devices; "" subscribes plainly.
    #[arg(long, default_value = "shoal")]
    mqtt_share_group: String,
    /// User name on the broker.
    #[arg(long, env = "SHOAL_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// Password on the broker (prefer the environment variable).
    #[arg(long, env = "SHOAL_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Create or update a job from a Kubernetes CronJob manifest (YAML or JSON; `-` reads stdin).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Every job with its schedule, last and next start.
    List,
    /// One job and its runs.
    Show {
        name: String,
    },
    /// Start a run now, whatever the schedule.
    Run {
        name: String,
    },
    /// No new runs until resumed (a run in progress goes on).
    Suspend {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Remove a job (its active runs are stopped).
    Delete {
        name: String,
    },
    /// Print a built-in job's manifest (without NAME: list them), ready for `jobs apply -f -`:
    ///
    ///   shoal jobs template dataset-export | shoal jobs apply -f -
    Template {
        name: Option<String>,
    },
    /// Print the job as a Kubernetes object (JSON, which `kubectl apply -f -` takes): the
    /// batch/v1 CronJob, or with --job the batch/v1 Job one run would be.
    Export {
        name: String,
        /// Kubernetes objects (the only export format; accepted for clarity).
        #[arg(long)]
        k8s: bool,
        #[arg(long)]
        job: bool,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Runs, oldest first.
    List {
        #[arg(long)]
        job: Option<String>,
    },
    /// One run: status, times, attempts, reason.
    Show { run: String },
    /// Files a run left in its SHOAL_ARTIFACTS_DIR (a trained model, a report).
    Artifacts { run: String },
    /// Download one artifact of a run.
    Fetch {
        run: String,
        /// Path as `runs artifacts` lists it, e.g. model.onnx.
        path: String,
        /// Where to write it [default: its file name, here].
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// A run's output (the last attempt's).
    Logs {
        run: String,
        /// Keep printing until the run has finished.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Every device with its status (online / stale / offline) and last heartbeat.
    List,
    /// One device: identity, status and its latest sample.
    Show { id: String },
}

fn main() -> ExitCode {
    // reqwest (CLI, object_store's S3 client) and the Kubernetes client use rustls with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(dispatch(cli))
}

/// The hub's settings from `shoal serve`'s flags; `Err` names the flag.
fn hub_config(a: ServeArgs) -> Result<HubConfig, String> {
    let mqtt_users = a
        .mqtt_users
        .as_deref()
        .map(Users::load)
        .transpose()
        .map_err(|e| format!("invalid mqtt-users: {e}"))?;
    let mqtt_tls = match (&a.mqtt_tls_cert, &a.mqtt_tls_key) {
        (Some(cert), Some(key)) => {
            Some(server_config(cert, key).map_err(|e| format!("invalid mqtt-tls-cert/key: {e}"))?)
        }
        (None, None) => None,
        _ => {
            return Err(
                "invalid mqtt-tls-cert: give both --mqtt-tls-cert and --mqtt-tls-key".into(),
            );
        }
    };
    let broker_tls = a
        .mqtt_tls_ca
        .as_deref()
        .map(shoal_proto::mqtt::client::tls_config)
        .transpose()
        .map_err(|e| format!("invalid mqtt-tls-ca: {e}"))?;
    Ok(HubConfig {
        data_dir: a.data_dir,
        thresholds: StatusThresholds {
            stale_after: a.stale_after,
            offline_after: a.offline_after,
        },
        limits: IngestLimits {
            max_clock_skew: a.max_clock_skew,
            max_message_bytes: a.max_message_bytes,
        },
        kubernetes: match (a.kubeconfig, a.kube_in_cluster) {
            (Some(path), _) => Some(ClusterSource::Kubeconfig(path)),
            (None, true) => Some(ClusterSource::InCluster),
            (None, false) => None,
        },
        kube_namespace: a.kube_namespace,
        mlflow_tracking_uri: a.mlflow_tracking_uri.filter(|v| !v.is_empty()),
        dataset_uri: a.dataset_uri.filter(|v| !v.is_empty()),
        kube_poll: a.kube_poll,
        mqtt_users,
        mqtt_json_topic: a.mqtt_json_topic.clone(),
        mqtt_tls,
        mqtt_broker: a.mqtt_broker.map(|url| BrokerConfig {
            url,
            client_id: a.mqtt_client_id,
            share_group: a.mqtt_share_group,
            credentials: a
                .mqtt_username
                .map(|u| (u, a.mqtt_password.unwrap_or_default())),
            json_topic: a.mqtt_json_topic,
            tls: broker_tls,
        }),
    })
}

async fn dispatch(cli: Cli) -> ExitCode {
    let client = Client::new(&cli.hub);
    let printed = match cli.command {
        Command::Serve(args) => {
            let (grpc, http, mqtt) = (
                args.grpc_listen.clone(),
                args.http_listen.clone(),
                args.mqtt_listen.clone(),
            );
            return match hub_config(*args) {
                Ok(config) => serve(config, &grpc, &http, mqtt.as_deref()).await,
                Err(e) => {
                    eprintln!("shoal: {e}");
                    ExitCode::from(64)
                }
            };
        }
        Command::Up {
            data_dir,
            grpc_listen,
            http_listen,
            mqtt_listen,
            interval,
        } => {
            let opts = UpOptions {
                data_dir,
                grpc_listen,
                http_listen,
                mqtt_listen,
                interval,
            };
            let result = shoal_hub::up::up(
                opts,
                |ep, agent| {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(
                        out,
                        "Shoal is up.\n  REST API   http://{http}/api/v1/devices\n  metrics    http://{http}/metrics\n  ingest     http://{grpc} (gRPC) or mqtt://{mqtt} (MQTT): shoal-agent run --hub URL\n  data       {data}\n  agent      sampling every {interval}, spool {spool}\n\nTry:  shoal{hub} devices list\n      shoal{hub} telemetry <DEVICE> --metric cpu_percent --since 5m\nCtrl-C stops.",
                        hub = hub_flag(ep.http),
                        http = ep.http,
                        grpc = ep.grpc,
                        mqtt = ep.mqtt.map(|a| a.to_string()).unwrap_or_default(),
                        data = agent.spool_dir.parent().map(|p| p.display().to_string()).unwrap_or_default(),
                        interval = humantime::format_duration(agent.interval),
                        spool = agent.spool_dir.display(),
                    );
                },
                signal_channel(),
            )
            .await;
            return exit_for(result);
        }
        Command::Jobs { command } => match command {
            JobsCommand::Apply { file } => {
                let text = if file.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
                } else {
                    std::fs::read_to_string(&file)
                };
                match text {
                    Ok(t) => client.jobs_apply(t, cli.output).await,
                    Err(e) => {
                        eprintln!("shoal: cannot read {}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            JobsCommand::List => client.jobs_list(cli.output).await,
            JobsCommand::Show { name } => client.jobs_show(&name, cli.output).await,
            JobsCommand::Run { name } => client.jobs_action(&name, "run", cli.output).await,
            JobsCommand::Suspend { name } => client.jobs_action(&name, "suspend", cli.output).await,
            JobsCommand::Resume { name } => client.jobs_action(&name, "resume", cli.output).await,
            JobsCommand::Delete { name } => client.jobs_action(&name, "delete", cli.output).await,
            JobsCommand::Export { name, k8s: _, job } => client.jobs_export(&name, job).await,
            JobsCommand::Template { name: None } => Ok(shoal_hub::cli::table(
                &["TEMPLATE", "WHAT IT DOES"],
                &shoal_hub::jobs::templates::TEMPLATES
                    .iter()
                    .map(|(n, what, _)| vec![n.to_string(), what.to_string()])
                    .collect::<Vec<_>>(),
            )),
            JobsCommand::Template { name: Some(name) } => shoal_hub::jobs::templates::get(&name)
                .map(str::to_string)
                .ok_or_else(|| {
                    shoal_hub::cli::CliError::Api(format!(
                        "no template {name:?} (known: {})",
                        shoal_hub::jobs::templates::TEMPLATES
                            .iter()
                            .map(|t| t.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }),
        },
        Command::Runs { command } => match command {
            RunsCommand::List { job } => client.runs_list(job.as_deref(), cli.output).await,
            RunsCommand::Show { run } => client.runs_show(&run, cli.output).await,
            RunsCommand::Artifacts { run } => client.runs_artifacts(&run, cli.output).await,
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
        },
        Command::Datasets {
            command:
                DatasetsCommand::Export {
                    since,
                    until,
                    devices,
                    to,
                },
        } => {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr(),
            );
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
            result.map(|m| match cli.output {
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
        Command::Devices {
            command: DevicesCommand::List,
        } => client.devices_list(cli.output).await,
        Command::Devices {
            command: DevicesCommand::Show { id },
        } => client.devices_show(&id, cli.output).await,
        Command::Telemetry {
            id,
            metric,
            since,
            step,
        } => {
            client
                .telemetry(&id, &metric, since, step, cli.output)
                .await
        }
    };
    match printed {
        Ok(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shoal: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: HubConfig,
    grpc_listen: &str,
    http_listen: &str,
    mqtt_listen: Option<&str>,
) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("shoal: {e}");
        return ExitCode::from(64);
    }
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))
        }
    };
    let bound = async {
        let grpc = bind(grpc_listen).await?;
        let http = bind(http_listen).await?;
        let mqtt = match mqtt_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        Ok::<_, String>(Listeners { grpc, http, mqtt })
    };
    let listeners = match bound.await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("shoal: {e}");
            return ExitCode::from(64);
        }
    };
    let addr =
        |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let endpoints = serde_json::json!({
        "grpc": addr(&listeners.grpc),
        "http": addr(&listeners.http),
        "mqtt": listeners.mqtt.as_ref().map(addr),
    });
    let _ = writeln!(std::io::stdout(), "{endpoints}");
    exit_for(shoal_hub::run(config, listeners, signal_channel()).await)
}

fn exit_for(result: Result<(), HubError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ HubError::Config { .. }) => {
            eprintln!("shoal: {e}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("shoal: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `--hub URL` the operator commands need to reach a hub on `http`; nothing for the
/// default address.
fn hub_flag(http: std::net::SocketAddr) -> String {
    if http.to_string() == "127.0.0.1:8080" {
        String::new()
    } else {
        format!(" --hub http://{http}")
    }
}

/// Turns true on SIGINT or SIGTERM.
fn signal_channel() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}
