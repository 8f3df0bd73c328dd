//! `shoal`: the hub (`serve`, `up`) and the operators' commands. Thin: parse, build the config
//! (exit 64 on a bad one), run until a signal; each command group lives in `shoal_hub::cli`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use shoal_hub::cli::{self, Client, Output};
use shoal_hub::serve::ServeArgs;
use shoal_hub::up::UpOptions;
use shoal_hub::{HubConfig, HubError, Listeners};
use tokio::sync::watch;

/// Shoal: an edge-and-ML fleet manager. Run a hub, then point `shoal-agent`s at it.
///
/// Try it:  shoal up          (hub + a local agent, data in ./shoal-data)
///          shoal devices list
///          shoal telemetry DEVICE --metric cpu_percent --since 15m
///
/// Each operator command says which role its API token needs ([role: viewer], ...; see
/// docs/security.md).
#[derive(Parser)]
#[command(name = "shoal", version, propagate_version = true)]
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
        command: cli::jobs::JobsCommand,
    },
    /// Runs of scheduled jobs.
    Runs {
        #[command(subcommand)]
        command: cli::runs::RunsCommand,
    },
    /// Datasets: telemetry windows as Parquet files for training.
    Datasets {
        #[command(subcommand)]
        command: cli::datasets::DatasetsCommand,
    },
    /// The fleet's devices.
    Devices {
        #[command(subcommand)]
        command: cli::devices::DevicesCommand,
    },
    /// Deployed models: served at /v2 by the hub, or scored through an external V2 server.
    Models {
        #[command(subcommand)]
        command: cli::models::ModelsCommand,
    },
    /// Where the hub forwards what it stores: Kafka, Elasticsearch (shoal serve --sink).
    Sinks {
        #[command(subcommand)]
        command: cli::sinks::SinksCommand,
    },
    /// The hub's telemetry store: size, oldest sample, growth, retention, free disk.
    Store {
        #[command(subcommand)]
        command: cli::store::StoreCommand,
    },
    /// Signing keys for model provenance (local; no hub needed).
    Keys {
        #[command(subcommand)]
        command: cli::models::KeysCommand,
    },
    /// Alerts on the fleet's anomaly scores.
    Alerts {
        #[command(subcommand)]
        command: cli::models::AlertsCommand,
    },
    /// A device's metric over time, downsampled (avg/min/max per step). [role: viewer]
    ///
    /// Metric names: cpu_percent, load1, memory_used_bytes, uptime_seconds, process_count,
    /// cpu_core_percent{core="0"}, disk_used_bytes{mount="/"}, net_rx_bytes_per_second{iface="eth0"},
    /// temperature_celsius{sensor="..."} and more (see docs/telemetry.md).
    Telemetry(cli::telemetry::TelemetryArgs),
    /// API tokens: create, list, revoke. [role: admin]
    ///
    /// Every REST call needs a token: the CLI sends SHOAL_TOKEN, else the one `shoal login`
    /// saved for --hub. A new hub writes its first admin token to DATA_DIR/admin.token.
    Tokens {
        #[command(subcommand)]
        command: cli::access::TokensCommand,
    },
    /// Check a token against --hub and save it for the commands that follow.
    ///
    ///   shoal login --token-file ./shoal-data/hub/admin.token
    ///   echo "$TOKEN" | shoal --hub https://hub.example login
    Login(cli::access::LoginArgs),
    /// Who the hub takes you for, and your role. [any role]
    Whoami,
    /// The audit log: every change and every refusal, newest last. [role: admin]
    Audit(cli::access::AuditArgs),
    /// Print the completion script for a shell.
    ///
    /// The Debian package installs bash, zsh and fish scripts; by hand, e.g.:
    ///   shoal completions bash > /usr/share/bash-completion/completions/shoal
    ///   shoal completions zsh > /usr/share/zsh/vendor-completions/_shoal
    ///   shoal completions fish > /usr/share/fish/vendor_completions.d/shoal.fish
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The completion script for `shell`.
fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut out);
    out
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
    let mut command = Cli::command().args_override_self(true);
    let serve = command
        .find_subcommand("serve")
        .expect("serve is a command")
        .clone();
    let args = match shoal_hub::serve::expand_config(std::env::args_os().collect(), &serve) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("shoal: {e}");
            return ExitCode::from(64);
        }
    };
    let cli = match command.try_get_matches_from_mut(args) {
        Ok(m) => Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit()),
        Err(e) => e.exit(),
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> ExitCode {
    let client = Client::new(&cli.hub, cli::credentials::token_for(&cli.hub));
    let output = cli.output;
    let printed = match cli.command {
        Command::Serve(args) => {
            return match args.to_config() {
                Ok(config) => {
                    serve(
                        config,
                        &args.grpc_listen,
                        &args.http_listen,
                        args.mqtt_listen.as_deref(),
                    )
                    .await
                }
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
                |ep, agent, login| {
                    let _ = std::io::stdout()
                        .write_all(shoal_hub::up::banner(ep, agent, login).as_bytes());
                },
                signal_channel(),
            )
            .await;
            return exit_for(result);
        }
        Command::Jobs { command } => command.run(&client, output).await,
        Command::Runs { command } => command.run(&client, output).await,
        Command::Datasets { command } => command.run(&client, output).await,
        Command::Devices { command } => command.run(&client, output).await,
        Command::Models { command } => command.run(&client, output).await,
        Command::Alerts { command } => command.run(&client, output).await,
        Command::Sinks { command } => command.run(&client, output).await,
        Command::Store { command } => command.run(&client, output).await,
        Command::Keys { command } => command.run(output),
        Command::Telemetry(args) => args.run(&client, output).await,
        Command::Tokens { command } => command.run(&client, output).await,
        Command::Login(args) => args.run(&cli.hub).await,
        Command::Whoami => client.whoami(output).await,
        Command::Audit(args) => args.run(&client, output).await,
        // Into a buffer first: clap_complete writing to a closed pipe (`| head`) panics.
        Command::Completions { shell } => Ok(String::from_utf8_lossy(&completions(shell)).into()),
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
    // Before binding: an unauthenticated API is refused on a non-loopback address.
    let exposed = http_listen
        .parse()
        .map(|addr| shoal_hub::serve::refuse_exposed_without_auth(&config.auth, addr));
    if let Ok(Err(e)) = exposed {
        eprintln!("shoal: {e}");
        return ExitCode::from(64);
    }
    let mqtt_addr = mqtt_listen.and_then(|a| a.parse().ok());
    let anonymous = grpc_listen
        .parse()
        .map(|addr| shoal_hub::serve::refuse_anonymous_devices(&config, addr, mqtt_addr));
    if let Ok(Err(e)) = anonymous {
        eprintln!("shoal: {e}");
        return ExitCode::from(64);
    }
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            shoal_hub::net::listen(&addr)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command that calls the hub's API says the role it needs in its help.
    #[test]
    fn operator_commands_state_their_role() {
        fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            let here = format!("{path} {}", cmd.get_name());
            if cmd.get_subcommands().next().is_none() {
                let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
                let local = [
                    "serve",
                    "up",
                    "completions",
                    "login",
                    "template",
                    "verify",
                    "generate",
                    "help",
                ];
                if !local.contains(&cmd.get_name())
                    && !about.contains("[role: ")
                    && !about.contains("[any role]")
                {
                    out.push(here.clone());
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &here, out);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "no role stated: {missing:?}");
    }

    #[test]
    fn completion_scripts_name_the_command_groups_and_flags() {
        let script = |shell| String::from_utf8(completions(shell)).unwrap();
        let bash = script(clap_complete::Shell::Bash);
        assert!(bash.contains("complete -F _shoal"), "{bash}");
        for word in ["devices", "telemetry", "jobs", "--hub", "--data-dir"] {
            assert!(bash.contains(word), "bash completion lacks {word}");
        }
        let zsh = script(clap_complete::Shell::Zsh);
        assert!(zsh.starts_with("#compdef shoal"), "{zsh}");
        let fish = script(clap_complete::Shell::Fish);
        assert!(fish.contains("complete -c shoal"), "{fish}");
    }
}
