//! `shoal serve`: the hub's settings ([`HubConfig`]) and [`run`], which wires store, ingest,
//! embedded broker, scheduler and REST API together and drains them on shutdown. It may use
//! every other module; none uses it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{api, auth, ingest, jobs, mqtt};

use crate::api::access::MetricsAuth;
use crate::ingest::enroll::EnrollmentService;
use crate::ingest::grpc::IngestService;
use crate::ingest::mqtt::BrokerConfig;
use crate::ingest::{IngestLimits, Ingestor};
use crate::jobs::cluster::ClusterSource;
use crate::metrics::Metrics;
use crate::mqtt::acl::Users;
use crate::mqtt::tls::server_config;
use crate::registry::StatusThresholds;
use crate::store::writer::{Fleet, Writer};
use crate::store::{Store, StoreError};

/// Everything `shoal serve` needs besides its sockets.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    /// How the store guards its disk.
    pub store: crate::store::StorePolicy,
    pub thresholds: StatusThresholds,
    pub limits: IngestLimits,
    /// Also ingest from this external MQTT broker.
    pub mqtt_broker: Option<ingest::mqtt::BrokerConfig>,
    /// Credentials for the embedded broker; `None` lets any client connect.
    pub mqtt_users: Option<mqtt::acl::Users>,
    /// MQTT topic filter of the plain JSON form (`sensor/+`); empty turns it off.
    pub mqtt_json_topic: String,
    /// The embedded broker's certificate and key (PEM files, checked when the config is made):
    /// it then speaks MQTT over TLS only. With device authentication on and a non-loopback
    /// broker without a users file, the device CA issues one.
    pub mqtt_tls: Option<(PathBuf, PathBuf)>,
    /// The cluster `shoal.dev/runner: kubernetes` jobs run in.
    pub kubernetes: Option<jobs::cluster::ClusterSource>,
    /// Namespace for Jobs whose manifest names none.
    pub kube_namespace: Option<String>,
    /// How often a running Job's status is read.
    pub kube_poll: Duration,
    /// Given to job runs as MLFLOW_TRACKING_URI.
    pub mlflow_tracking_uri: Option<String>,
    /// Given to job runs as SHOAL_DATASET_URI.
    pub dataset_uri: Option<String>,
    /// Who may use the REST API.
    pub auth: AuthConfig,
    /// Which devices may send telemetry.
    pub devices: DeviceAuthConfig,
    /// Scoring telemetry with the deployed model, and alerts on the scores.
    pub scoring: ScoringConfig,
    /// Public keys whose signed model statements the provenance ledger takes.
    pub provenance_keys: Vec<PathBuf>,
    /// The key the hub's training runs sign their models with (its public key is trusted).
    pub signing_key: Option<PathBuf>,
    /// What a model needs in the ledger to be deployed.
    pub deploy_requires: crate::provenance::Requirement,
    /// The chain the ledger is anchored on, and the hub's account there.
    /// Where stored telemetry is forwarded (`--sink`).
    pub sinks: Vec<crate::platform::SinkSpec>,
    /// The Kafka topic this hub also ingests from, as a member of a consumer group.
    pub ingest_from: Option<crate::platform::consume::IngestFrom>,
    pub chain: Option<(
        crate::provenance::chain::ChainConfig,
        alloy::signers::local::PrivateKeySigner,
    )>,
}

/// How the hub scores its fleet (see [`crate::models`]).
#[derive(Debug, Clone)]
pub struct ScoringConfig {
    /// The model whose deployment scores telemetry; "" turns scoring off.
    pub model: String,
    /// Time between scoring rounds.
    pub period: Duration,
    pub rule: crate::models::alerts::AlertRule,
    /// Where alerts are POSTed as JSON.
    pub webhook: Option<String>,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            model: "shoal-anomaly".into(),
            period: Duration::from_millis(500),
            rule: crate::models::alerts::AlertRule::default(),
            webhook: None,
        }
    }
}

/// Device identity on the gRPC port (see [`crate::auth::devices`]).
#[derive(Debug, Clone)]
pub struct DeviceAuthConfig {
    /// Devices must present the certificate of the device they send as (TLS with client
    /// certificates; the default). False: plaintext gRPC where any client may send as any
    /// device, refused on a non-loopback address without `--insecure-no-auth`.
    pub enforce: bool,
    /// An operator's own CA (certificate, key) instead of the one the hub makes in
    /// `DATA_DIR/ca`.
    pub ca: Option<(PathBuf, PathBuf)>,
    pub serving: auth::tls::ServingCert,
    pub policy: auth::devices::CertPolicy,
}

impl Default for DeviceAuthConfig {
    fn default() -> Self {
        Self {
            enforce: true,
            ca: None,
            serving: auth::tls::ServingCert::Issued {
                names: default_serving_names(None),
            },
            policy: auth::devices::CertPolicy::default(),
        }
    }
}

/// The names the hub's own serving certificate covers: loopback, this machine's host name,
/// the listen address when it is a specific one, and `extra`.
pub fn default_serving_names(listen: Option<SocketAddr>) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    if let Some(addr) = listen.filter(|a| !a.ip().is_unspecified()) {
        names.push(addr.ip().to_string());
    }
    names.dedup();
    names
}

/// Access to the REST API (see [`crate::auth`] and [`crate::api::access`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// API tokens required (the default); false lets anyone do anything.
    pub enforce: bool,
    /// Without `enforce`, whether a non-loopback HTTP address is still allowed
    /// (`--insecure-no-auth`).
    pub allow_exposed: bool,
    pub metrics: MetricsAuth,
    /// Also accept JWTs from this OpenID Connect issuer.
    pub oidc: Option<auth::oidc::OidcConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enforce: true,
            allow_exposed: false,
            metrics: MetricsAuth::Open,
            oidc: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("jobs: {0}")]
    Jobs(String),
    #[error("access: {0}")]
    Auth(#[from] auth::TokenError),
}

