//! `shoal-agent`: parse arguments, load and validate config (exit 64 on a bad one), run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use shoal_agent::collector::SystemCollector;
use shoal_agent::config::AgentConfig;
use shoal_agent::spool::Spool;
use shoal_agent::{AgentError, RunOptions};

/// Shoal's device agent: samples this machine and reports to a Shoal hub, keeping every sample
/// in an on-disk spool until the hub has acknowledged it.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample every interval and stream to the hub until stopped (SIGINT/SIGTERM).
    ///
    /// Settings come from --config FILE (TOML), then SHOAL_* environment variables, then flags;
    /// later ones win. Example:
    ///   shoal-agent run --hub http://hub:50051 --interval 1s --spool-dir /var/lib/shoal-agent/spool
    Run(Box<RunArgs>),
    /// Enroll this device with a hub: make a key here (it never leaves the device), send a
    /// certificate signing request with the one-time token an admin made, and keep the
    /// certificate the hub signs in the identity directory (key mode 0600). Then report with
    /// `shoal-agent run --hub https://HOST:PORT`; the agent renews the certificate itself.
    ///
    /// `shoal devices enroll --name pi-7` on the hub prints the whole command, e.g.:
    ///   shoal-agent enroll --hub https://hub:50051 --token enroll_… --ca-sha256 3f0c…
    Enroll(EnrollArgs),
    /// Take one sample and print it as JSON.
    Sample {
        /// Take a single sample (the only mode for now; kept explicit for scripts).
        #[arg(long, required = true)]
        once: bool,
        /// Read /proc and /sys under this directory instead of the live system (a captured
        /// tree; CPU usage and network rates are left out, they need two live readings).
        #[arg(long)]
        sysroot: Option<PathBuf>,
    },
    /// Inspect the spool (read-only; safe while an agent runs).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Print the default configuration as TOML, a starting point for /etc/shoal/agent.toml.
    DefaultConfig,
    /// Load and check the configuration `run` would use (file, environment, flags) and print
    /// it as TOML; exit 64 naming the bad field.
    CheckConfig(Box<RunArgs>),
    /// Print the completion script for a shell.
    ///
    /// The Debian package installs all three; by hand, e.g.:
    ///   shoal-agent completions bash > /usr/share/bash-completion/completions/shoal-agent
    ///   shoal-agent completions zsh > /usr/share/zsh/vendor-completions/_shoal-agent
    ///   shoal-agent completions fish > /usr/share/fish/vendor_completions.d/shoal-agent.fish
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// The shells `completions` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The completion script for `shell`.
fn completions(shell: CompletionShell) -> Vec<u8> {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "shoal-agent", &mut out);
    out
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Positions and counters as JSON: acked and last written seq, pending samples, bytes, drops.
    Status {
        #[arg(long, env = "SHOAL_SPOOL_DIR")]
        spool_dir: PathBuf,
    },
}

