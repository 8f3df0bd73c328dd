//! `shoal up`: the one-command demo — a hub on embedded defaults plus a local agent reporting
//! to it, everything under one data folder. The agent is the `shoal-agent` binary, run the way
//! a user would run it (found beside `shoal` or on PATH), so the hub links no device code.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::ingest::IngestLimits;
use crate::registry::StatusThresholds;
use crate::{Endpoints, HubConfig, HubError};

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    pub grpc_listen: String,
    pub http_listen: String,
    pub mqtt_listen: String,
    pub interval: Duration,
}

/// The local agent `shoal up` starts.
#[derive(Debug, Clone)]
pub struct LocalAgent {
    pub binary: PathBuf,
    pub interval: Duration,
    pub spool_dir: PathBuf,
    /// Its key and certificate (it enrolls itself on the first `shoal up`).
    pub identity_dir: PathBuf,
    /// The hub's device CA, which the agent trusts the hub through.
    pub ca_file: PathBuf,
}

/// How the operator commands reach `shoal up`'s hub: its first admin token, saved for them.
#[derive(Debug, Clone)]
pub struct Login {
    /// The hub's admin token file (`DATA_DIR/hub/admin.token`).
    pub token_file: PathBuf,
    /// Where the token was saved for the CLI; `Err` says why it was not.
    pub saved: Result<PathBuf, String>,
}

/// How long the agent gets to stop after SIGTERM before it is killed (its spool keeps
/// everything unacknowledged either way).
const AGENT_GRACE: Duration = Duration::from_secs(5);

/// Runs hub and agent until `shutdown`; `on_ready` gets the bound addresses.
pub async fn up(
    opts: UpOptions,
    on_ready: impl FnOnce(&Endpoints, &LocalAgent, &Login),
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), HubError> {
    let agent = LocalAgent {
        binary: find_agent()?,
        interval: opts.interval,
        spool_dir: opts.data_dir.join("agent-spool"),
        identity_dir: opts.data_dir.join("agent-identity"),
        ca_file: opts.data_dir.join("hub").join("ca").join("ca.crt"),
    };
    // The agent's own bounds, checked here so a bad value stops `shoal up` before it starts.
    if opts.interval < Duration::from_millis(10) || opts.interval > Duration::from_secs(3600) {
        return Err(HubError::Config {
            field: "interval",
            reason: "must be between 10ms and 1h".into(),
        });
    }
    let grpc = bind(&opts.grpc_listen, "grpc-listen").await?;
    let http = bind(&opts.http_listen, "http-listen").await?;
    let mqtt = bind(&opts.mqtt_listen, "mqtt-listen").await?;
    let endpoints = Endpoints {
        grpc: grpc.local_addr()?,
        http: http.local_addr()?,
        mqtt: Some(mqtt.local_addr()?),
    };
    let hub_config = HubConfig {
        sinks: Vec::new(),
        ingest_from: None,
        data_dir: opts.data_dir.join("hub"),
        store: crate::store::StorePolicy::default(),
        thresholds: StatusThresholds::default(),
        limits: IngestLimits::default(),
        mqtt_broker: None,
        kubernetes: None,
        kube_namespace: None,
        mlflow_tracking_uri: None,
        dataset_uri: None,
        kube_poll: Duration::from_secs(2),
        mqtt_users: None,
        mqtt_json_topic: "sensor/+".into(),
        mqtt_tls: None,
        auth: crate::serve::AuthConfig::default(),
        devices: crate::serve::DeviceAuthConfig::default(),
        scoring: crate::serve::ScoringConfig::default(),
        provenance_keys: Vec::new(),
        chain: None,
        signing_key: None,
        deploy_requires: crate::provenance::Requirement::None,
    };
    hub_config.validate()?;
    let login = log_in(&hub_config.data_dir, endpoints.http)?;
    let enrollment = prepare_enrollment(&hub_config, &agent)?;
    let listeners = crate::Listeners {
        grpc,
        http,
        mqtt: Some(mqtt),
    };
    let hub = tokio::spawn(crate::run(hub_config, listeners, shutdown.clone()));
    if let Some(token) = enrollment {
        enroll_agent(&agent, &endpoints, &token).await?;
    }
    let mut child = spawn_agent(&agent, &endpoints)?;
    on_ready(&endpoints, &agent, &login);

    tokio::select! {
        status = child.wait() => {
            // The hub goes on serving other agents; the demo's own agent is gone, so say so.
            match status {
                Ok(s) => tracing::error!(status = %s, "the local agent stopped"),
                Err(e) => tracing::error!(error = %e, "the local agent stopped"),
            }
        }
        _ = shutdown.wait_for(|s| *s) => stop(&mut child).await,
    }
    hub.await.expect("hub task")
}