impl HubConfig {
    pub fn validate(&self) -> Result<(), HubError> {
        if self.thresholds.stale_after >= self.thresholds.offline_after {
            return Err(HubError::Config {
                field: "stale-after",
                reason: "must be shorter than --offline-after".into(),
            });
        }
        if let Some(b) = &self.mqtt_broker {
            let addr =
                shoal_proto::mqtt::parse_broker(&b.url).map_err(|reason| HubError::Config {
                    field: "mqtt-broker",
                    reason,
                })?;
            if addr.tls && b.tls.is_none() {
                return Err(HubError::Config {
                    field: "mqtt-tls-ca",
                    reason: "an mqtts:// broker needs the CA file that signed its certificate"
                        .into(),
                });
            }
        }
        if self
            .store
            .retention
            .max_age
            .is_some_and(|a| a < Duration::from_secs(60))
        {
            return Err(HubError::Config {
                field: "retention",
                reason: "must be at least 1m (samples younger than that are still arriving)".into(),
            });
        }
        if self.store.retention.max_size.is_some_and(|s| s < 1_000_000) {
            return Err(HubError::Config {
                field: "retention-size",
                reason: "must be at least 1MB".into(),
            });
        }
        if self.limits.max_message_bytes < 64 * 1024 {
            return Err(HubError::Config {
                field: "max-message-size",
                reason: "must be at least 64KiB".into(),
            });
        }
        Ok(())
    }
}