#[derive(Args)]
struct EnrollArgs {
    /// The hub's gRPC port, https://HOST:PORT.
    #[arg(long, env = "SHOAL_HUB")]
    hub: String,
    /// The one-time enrollment token (SHOAL_ENROLL_TOKEN keeps it out of shell history).
    #[arg(long, env = "SHOAL_ENROLL_TOKEN", hide_env_values = true)]
    token: String,
    /// SHA-256 (hex) of the hub's device CA certificate, printed with the token: the agent
    /// trusts the hub only if it presents that CA.
    #[arg(long, required_unless_present = "tls_ca", conflicts_with = "tls_ca")]
    ca_sha256: Option<String>,
    /// CA certificates (PEM) that signed the hub's serving certificate, instead of
    /// --ca-sha256.
    #[arg(long, env = "SHOAL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Where to keep the key and certificate [default: beside --config, else /etc/shoal].
    #[arg(long, env = "SHOAL_IDENTITY_DIR")]
    identity_dir: Option<PathBuf>,
    /// The agent's config file (the identity goes beside it).
    #[arg(long, env = "SHOAL_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Replace the identity already there (the old certificate stays valid until revoked).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "SHOAL_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Where to report: https://HOST:PORT (the hub's gRPC port, with this device's
    /// certificate from `shoal-agent enroll`), http://HOST:PORT (a hub run with --device-auth
    /// none) or mqtt://HOST:PORT (a broker the hub listens on).
    #[arg(long, env = "SHOAL_HUB")]
    hub: Option<String>,
    /// MQTT user name.
    #[arg(long, env = "SHOAL_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// MQTT password (prefer SHOAL_MQTT_PASSWORD or --mqtt-password-file).
    #[arg(long, env = "SHOAL_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// File holding the MQTT password.
    #[arg(long, env = "SHOAL_MQTT_PASSWORD_FILE")]
    mqtt_password_file: Option<PathBuf>,
    /// CA certificates (PEM) that verify the broker of an mqtts:// hub, or an https:// hub
    /// whose serving certificate is not from its device CA.
    #[arg(long, env = "SHOAL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Where this device's key and certificate are (written by `shoal-agent enroll`)
    /// [default: beside --config, else /etc/shoal].
    #[arg(long, env = "SHOAL_IDENTITY_DIR")]
    identity_dir: Option<PathBuf>,
    /// Not enrolled yet: enroll first with the one-time token in this file (for a DaemonSet
    /// or an image that enrolls at first start); ignored once enrolled.
    #[arg(long, env = "SHOAL_ENROLL_TOKEN_FILE")]
    enroll_token_file: Option<PathBuf>,
    /// SHA-256 of the hub's device CA certificate, for --enroll-token-file.
    #[arg(long, env = "SHOAL_CA_SHA256")]
    ca_sha256: Option<String>,
    /// Resend what the hub has not acknowledged after this long [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    ack_timeout: Option<Duration>,
    /// Device id [default: this machine's /etc/machine-id].
    #[arg(long, env = "SHOAL_DEVICE_ID")]
    device_id: Option<String>,
    /// Sampling interval, e.g. 1s, 500ms, 1m [default: 10s].
    #[arg(long, env = "SHOAL_INTERVAL", value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Spool directory [default: /var/lib/shoal-agent/spool].
    #[arg(long, env = "SHOAL_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Spool size bound; past it the oldest unacknowledged samples are dropped and counted
    /// [default: 64MiB].
    #[arg(long, env = "SHOAL_SPOOL_MAX_SIZE")]
    spool_max_size: Option<String>,
    /// Label reported to the hub, KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Serve the agent's own metrics for Prometheus at http://ADDR/metrics (text format 0.0.4),
    /// e.g. 127.0.0.1:9560. Off by default, and then it costs nothing. Loopback addresses
    /// only: the endpoint has no authentication.
    ///
    /// Metrics: shoal_agent_samples_collected_total (taken and spooled),
    /// shoal_agent_samples_sent_total, shoal_agent_samples_acked_total (stored by the hub),
    /// shoal_agent_samples_rejected_total (refused by the hub for good),
    /// shoal_agent_spool_samples and shoal_agent_spool_bytes (waiting for the hub),
    /// shoal_agent_spool_dropped_total (dropped by the spool's size bound; kept across
    /// restarts), shoal_agent_hub_connected, shoal_agent_reconnects_total,
    /// shoal_agent_errors_total{kind="connect|stream|ack_timeout|protocol|spool"},
    /// shoal_agent_last_error_timestamp_seconds and
    /// shoal_agent_last_error_info{kind,message} (both absent until an error), and
    /// shoal_agent_info{version,device_id,transport}.
    #[arg(long, env = "SHOAL_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Take N samples, wait until the hub has acknowledged all of them, then exit.
    #[arg(long)]
    count: Option<u64>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

impl RunArgs {
    fn into_config(self) -> Result<AgentConfig, AgentError> {
        let mut c = match &self.config {
            Some(path) => AgentConfig::from_file(path)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = self.hub {
            c.hub = v;
        }
        if let Some(v) = self.mqtt_username {
            c.mqtt_username = Some(v);
        }
        if let Some(v) = self.mqtt_password {
            c.mqtt_password = Some(v);
        }
        if let Some(v) = self.mqtt_password_file {
            c.mqtt_password_file = Some(v);
        }
        if let Some(v) = self.tls_ca {
            c.tls_ca = Some(v);
        }
        if let Some(v) = self.identity_dir {
            c.identity_dir = Some(v);
        } else if c.identity_dir.is_none() {
            // Beside the config file, as `shoal-agent enroll --config` puts it.
            c.identity_dir = beside(self.config.as_deref());
        }
        if let Some(v) = self.enroll_token_file {
            c.enroll_token_file = Some(v);
        }
        if let Some(v) = self.ca_sha256 {
            // A malformed one is kept as given, for validate() to name.
            c.ca_sha256 = Some(fingerprint(&v).unwrap_or(v));
        }
        if let Some(v) = self.ack_timeout {
            c.ack_timeout = v;
        }
        if let Some(v) = self.device_id {
            c.device_id = Some(v);
        }
        if let Some(v) = self.interval {
            c.interval = v;
        }
        if let Some(v) = self.spool_dir {
            c.spool_dir = v;
        }
        if let Some(v) = self.spool_max_size {
            c.spool_max_size = v;
        }
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = Some(v);
        }
        let labels: BTreeMap<_, _> = self.labels.into_iter().collect();
        c.labels.extend(labels);
        c.validate()?;
        Ok(c)
    }
}

/// Logs to stderr, filtered by RUST_LOG: a level (`warn`) and `target=level` pairs
/// (`info,shoal_agent::transport=debug`); `info` when unset or not understood.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run_agent(*args),
        Command::Enroll(args) => enroll(args),
        Command::Sample {
            once: _,
            sysroot: Some(root),
        } => sample_sysroot(root),
        Command::Sample {
            once: _,
            sysroot: None,
        } => sample_live(),
        Command::Spool {
            command: SpoolCommand::Status { spool_dir },
        } => match Spool::inspect(&spool_dir) {
            Ok(status) => print_json(&status),
            Err(e) => {
                eprintln!("shoal-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig(args) => check_config(*args),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a closed pipe (`| head`).
            let _ = std::io::stdout().write_all(&completions(shell));
            ExitCode::SUCCESS
        }
        Command::DefaultConfig => {
            let text =
                toml::to_string_pretty(&AgentConfig::default()).expect("default config serialises");
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
    }
}

/// `run`: the agent until a signal (or `--count`); exit 64 on a bad config, 1 on failure.
fn run_agent(args: RunArgs) -> ExitCode {
    let count = args.count;
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-agent: {e}");
            return ExitCode::from(64);
        }
    };
    // One thread: the agent's work is small and a single thread keeps memory low.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(config, RunOptions { count })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `enroll`: exit 0 enrolled, 64 on bad arguments or an identity already there, 1 when the
/// hub refused or could not be reached.
fn enroll(args: EnrollArgs) -> ExitCode {
    use shoal_agent::identity::{self, Identity, Trust};
    if !args.hub.starts_with("https://") {
        eprintln!(
            "shoal-agent: invalid hub: {:?} must be https://HOST:PORT (enrollment runs over TLS)",
            args.hub
        );
        return ExitCode::from(64);
    }
    let dir = args.identity_dir.clone().unwrap_or_else(|| {
        beside(args.config.as_deref()).unwrap_or_else(|| PathBuf::from("/etc/shoal"))
    });
    match Identity::load(&dir) {
        Ok(Some(existing)) if !args.force => {
            eprintln!(
                "shoal-agent: {}",
                identity::IdentityError::AlreadyEnrolled(dir, existing.info.device_id)
            );
            return ExitCode::from(64);
        }
        Err(e) if !args.force => {
            eprintln!("shoal-agent: {e}");
            return ExitCode::from(64);
        }
        _ => {}
    }
    let trust = match (args.ca_sha256, args.tls_ca) {
        (Some(pin), _) => match fingerprint(&pin) {
            Some(pin) => Trust::Fingerprint(pin),
            None => {
                eprintln!("shoal-agent: invalid ca-sha256: 64 hex digits expected");
                return ExitCode::from(64);
            }
        },
        (None, Some(path)) => Trust::CaFile(path),
        (None, None) => unreachable!("clap requires one"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(identity::enroll(&args.hub, &args.token, &trust, &dir)) {
        Ok(id) => {
            let until = id.info.not_after_unix;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "enrolled as {} (certificate valid until {}, renewed automatically); identity in {}\nreport with: shoal-agent run --hub {}{}",
                id.info.device_id,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(until).unwrap_or(0))
                ),
                dir.display(),
                args.hub,
                if args.identity_dir.is_some() {
                    format!(" --identity-dir {}", dir.display())
                } else {
                    String::new()
                },
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shoal-agent: enrollment failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The directory of a config file, where the identity goes.
fn beside(config: Option<&std::path::Path>) -> Option<PathBuf> {
    config
        .and_then(std::path::Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf)
}

/// A CA fingerprint as given (hex, optionally `sha256:`-prefixed), normalised; `None` if it is
/// not 64 hex digits.
fn fingerprint(given: &str) -> Option<String> {
    let pin = given
        .trim()
        .trim_start_matches("sha256:")
        .to_ascii_lowercase();
    (pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit())).then_some(pin)
}

/// `sample --once --sysroot ROOT`: the board readings of a captured tree, as JSON.
fn sample_sysroot(root: PathBuf) -> ExitCode {
    if !root.join("proc").is_dir() && !root.join("sys").is_dir() {
        eprintln!(
            "shoal-agent: {} holds neither proc/ nor sys/",
            root.display()
        );
        return ExitCode::from(64);
    }
    print_json(&shoal_agent::board::snapshot(
        &shoal_agent::board::Sysroot::new(root),
    ))
}

/// `sample --once`: one sample of this machine, as JSON.
fn sample_live() -> ExitCode {
    let mut c = match SystemCollector::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    // CPU usage and network rates are differences: measure over a short window.
    std::thread::sleep(Duration::from_millis(250));
    print_json(&c.sample())
}

/// `check-config`: the configuration `run` would use, as TOML, secrets hidden; exit 64 if bad.
fn check_config(args: RunArgs) -> ExitCode {
    match args.into_config() {
        Ok(mut config) => {
            // Never print a secret.
            if config.mqtt_password.is_some() {
                config.mqtt_password = Some("(hidden)".into());
            }
            let text = toml::to_string_pretty(&config).expect("config serialises");
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shoal-agent: {e}");
            ExitCode::from(64)
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
    ExitCode::SUCCESS
}

async fn run(config: AgentConfig, options: RunOptions) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    let summary = shoal_agent::run(config, options, rx)
        .await
        .context("agent failed")?;
    if options.count.is_some() && !summary.drained {
        anyhow::bail!(
            "stopped before the hub acknowledged every sample ({} pending)",
            summary.spool.pending
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completion_scripts_name_the_commands_and_flags() {
        let script = |shell| String::from_utf8(completions(shell)).unwrap();
        let bash = script(CompletionShell::Bash);
        assert!(bash.contains("-F _shoal__agent"), "{bash}");
        assert!(bash.trim_end().ends_with("fi"), "{bash}");
        assert!(bash.contains("--metrics-listen") && bash.contains("check-config"));
        let zsh = script(CompletionShell::Zsh);
        assert!(zsh.starts_with("#compdef shoal-agent"), "{zsh}");
        assert!(zsh.contains("--spool-dir"));
        let fish = script(CompletionShell::Fish);
        assert!(fish.contains("complete -c shoal-agent"), "{fish}");
        assert!(fish.contains("completions"));
    }
}