/// Makes the hub's first admin token (before the hub starts, so it is there when the banner
/// says so) and saves it for the operator commands against this hub's URL: `shoal up` needs
/// no set-up, and its API is still closed to everyone else (a web page included).
fn log_in(hub_data: &Path, http: std::net::SocketAddr) -> Result<Login, HubError> {
    let store = crate::store::Store::open(hub_data)?;
    let tokens = crate::auth::Tokens::open(store)?;
    tokens.bootstrap(hub_data)?;
    drop(tokens); // closes the store: the hub opens it next
    let token_file = hub_data.join(crate::auth::tokens::BOOTSTRAP_FILE);
    let saved = std::fs::read_to_string(&token_file)
        .map_err(|e| {
            format!(
                "{}: {e} (log in with a token from `shoal tokens create`)",
                token_file.display()
            )
        })
        .and_then(|token| crate::cli::credentials::save(&format!("http://{http}"), token.trim()));
    Ok(Login { token_file, saved })
}

/// On the first `shoal up`, an enrollment token for the local agent (made before the hub
/// starts, like the admin token); `None` once the agent holds an identity.
fn prepare_enrollment(config: &HubConfig, agent: &LocalAgent) -> Result<Option<String>, HubError> {
    if agent.identity_dir.join("identity.toml").exists() {
        return Ok(None);
    }
    let device_err = |e: crate::auth::DeviceAuthError| HubError::Config {
        field: "enrollment",
        reason: e.to_string(),
    };
    let ca = crate::auth::ca::DeviceCa::open_or_create(&config.data_dir).map_err(|e| {
        HubError::Config {
            field: "device-ca",
            reason: e.to_string(),
        }
    })?;
    let store = crate::store::Store::open(&config.data_dir)?;
    let authority = crate::auth::DeviceAuthority::open(store, ca, config.devices.policy)?;
    let labels = [("source".to_string(), "shoal-up".to_string())].into();
    let (_, token) = authority
        .create_enrollment(
            &local_device_id(),
            labels,
            Duration::from_secs(3600),
            "shoal up",
        )
        .map_err(device_err)?;
    Ok(Some(token))
}

/// The id the local agent would take by itself: the machine id, else the host name.
fn local_device_id() -> String {
    [
        "/etc/machine-id",
        "/var/lib/dbus/machine-id",
        "/proc/sys/kernel/hostname",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .map(|s| s.trim().to_string())
    .find(|s| shoal_proto::device_id::validate(s).is_ok())
    .unwrap_or_else(|| "local".into())
}

/// The local agent's gRPC URL for the hub: TLS, on loopback when the hub listens everywhere.
fn agent_hub_url(endpoints: &Endpoints) -> String {
    let mut addr = endpoints.grpc;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("https://{addr}")
}

/// `shoal-agent enroll` with the token, as a device would run it.
async fn enroll_agent(
    agent: &LocalAgent,
    endpoints: &Endpoints,
    token: &str,
) -> Result<(), HubError> {
    let fail = |reason: String| HubError::Config {
        field: "shoal-agent",
        reason,
    };
    let run = Command::new(&agent.binary)
        .arg("enroll")
        .arg("--hub")
        .arg(agent_hub_url(endpoints))
        .arg("--tls-ca")
        .arg(&agent.ca_file)
        .arg("--identity-dir")
        .arg(&agent.identity_dir)
        .env("SHOAL_ENROLL_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(fail(format!(
            "the local agent could not enroll ({s}); its message is above"
        ))),
        Ok(Err(e)) => Err(fail(format!(
            "cannot start {}: {e}",
            agent.binary.display()
        ))),
        Err(_) => Err(fail("the local agent did not enroll within 30 s".into())),
    }
}