/// The gRPC task and the MQTT tasks.
type IngestTasks = (
    tokio::task::JoinHandle<Result<(), std::io::Error>>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// The device CA, enrollment and the gRPC port's TLS settings, when devices must be enrolled.
type DeviceDoor = Option<(Arc<auth::DeviceAuthority>, Arc<rustls::ServerConfig>)>;

fn open_devices(config: &HubConfig, store: &Store) -> Result<DeviceDoor, HubError> {
    let d = &config.devices;
    if !d.enforce {
        tracing::warn!(
            "device authentication is off: any client of the gRPC port may send as any device"
        );
        return Ok(None);
    }
    let ca = match &d.ca {
        Some((cert, key)) => auth::ca::DeviceCa::from_files(cert, key),
        None => auth::ca::DeviceCa::open_or_create(&config.data_dir),
    }
    .map_err(|e| HubError::Config {
        field: "device-ca-cert",
        reason: e.to_string(),
    })?;
    let tls = auth::tls::grpc_server_config(&ca, &d.serving, d.policy.grace).map_err(|reason| {
        HubError::Config {
            field: "grpc-tls-cert",
            reason,
        }
    })?;
    tracing::info!(ca_sha256 = %ca.fingerprint(), "devices need certificates (shoal devices enroll)");
    let authority = auth::DeviceAuthority::open(store.clone(), ca, d.policy)?;
    Ok(Some((authority, tls)))
}

/// Who may use the embedded broker on `addr`. With device authentication on, a client shows a
/// device certificate or (with a users file) a password when the broker speaks TLS or listens
/// off loopback; a broker off loopback without a users file speaks TLS with a certificate
/// from the device CA. A plaintext broker on loopback stays open to anonymous clients
/// (`shoal up`, the book's `mosquitto_pub` scripts).
fn broker_access(
    config: &HubConfig,
    devices: &DeviceDoor,
    addr: SocketAddr,
) -> Result<mqtt::Access, HubError> {
    let authority = devices.as_ref().map(|(a, _)| a.clone());
    let exposed = !addr.ip().is_loopback();
    let tls_error = |reason: String| HubError::Config {
        field: "mqtt-tls-cert",
        reason,
    };
    let tls = match (&authority, &config.mqtt_tls) {
        (Some(a), Some((cert, key))) => Some(
            auth::tls::mqtt_server_config(
                a.ca(),
                &auth::tls::ServingCert::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
            )
            .map_err(tls_error)?,
        ),
        (Some(a), None) if exposed && config.mqtt_users.is_none() => {
            let names = match &config.devices.serving {
                auth::tls::ServingCert::Issued { names } => names.clone(),
                auth::tls::ServingCert::Files { .. } => default_serving_names(Some(addr)),
            };
            let serving = auth::tls::ServingCert::Issued { names };
            Some(auth::tls::mqtt_server_config(a.ca(), &serving).map_err(tls_error)?)
        }
        (None, Some((cert, key))) => Some(server_config(cert, key).map_err(tls_error)?),
        _ => None,
    };
    Ok(mqtt::Access {
        users: config.mqtt_users.clone(),
        require_identity: authority.is_some() && (exposed || tls.is_some()),
        tls,
        devices: authority,
    })
}

/// gRPC ingest (with enrollment when devices need certificates), and MQTT ingest from an
/// external broker and the embedded one when configured: the gRPC task and the MQTT tasks.
fn start_ingest(
    config: &HubConfig,
    (grpc, mqtt_listener): (TcpListener, Option<TcpListener>),
    // The model server's gRPC routes ride on the ingest port.
    (ingestor, inference): (Ingestor, Option<ingest::grpc::AddRoutes>),
    devices: DeviceDoor,
    audit: &Arc<auth::AuditLog>,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> Result<IngestTasks, HubError> {
    let mut mqtt_tasks = Vec::new();
    // One set of opening slots for both device doors: they share the machine.
    let admission = crate::admission::Admission::default();
    if let Some(broker) = config.mqtt_broker.clone() {
        mqtt_tasks.push(tokio::spawn(ingest::mqtt::run_external(
            broker,
            ingestor.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(l) = mqtt_listener {
        let access = broker_access(config, &devices, l.local_addr()?)?;
        mqtt_tasks.push(tokio::spawn(mqtt::serve(
            l,
            access,
            config.mqtt_json_topic.clone(),
            ingestor.clone(),
            admission.clone(),
            shutdown.clone(),
        )));
    }
    let mut service = IngestService::new(ingestor.clone());
    let (enrollment, tls) = match devices {
        Some((authority, tls)) => {
            service = service.with_devices(authority.clone(), audit.clone());
            let enroll = EnrollmentService::new(authority, audit.clone(), metrics.clone())
                .with_events(ingestor);
            (Some(enroll), Some(tls))
        }
        None => (None, None),
    };
    let grpc_task = tokio::spawn(ingest::grpc::serve(
        grpc,
        service,
        enrollment,
        inference,
        ingest::grpc::Door { tls, admission },
        metrics.clone(),
        shutdown.clone(),
    ));
    Ok((grpc_task, mqtt_tasks))
}

/// Refuses what must not start: a bad config, an unauthenticated door off loopback.
fn preflight(config: &HubConfig, l: &Listeners) -> Result<(), HubError> {
    config.validate()?;
    refuse_exposed_without_auth(&config.auth, l.http.local_addr()?)?;
    let mqtt = l.mqtt.as_ref().map(TcpListener::local_addr).transpose()?;
    refuse_anonymous_devices(config, l.grpc.local_addr()?, mqtt)
}

/// The REST API until `shutdown`, with each request's client address known (for the audit).
async fn serve_api(
    http: TcpListener,
    state: api::AppState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(http, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

/// Without authentication, only a loopback address unless `--insecure-no-auth` says otherwise.
pub fn refuse_exposed_without_auth(auth: &AuthConfig, http: SocketAddr) -> Result<(), HubError> {
    if auth.enforce || auth.allow_exposed || http.ip().is_loopback() {
        return Ok(());
    }
    Err(HubError::Config {
        field: "no-auth",
        reason: format!(
            "refusing to serve the API on {http} without authentication: anyone who can reach \
             it could run commands on this machine (jobs) and read every device's telemetry. \
             Drop --no-auth (API tokens; the first admin token is written to the data dir), \
             listen on 127.0.0.1, or pass --insecure-no-auth if something in front of the hub \
             authenticates every request"
        ),
    })
}

/// Without device authentication, only a loopback gRPC address unless `--insecure-no-auth`.
pub fn refuse_anonymous_devices(
    config: &HubConfig,
    grpc: SocketAddr,
    mqtt: Option<SocketAddr>,
) -> Result<(), HubError> {
    if config.devices.enforce || config.auth.allow_exposed {
        return Ok(());
    }
    // An exposed broker with a users file authenticates its clients itself.
    let exposed_broker = mqtt.filter(|a| !a.ip().is_loopback() && config.mqtt_users.is_none());
    let exposed = Some(grpc)
        .filter(|a| !a.ip().is_loopback())
        .or(exposed_broker);
    let Some(addr) = exposed else {
        return Ok(());
    };
    Err(HubError::Config {
        field: "device-auth",
        reason: format!(
            "refusing to take telemetry on {addr} without device authentication: anyone who \
             can reach it could send as any device. Drop --device-auth none (devices enroll \
             with shoal devices enroll), listen on 127.0.0.1, or pass --insecure-no-auth"
        ),
    })
}

/// The gRPC URL agents are told to use (`shoal devices enroll` prints it): `https://` with
/// device authentication, on this machine's host name when the hub listens on every address.
fn advertised_grpc_url(config: &HubConfig, grpc: SocketAddr) -> String {
    let scheme = if config.devices.enforce {
        "https"
    } else {
        "http"
    };
    if !grpc.ip().is_unspecified() {
        return format!("{scheme}://{grpc}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{scheme}://{host}:{}", grpc.port())
}

/// Tokens (with the first admin token made on a new hub), the audit log, and the token runs
/// on the hub get: `hub-runs` (scientist), made anew at each start, the previous one revoked.
fn open_auth(
    config: &HubConfig,
    store: &Store,
) -> Result<(api::AuthState, Option<String>), HubError> {
    let tokens = auth::Tokens::open(store.clone())?;
    if config.auth.enforce {
        if let Some(path) = tokens.bootstrap(&config.data_dir)? {
            tracing::warn!(
                path = %path.display(),
                "made the first admin token; log in with: shoal login --token-file {}",
                path.display()
            );
        }
    } else {
        tracing::warn!("authentication is off: every caller of the REST API is an admin");
    }
    let run_token = if config.auth.enforce {
        match tokens.revoke(RUNS_TOKEN) {
            Ok(_) | Err(auth::TokenError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let (_, token) = tokens.create(RUNS_TOKEN, auth::Role::Scientist, None, "shoal serve")?;
        Some(token)
    } else {
        None
    };
    let audit = auth::AuditLog::open(&config.data_dir).map_err(HubError::Io)?;
    let oidc = config.auth.oidc.clone().map(|c| {
        tracing::info!(issuer = %c.issuer, audience = %c.audience, "accepting JWTs from the OpenID Connect issuer");
        Arc::new(auth::oidc::Oidc::new(c))
    });
    let state = api::AuthState {
        tokens,
        audit: Arc::new(audit),
        enforce: config.auth.enforce,
        metrics: config.auth.metrics,
        oidc,
    };
    Ok((state, run_token))
}

/// The name of the token runs on the hub act with.
const RUNS_TOKEN: &str = "hub-runs";

/// The sockets a hub serves, bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    /// The embedded MQTT broker's socket, when it runs.
    pub mqtt: Option<TcpListener>,
}

/// The addresses a running hub listens on.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub mqtt: Option<SocketAddr>,
}

/// Serves gRPC ingest on `grpc` and the REST API on `http` until `shutdown` turns true, then
/// drains: open streams end, queued writes are committed, and the store is closed.
pub async fn run(
    config: HubConfig,
    listeners: Listeners,
    shutdown: watch::Receiver<bool>,
) -> Result<(), HubError> {
    preflight(&config, &listeners)?;
    let Listeners {
        grpc,
        http,
        mqtt: mqtt_listener,
    } = listeners;
    let grpc_addr = grpc.local_addr()?;
    let cluster = connect_cluster(&config).await?;
    let seldon_cluster = cluster.clone();
    let store = Store::open(&config.data_dir)?;
    store
        .health()
        .set_min_free_bytes(config.store.min_free_bytes);
    let (auth, run_token) = open_auth(&config, &store)?;
    let fleet = Arc::new(Fleet::from_loaded(&store)?);
    // Every connected device holds a descriptor: take the whole hard limit, and say what it
    // allows.
    match crate::net::OpenFiles::raise() {
        Ok(files) => files.report(fleet.len()),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    let metrics = Arc::new(Metrics::default());
    let (writer, writer_thread) = Writer::start_with(
        store.clone(),
        fleet.clone(),
        metrics.clone(),
        !config.sinks.is_empty(),
    )?;
    let built =
        crate::platform::build(&config.sinks, &store, &config.data_dir).map_err(|reason| {
            HubError::Config {
                field: "sink",
                reason,
            }
        })?;
    let (sinks, sink_tasks) = if built.is_empty() {
        (Arc::new(crate::platform::Sinks::default()), Vec::new())
    } else {
        crate::platform::start(
            built,
            &store,
            &writer,
            fleet.clone(),
            config.thresholds,
            &config.data_dir,
            &shutdown,
        )?
    };
    tracing::info!(
        data_dir = %config.data_dir.display(),
        grpc = %grpc.local_addr()?,
        http = %http.local_addr()?,
        devices = fleet.len(),
        "hub serving"
    );

    let health_task = tokio::spawn(crate::store::writer::watch_health(
        writer.clone(),
        store.clone(),
        shutdown.clone(),
    ));
    let retention_task = tokio::spawn(crate::store::retention::run(
        store.clone(),
        config.store.retention.clone(),
        shutdown.clone(),
    ));
    let rollup_task = tokio::spawn(crate::store::rollup::run(store.clone(), shutdown.clone()));
    let ingestor = Ingestor::new(writer, metrics.clone(), config.limits);
    let consumer_stats = Arc::new(crate::platform::consume::ConsumerStats::default());
    let consumer_task = config.ingest_from.clone().map(|from| {
        tokio::spawn(crate::platform::consume::run(
            from,
            ingestor.clone(),
            fleet.clone(),
            consumer_stats.clone(),
            shutdown.clone(),
        ))
    });
    let devices = open_devices(&config, &store)?;
    let authority = devices.as_ref().map(|(a, _)| a.clone());
    let ledger = crate::provenance::Ledger::open(
        &store,
        &config.provenance_keys,
        config.signing_key.as_deref(),
    )
    .map_err(|reason| HubError::Config {
        field: "provenance-key",
        reason,
    })?;
    let ledger = Arc::new(ledger);
    let (anchorer, anchor_task) = match config.chain.clone() {
        Some((chain, key)) => {
            let anchorer = Arc::new(crate::provenance::anchor::Anchorer::new(
                &store,
                ledger.clone(),
                chain,
                key,
            )?);
            let task = tokio::spawn(anchorer.clone().run(shutdown.clone()));
            (Some(anchorer), Some(task))
        }
        None => (None, None),
    };
    let policy = crate::provenance::Policy {
        requires: config.deploy_requires,
        ledger: ledger.clone(),
        anchorer: anchorer.clone(),
    };
    let (models, alerts, scoring_task) =
        start_scoring(&config, &store, &fleet, seldon_cluster, policy, &shutdown)?;
    let inference = api::v2_grpc::server(models.repo.clone(), auth.clone());
    let inference: ingest::grpc::AddRoutes = Box::new(move |r| r.add_service(inference));
    let (grpc_task, mqtt_tasks) = start_ingest(
        &config,
        (grpc, mqtt_listener),
        (ingestor, Some(inference)),
        devices,
        &auth.audit,
        &metrics,
        &shutdown,
    )?;

    let hub_url = format!("http://{}", http.local_addr()?);
    let grpc_url = advertised_grpc_url(&config, grpc_addr);
    let (scheduler, job_store, scheduler_task) = start_jobs(
        &config,
        &store,
        &hub_url,
        cluster,
        run_token,
        shutdown.clone(),
    )?;
    let state = api::AppState {
        sinks,
        consumer: config.ingest_from.as_ref().map(|_| consumer_stats),
        ledger,
        anchorer,
        models,
        alerts,
        jobs: scheduler,
        job_store,
        runs_dir: config.data_dir.join("runs"),
        hub_url,
        store,
        fleet,
        metrics,
        thresholds: config.thresholds,
        auth,
        devices: authority,
        grpc_url,
    };
    let http_task = tokio::spawn(serve_api(http, state, shutdown.clone()));

    let (grpc_res, http_res) = tokio::join!(grpc_task, http_task);
    for t in mqtt_tasks {
        let _ = t.await;
    }
    let _ = scheduler_task.await;
    let _ = scoring_task.await;
    let _ = health_task.await;
    let _ = retention_task.await;
    let _ = rollup_task.await;
    if let Some(t) = anchor_task {
        let _ = t.await;
    }
    if let Some(t) = consumer_task {
        let _ = t.await;
    }
    for t in sink_tasks {
        let _ = t.await;
    }
    grpc_res.expect("grpc task")?;
    http_res.expect("http task")?;
    // The service (and with it the last writer handle) is gone: the writer commits what is
    // queued and stops.
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    tracing::info!("hub stopped");
    Ok(())
}

/// The deployed models, the alert rules, and the scorer's task.
#[allow(clippy::type_complexity)]
fn start_scoring(
    config: &HubConfig,
    store: &Store,
    fleet: &Arc<Fleet>,
    cluster: Option<jobs::cluster::Cluster>,
    policy: crate::provenance::Policy,
    shutdown: &watch::Receiver<bool>,
) -> Result<
    (
        Arc<crate::models::Models>,
        Arc<crate::models::alerts::Alerts>,
        tokio::task::JoinHandle<()>,
    ),
    HubError,
> {
    let models = Arc::new(crate::models::Models::open(
        store,
        &config.data_dir,
        config.mlflow_tracking_uri.clone(),
        config.scoring.model.clone(),
        cluster,
        Some(policy),
    )?);
    let alerts = Arc::new(crate::models::alerts::Alerts::open(
        store,
        config.scoring.rule,
        config.scoring.webhook.clone(),
    )?);
    let task = tokio::spawn(crate::models::scoring::run(
        models.clone(),
        alerts.clone(),
        fleet.clone(),
        store.clone(),
        config.scoring.period,
        shutdown.clone(),
    ));
    Ok((models, alerts, task))
}

/// The cluster `shoal.dev/runner: kubernetes` jobs run in, when one is configured; an
/// unreadable kubeconfig is a config error.
async fn connect_cluster(config: &HubConfig) -> Result<Option<jobs::cluster::Cluster>, HubError> {
    let Some(source) = &config.kubernetes else {
        return Ok(None);
    };
    let cluster = jobs::cluster::Cluster::connect(source, config.kube_namespace.as_deref())
        .await
        .map_err(|e| HubError::Config {
            field: "kubeconfig",
            reason: e.to_string(),
        })?
        .with_poll(config.kube_poll);
    tracing::info!(namespace = cluster.namespace(), "Kubernetes runner ready");
    Ok(Some(cluster))
}

/// Starts the scheduler over the jobs kept in `store`; runs live under `DATA_DIR/runs`.
fn start_jobs(
    config: &HubConfig,
    store: &Store,
    hub_url: &str,
    cluster: Option<jobs::cluster::Cluster>,
    run_token: Option<String>,
    shutdown: watch::Receiver<bool>,
) -> Result<
    (
        jobs::scheduler::Scheduler,
        jobs::store::JobStore,
        tokio::task::JoinHandle<()>,
    ),
    HubError,
> {
    let job_store = jobs::store::JobStore::new(store.clone())?;
    let scheduler_config = jobs::scheduler::SchedulerConfig {
        runs_dir: config.data_dir.join("runs"),
        hub_url: hub_url.to_string(),
        mlflow_tracking_uri: config.mlflow_tracking_uri.clone(),
        dataset_uri: config.dataset_uri.clone(),
        values_dir: Some(config.data_dir.clone()),
        backoff_base: Duration::from_secs(10),
        log_limit: 1024 * 1024,
        grace: Duration::from_secs(10),
        cluster,
        run_token,
        signing_key: config.signing_key.clone(),
    };
    let (scheduler, task) = jobs::scheduler::Scheduler::start(
        job_store.clone(),
        scheduler_config,
        jobs::scheduler::wall_clock(),
        shutdown,
    )
    .map_err(|e| HubError::Jobs(e.to_string()))?;
    Ok((scheduler, job_store, task))
}

/// `shoal serve --config FILE`: the file's settings become flags placed before the command
/// line's, so a flag given on the command line wins (a repeatable one, like `sink`, adds to the
/// file's). The file is TOML whose keys are the flags' long names: `data-dir = "/var/lib/shoal"`,
/// `sink = ["kafka://…", "elasticsearch+http://…"]`, `no-auth = true`.
pub fn expand_config(
    args: Vec<std::ffi::OsString>,
    serve: &clap::Command,
) -> Result<Vec<std::ffi::OsString>, String> {
    // The command is the first argument that is neither a flag nor a global flag's value.
    let mut at = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if ["--hub", "--output", "-o"].contains(&a.as_ref()) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            at = (a == "serve").then_some(i);
            break;
        }
    }
    let Some(at) = at else {
        return Ok(args);
    };
    let mut path = None;
    let mut rest = Vec::new();
    let mut it = args[at + 1..].iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            path = Some(it.next().ok_or("--config needs a FILE")?.clone());
        } else if let Some(p) = s.strip_prefix("--config=") {
            path = Some(p.into());
        } else {
            rest.push(a.clone());
        }
    }
    let path = match path.or_else(|| std::env::var_os("SHOAL_CONFIG")) {
        Some(p) => PathBuf::from(p),
        None => return Ok(args),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("invalid config: {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("invalid config: {}: {e}", path.display()))?;
    let known: Vec<String> = serve
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut out: Vec<std::ffi::OsString> = args[..=at].to_vec();
    for (key, value) in &table {
        if key == "config" || !known.contains(key) {
            return Err(format!(
                "invalid config: {}: unknown setting {key:?} (settings are `shoal serve` flags without the dashes, e.g. data-dir, sink)",
                path.display()
            ));
        }
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(format!(
                    "invalid config: {}: {key} must be a string or a number",
                    path.display()
                )),
            }
        };
        match value {
            toml::Value::Boolean(true) => out.push(format!("--{key}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for v in items {
                    out.push(format!("--{key}={}", scalar(v)?).into());
                }
            }
            v => out.push(format!("--{key}={}", scalar(v)?).into()),
        }
    }
    out.extend(rest);
    Ok(out)
}

/// `shoal serve`'s flags (and their environment variables).
#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// Read settings from this TOML file first (keys: these flags' long names, e.g.
    /// `data-dir = "/var/lib/shoal"`, `sink = ["kafka://…"]`); flags on the command line win.
    #[arg(long, env = "SHOAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the store lives (one redb file inside).
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "./shoal-data/hub")]
    pub data_dir: PathBuf,
    /// Stop taking telemetry while the data directory's filesystem has less free space than this
    /// (e.g. 256MB, 2GB; 0 turns it off): agents are told "store full", keep spooling and come
    /// back within a second of space being freed. /readyz reports it.
    #[arg(long, env = "SHOAL_MIN_FREE_SPACE", value_name = "SIZE", value_parser = shoal_proto::size::parse, default_value = crate::store::DEFAULT_MIN_FREE)]
    pub min_free_space: u64,
    /// Delete samples older than this (by their own timestamp), e.g. 30d or 12h; each device's
    /// newest sample, what the sinks have not forwarded and what a dataset export is reading
    /// are kept. Default: keep everything.
    #[arg(long, env = "SHOAL_RETENTION", value_name = "AGE", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Keep the store file under this size (e.g. 50GB) by deleting the oldest samples first;
    /// freed space is reused, so the file stops growing rather than shrinking.
    #[arg(long, env = "SHOAL_RETENTION_SIZE", value_name = "SIZE", value_parser = shoal_proto::size::parse)]
    pub retention_size: Option<u64>,
    /// Keep minute rollups (what charts of a day or so read) this long; `0` keeps them forever.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration, default_value = crate::store::retention::DEFAULT_ROLLUPS_1M)]
    pub retention_1m: Duration,
    /// Keep hour rollups (what charts of weeks and months read) this long; `0` keeps them
    /// forever.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration, default_value = crate::store::retention::DEFAULT_ROLLUPS_1H)]
    pub retention_1h: Duration,
    /// Address for agents (gRPC).
    #[arg(long, env = "SHOAL_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: String,
    /// Address for the REST API, /healthz and /metrics.
    #[arg(long, env = "SHOAL_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: String,
    /// A device silent this long is "stale".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub stale_after: Duration,
    /// A device silent this long is "offline".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub offline_after: Duration,
    /// Samples timestamped further ahead of the hub's clock are rejected.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub max_clock_skew: Duration,
    /// Largest gRPC message or MQTT payload accepted, in bytes.
    #[arg(long, default_value_t = shoal_proto::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Run the embedded MQTT broker on this address (agents use --hub mqtt://ADDR).
    #[arg(long, env = "SHOAL_MQTT_LISTEN")]
    pub mqtt_listen: Option<String>,
    /// Users of the embedded broker, one NAME:PASSWORD[:ROLE] per line (ROLE device or
    /// observer); without it any client may connect and its client id is its device id.
    #[arg(long, env = "SHOAL_MQTT_USERS")]
    pub mqtt_users: Option<PathBuf>,
    /// Topic filter of the plain JSON form {"device":…,"temp":…,"load":…} (the book's
    /// mosquitto_pub scripts); "" turns it off. See docs/mqtt.md for the mapping.
    #[arg(long, default_value = "sensor/+")]
    pub mqtt_json_topic: String,
    /// Certificate chain (PEM) of the embedded broker: with --mqtt-tls-key it speaks MQTT over
    /// TLS only (agents use --hub mqtts://ADDR --tls-ca CA).
    #[arg(long, env = "SHOAL_MQTT_TLS_CERT")]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the embedded broker's certificate.
    #[arg(long, env = "SHOAL_MQTT_TLS_KEY")]
    pub mqtt_tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that verify an mqtts:// --mqtt-broker.
    #[arg(long, env = "SHOAL_MQTT_TLS_CA")]
    pub mqtt_tls_ca: Option<PathBuf>,
    /// Also ingest from this MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (agents run with --hub mqtt://...).
    #[arg(long, env = "SHOAL_MQTT_BROKER")]
    pub mqtt_broker: Option<String>,
    /// Run `shoal.dev/runner: kubernetes` jobs as Jobs in the cluster of this kubeconfig (its
    /// current context).
    #[arg(long, env = "SHOAL_KUBECONFIG", conflicts_with = "kube_in_cluster")]
    pub kubeconfig: Option<PathBuf>,
    /// Run `shoal.dev/runner: kubernetes` jobs in the cluster the hub runs in (its pod's
    /// service account; see deploy/kubernetes for the RBAC it needs).
    #[arg(long, env = "SHOAL_KUBE_IN_CLUSTER")]
    pub kube_in_cluster: bool,
    /// Namespace for Jobs whose manifest names none (default: the kubeconfig context's, or the
    /// pod's own).
    #[arg(long, env = "SHOAL_KUBE_NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// How often a running Kubernetes Job's status is read.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub kube_poll: Duration,
    /// MLflow tracking server given to every job run as MLFLOW_TRACKING_URI.
    #[arg(long, env = "MLFLOW_TRACKING_URI")]
    pub mlflow_tracking_uri: Option<String>,
    /// Where datasets live (s3://BUCKET/PREFIX or a folder), given to every job run as
    /// SHOAL_DATASET_URI.
    #[arg(long, env = "SHOAL_DATASET_URI")]
    pub dataset_uri: Option<String>,
    /// The deployed model that scores incoming telemetry (`shoal models deploy NAME`); ""
    /// turns scoring off.
    #[arg(long, env = "SHOAL_SCORING_MODEL", default_value = "shoal-anomaly")]
    pub scoring_model: String,
    /// Time between scoring rounds (new samples are scored in one request per round).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    pub scoring_period: Duration,
    /// Score above which a reading counts toward an alert (default: the model's threshold).
    #[arg(long)]
    pub alert_threshold: Option<f64>,
    /// Readings in a row above the threshold that open an alert (and below it, resolve it).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub alert_samples: u32,
    /// URL alerts are POSTed to as JSON ({"event": "opened"|"resolved", "alert": {…}}).
    #[arg(long, env = "SHOAL_ALERT_WEBHOOK")]
    pub alert_webhook: Option<String>,
    /// A public key (PEM, `shoal keys generate`) whose signed model statements the
    /// provenance ledger records; repeatable.
    #[arg(long = "provenance-key", value_name = "FILE")]
    pub provenance_keys: Vec<PathBuf>,
    /// A P-256 signing key (PKCS#8 PEM, `shoal keys generate`) given to the training jobs the
    /// hub runs (SHOAL_SIGNING_KEY_FILE), so every model they train is signed and recorded in
    /// the ledger; its public key is trusted like a --provenance-key.
    #[arg(long, env = "SHOAL_SIGNING_KEY_FILE")]
    pub signing_key: Option<PathBuf>,
    /// What a model needs before `shoal models deploy` serves it or sends it to Seldon: a
    /// statement signed by a trusted key naming its model.onnx in the ledger (signed), and
    /// that statement anchored on chain (anchored; needs --chain-rpc).
    #[arg(long, value_enum, default_value = "none")]
    pub deploy_requires: crate::provenance::Requirement,
    /// An Ethereum JSON-RPC URL (Besu, geth, anvil): the hub anchors its provenance ledger
    /// there, through the ShoalProvenance contract. Needs --chain-id and --chain-key-file.
    #[arg(long, env = "SHOAL_CHAIN_RPC", requires_all = ["chain_id", "chain_key_file"])]
    pub chain_rpc: Option<String>,
    /// The chain id --chain-rpc must serve; the hub refuses any other chain.
    #[arg(long, env = "SHOAL_CHAIN_ID")]
    pub chain_id: Option<u64>,
    /// The hub's chain account: a file holding its private key (32 bytes of hex).
    #[arg(long, env = "SHOAL_CHAIN_KEY_FILE")]
    pub chain_key_file: Option<PathBuf>,
    /// The ShoalProvenance contract's address; without it the hub deploys one, once per chain,
    /// and keeps its address.
    #[arg(long, env = "SHOAL_CHAIN_CONTRACT")]
    pub chain_contract: Option<String>,
    /// Blocks, the anchor's own included, before an anchor counts as anchored.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub chain_confirmations: u64,
    /// Forward every stored sample and device event to Kafka or Elasticsearch: repeatable.
    /// kafka://HOST:PORT[,HOST:PORT]/TOPIC[?format=json] (default topic shoal.telemetry.v1;
    /// the topic must exist), elasticsearch+http(s)://[USER:PASSWORD@]HOST:PORT[?prefix=sensor]
    /// (monthly indices PREFIX-YYYY-MM). Options: name=NAME, batch=5000, timeout=30s,
    /// max_backoff=30s. Each sink
    /// reads the store through its own durable cursor: one that is down catches up later, and
    /// ingest never waits for it. See docs/data-platform.md.
    #[arg(
        long = "sink",
        value_name = "URL",
        env = "SHOAL_SINKS",
        value_delimiter = ' '
    )]
    pub sinks: Vec<String>,
    /// Also ingest from a Kafka topic that hubs' Kafka sinks write, as one member of a consumer
    /// group: kafka://HOST:PORT/TOPIC[?group=shoal-hubs]. Hubs in one group split the
    /// partitions; offsets are committed only after the store has committed.
    #[arg(long, env = "SHOAL_INGEST_FROM", value_name = "URL")]
    pub ingest_from: Option<String>,
    /// Client id of the hub's persistent session on the broker.
    #[arg(long, default_value = "shoal-hub")]
    pub mqtt_client_id: String,
    /// Shared-subscription group, so several hubs split the devices; "" subscribes plainly.
    #[arg(long, default_value = "shoal")]
    pub mqtt_share_group: String,
    /// User name on the broker.
    #[arg(long, env = "SHOAL_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// Password on the broker (prefer the environment variable).
    #[arg(long, env = "SHOAL_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
    /// Turn API authentication off: every caller may do everything. Only on a loopback
    /// --http-listen; anywhere else it is refused (see --insecure-no-auth).
    #[arg(long, env = "SHOAL_NO_AUTH")]
    pub no_auth: bool,
    /// Turn API authentication off even on a non-loopback address: only behind something
    /// that authenticates every request itself.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Whether /metrics needs a token (any role) or is open to scrapers.
    #[arg(long, value_enum, default_value = "open")]
    pub metrics_auth: MetricsAuth,
    /// Also accept JWT bearer tokens from this OpenID Connect issuer (e.g.
    /// https://keycloak.example/realms/shoal); its keys come from its JWKS. Needs
    /// --oidc-audience.
    #[arg(long, env = "SHOAL_OIDC_ISSUER", requires = "oidc_audience")]
    pub oidc_issuer: Option<String>,
    /// The audience (`aud`) a JWT must name: the client id the issuer knows Shoal by.
    #[arg(long, env = "SHOAL_OIDC_AUDIENCE", requires = "oidc_issuer")]
    pub oidc_audience: Option<String>,
    /// Dot path of the JWT claim holding role names (Keycloak: realm_access.roles, or
    /// resource_access.CLIENT.roles; others: groups or roles).
    #[arg(
        long,
        env = "SHOAL_OIDC_ROLE_CLAIM",
        default_value = "realm_access.roles"
    )]
    pub oidc_role_claim: String,
    /// Prefix of Shoal's role names in that claim: with `shoal-`, `shoal-admin` is admin.
    #[arg(long, env = "SHOAL_OIDC_ROLE_PREFIX", default_value = "")]
    pub oidc_role_prefix: String,
    /// How devices prove who they are on the gRPC port. `cert`: TLS, and each device presents
    /// the certificate it got at enrollment (shoal devices enroll; shoal-agent enroll).
    /// `none`: plaintext, any client may send as any device id; only on a loopback
    /// --grpc-listen unless --insecure-no-auth.
    #[arg(long, env = "SHOAL_DEVICE_AUTH", value_enum, default_value = "cert")]
    pub device_auth: DeviceAuthMode,
    /// Sign device certificates with this CA certificate (PEM) instead of the CA the hub
    /// makes in DATA_DIR/ca; needs --device-ca-key.
    #[arg(long, env = "SHOAL_DEVICE_CA_CERT", requires = "device_ca_key")]
    pub device_ca_cert: Option<PathBuf>,
    /// The private key (PEM, PKCS#8) of --device-ca-cert.
    #[arg(long, env = "SHOAL_DEVICE_CA_KEY", requires = "device_ca_cert")]
    pub device_ca_key: Option<PathBuf>,
    /// The gRPC port's certificate chain (PEM); without it the device CA issues one at each
    /// start for localhost, this host's name, the listen address and every --grpc-tls-name.
    #[arg(long, env = "SHOAL_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --grpc-tls-cert.
    #[arg(long, env = "SHOAL_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Another DNS name or IP address agents reach the hub by (repeatable), e.g. the
    /// Kubernetes Service's name.
    #[arg(long = "grpc-tls-name", value_name = "NAME")]
    pub grpc_tls_names: Vec<String>,
    /// How long a device certificate lasts; agents renew at 2/3 of it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
    pub device_cert_ttl: Duration,
    /// How long after expiry a device may still renew its certificate (a device that was
    /// offline past its expiry); nothing else is allowed with an expired certificate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
    pub device_renew_grace: Duration,
}

/// See `shoal serve --device-auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceAuthMode {
    Cert,
    None,
}

impl ServeArgs {
    /// `--device-auth` and its certificates.
    fn device_auth(&self) -> Result<DeviceAuthConfig, String> {
        if self.device_cert_ttl < Duration::from_secs(1) {
            return Err("invalid device-cert-ttl: must be at least 1s".into());
        }
        let listen = self.grpc_listen.parse().ok();
        let mut names = default_serving_names(listen);
        names.extend(self.grpc_tls_names.iter().cloned());
        Ok(DeviceAuthConfig {
            enforce: self.device_auth == DeviceAuthMode::Cert,
            ca: self.device_ca_cert.clone().zip(self.device_ca_key.clone()),
            serving: match (self.grpc_tls_cert.clone(), self.grpc_tls_key.clone()) {
                (Some(cert), Some(key)) => auth::tls::ServingCert::Files { cert, key },
                _ => auth::tls::ServingCert::Issued { names },
            },
            policy: auth::devices::CertPolicy {
                lifetime: self.device_cert_ttl,
                grace: self.device_renew_grace,
            },
        })
    }

    /// `--oidc-*`: the issuer JWTs are accepted from, if any.
    fn oidc(&self) -> Result<Option<auth::oidc::OidcConfig>, String> {
        let (Some(issuer), Some(audience)) = (&self.oidc_issuer, &self.oidc_audience) else {
            return Ok(None);
        };
        if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
            return Err(format!(
                "invalid oidc-issuer: {issuer:?} is not an http(s) URL"
            ));
        }
        Ok(Some(auth::oidc::OidcConfig {
            issuer: issuer.clone(),
            audience: audience.clone(),
            role_claim: self.oidc_role_claim.clone(),
            role_prefix: self.oidc_role_prefix.clone(),
        }))
    }

    /// The chain settings, checked; `None` without --chain-rpc.
    #[allow(clippy::type_complexity)]
    fn chain(
        &self,
    ) -> Result<
        Option<(
            crate::provenance::chain::ChainConfig,
            alloy::signers::local::PrivateKeySigner,
        )>,
        String,
    > {
        let (Some(rpc), Some(chain_id), Some(key_file)) =
            (&self.chain_rpc, self.chain_id, &self.chain_key_file)
        else {
            return Ok(None);
        };
        if !(rpc.starts_with("http://") || rpc.starts_with("https://")) {
            return Err(format!("invalid chain-rpc: {rpc:?} is not an http(s) URL"));
        }
        let text = std::fs::read_to_string(key_file)
            .map_err(|e| format!("invalid chain-key-file: {}: {e}", key_file.display()))?;
        let key = crate::provenance::chain::load_key(&text)
            .map_err(|e| format!("invalid chain-key-file: {}: {e}", key_file.display()))?;
        let contract = self
            .chain_contract
            .as_deref()
            .map(|c| c.parse())
            .transpose()
            .map_err(|e| format!("invalid chain-contract: {e}"))?;
        Ok(Some((
            crate::provenance::chain::ChainConfig {
                rpc: rpc.clone(),
                chain_id,
                contract,
                confirmations: self.chain_confirmations,
            },
            key,
        )))
    }

    /// The hub's settings from these flags; `Err` names the flag.
    pub fn to_config(&self) -> Result<HubConfig, String> {
        let a = self.clone();
        let mqtt_users = a
            .mqtt_users
            .as_deref()
            .map(Users::load)
            .transpose()
            .map_err(|e| format!("invalid mqtt-users: {e}"))?;
        let mqtt_tls = match (&a.mqtt_tls_cert, &a.mqtt_tls_key) {
            (Some(cert), Some(key)) => {
                server_config(cert, key).map_err(|e| format!("invalid mqtt-tls-cert/key: {e}"))?;
                Some((cert.clone(), key.clone()))
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
        let devices = self.device_auth()?;
        if let Some(url) = &a.alert_webhook
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "invalid alert-webhook: {url:?} is not an http(s) URL"
            ));
        }
        if a.alert_threshold.is_some_and(|t| !t.is_finite() || t < 0.0) {
            return Err("invalid alert-threshold: a score is a non-negative number".into());
        }
        for key in &a.provenance_keys {
            shoal_ml::provenance::PublicKey::load(key)
                .map_err(|e| format!("invalid provenance-key: {e}"))?;
        }
        let chain = self.chain()?;
        let sinks =
            crate::platform::parse_sinks(&a.sinks).map_err(|e| format!("invalid sink: {e}"))?;
        let ingest_from = a
            .ingest_from
            .as_deref()
            .map(crate::platform::consume::IngestFrom::parse)
            .transpose()
            .map_err(|e| format!("invalid ingest-from: {e}"))?;
        if let Some(from) = &ingest_from
            && let Some(s) = sinks.iter().find(|s| {
                s.kind == crate::platform::SinkKind::Kafka
                    && s.endpoint == from.brokers
                    && s.target == from.topic
            })
        {
            return Err(format!(
                "invalid ingest-from: the sink {:?} writes the topic this hub reads ({}); every sample would come back to it",
                s.name, from.topic
            ));
        }
        if a.deploy_requires == crate::provenance::Requirement::Anchored && chain.is_none() {
            return Err(
                "invalid deploy-requires: anchored needs a chain (--chain-rpc, --chain-id, --chain-key-file)"
                    .into(),
            );
        }
        if let Some(key) = &a.signing_key {
            shoal_ml::provenance::SigningKey::load(key)
                .map_err(|e| format!("invalid signing-key: {e}"))?;
        }
        Ok(HubConfig {
            sinks,
            ingest_from,
            devices,
            chain,
            signing_key: a.signing_key.clone(),
            deploy_requires: a.deploy_requires,
            provenance_keys: a.provenance_keys.clone(),
            scoring: ScoringConfig {
                model: a.scoring_model.clone(),
                period: a.scoring_period.max(Duration::from_millis(10)),
                rule: crate::models::alerts::AlertRule {
                    threshold: a.alert_threshold,
                    samples: a.alert_samples,
                },
                webhook: a.alert_webhook.clone(),
            },
            auth: AuthConfig {
                enforce: !(a.no_auth || a.insecure_no_auth),
                allow_exposed: a.insecure_no_auth,
                metrics: a.metrics_auth,
                oidc: self.oidc()?,
            },
            data_dir: a.data_dir,
            store: crate::store::StorePolicy {
                min_free_bytes: a.min_free_space,
                retention: crate::store::retention::RetentionPolicy {
                    max_age: a.retention,
                    max_size: a.retention_size,
                    rollups_1m: Some(a.retention_1m).filter(|d| !d.is_zero()),
                    rollups_1h: Some(a.retention_1h).filter(|d| !d.is_zero()),
                },
            },
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
}