/// `shoal-agent` beside this executable (a release archive, `cargo build`, the .deb), else on
/// PATH.
fn find_agent() -> Result<PathBuf, HubError> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("shoal-agent")))
        .filter(|p| is_executable(p));
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("shoal-agent"))
                .find(|p| is_executable(p))
        })
    };
    beside.or_else(on_path).ok_or_else(|| HubError::Config {
        field: "shoal-agent",
        reason: "`shoal up` runs the shoal-agent binary, found neither beside shoal nor on PATH: \
                 build both (cargo build --release -p shoal-hub -p shoal-agent) or install the \
                 agent (cargo install --path edge-agent)"
            .into(),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn spawn_agent(agent: &LocalAgent, endpoints: &Endpoints) -> Result<Child, HubError> {
    Command::new(&agent.binary)
        .arg("run")
        .arg("--hub")
        .arg(agent_hub_url(endpoints))
        .arg("--identity-dir")
        .arg(&agent.identity_dir)
        .arg("--interval")
        .arg(humantime::format_duration(agent.interval).to_string())
        .arg("--spool-dir")
        .arg(&agent.spool_dir)
        .arg("--label")
        .arg("source=shoal-up")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HubError::Config {
            field: "shoal-agent",
            reason: format!("cannot start {}: {e}", agent.binary.display()),
        })
}

/// SIGTERM (the agent flushes and exits), SIGKILL after [`AGENT_GRACE`].
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(AGENT_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn bind(addr: &str, field: &'static str) -> Result<TcpListener, HubError> {
    crate::net::listen(addr)
        .await
        .map_err(|e| HubError::Config {
            field,
            reason: format!("cannot listen on {addr}: {e}"),
        })
}

/// What `shoal up` prints once everything listens: where things are and what to try.
pub fn banner(ep: &Endpoints, agent: &LocalAgent, login: &Login) -> String {
    let access = match &login.saved {
        Ok(path) => format!(
            "admin token in {} (saved for the shoal CLI in {})",
            login.token_file.display(),
            path.display()
        ),
        Err(why) => format!(
            "admin token in {}; not saved for the CLI ({why}): shoal{} login --token-file {}",
            login.token_file.display(),
            hub_flag(ep.http),
            login.token_file.display()
        ),
    };
    format!(
        "Shoal is up.\n  dashboard  http://{http}/ (sign in with the admin token below, or one from shoal tokens create)\n  REST API   http://{http}/api/v1/devices\n  metrics    http://{http}/metrics\n  ingest     https://{grpc} (gRPC, enrolled devices: shoal devices enroll --name NAME) or mqtt://{mqtt} (MQTT)\n  access     {access}\n  data       {data}\n  agent      sampling every {interval}, spool {spool}\n\nTry:  shoal{hub} devices list\n      shoal{hub} telemetry <DEVICE> --metric cpu_percent --since 5m\nCtrl-C stops.\n",
        hub = hub_flag(ep.http),
        http = ep.http,
        grpc = ep.grpc,
        mqtt = ep.mqtt.map(|a| a.to_string()).unwrap_or_default(),
        data = agent
            .spool_dir
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        interval = humantime::format_duration(agent.interval),
        spool = agent.spool_dir.display(),
    )
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
