//! `shoal serve`: the hub's settings ([`HubConfig`]) and [`run`], which wires store, ingest,
//! embedded broker, scheduler and REST API together and drains them on shutdown. It may use
//! every other module; none uses it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{api, ingest, jobs, mqtt};

use crate::ingest::grpc::IngestService;
use crate::ingest::{IngestLimits, Ingestor};
use crate::metrics::Metrics;
use crate::registry::StatusThresholds;
use crate::store::writer::{Fleet, Writer};
use crate::store::{Store, StoreError};

/// Everything `shoal serve` needs besides its sockets.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    pub thresholds: StatusThresholds,
    pub limits: IngestLimits,
    /// Also ingest from this external MQTT broker.
    pub mqtt_broker: Option<ingest::mqtt::BrokerConfig>,
    /// Credentials for the embedded broker; `None` lets any client connect.
    pub mqtt_users: Option<mqtt::acl::Users>,
    /// MQTT topic filter of the plain JSON form (`sensor/+`); empty turns it off.
    pub mqtt_json_topic: String,
    /// TLS for the embedded broker: it then speaks MQTT over TLS only.
    pub mqtt_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
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
        if self.limits.max_message_bytes < 64 * 1024 {
            return Err(HubError::Config {
                field: "max-message-size",
                reason: "must be at least 64KiB".into(),
            });
        }
        Ok(())
    }
}

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
    let Listeners {
        grpc,
        http,
        mqtt: mqtt_listener,
    } = listeners;
    config.validate()?;
    let cluster = match &config.kubernetes {
        Some(source) => {
            let cluster = jobs::cluster::Cluster::connect(source, config.kube_namespace.as_deref())
                .await
                .map_err(|e| HubError::Config {
                    field: "kubeconfig",
                    reason: e.to_string(),
                })?
                .with_poll(config.kube_poll);
            tracing::info!(namespace = cluster.namespace(), "Kubernetes runner ready");
            Some(cluster)
        }
        None => None,
    };
    let store = Store::open(&config.data_dir)?;
    let fleet = Arc::new(Fleet::from_loaded(&store)?);
    let metrics = Arc::new(Metrics::default());
    let (writer, writer_thread) = Writer::start(store.clone(), fleet.clone(), metrics.clone());
    tracing::info!(
        data_dir = %config.data_dir.display(),
        grpc = %grpc.local_addr()?,
        http = %http.local_addr()?,
        devices = fleet.len(),
        "hub serving"
    );

    let ingestor = Ingestor::new(writer, metrics.clone(), config.limits);
    let mqtt_task = config.mqtt_broker.clone().map(|broker| {
        tokio::spawn(ingest::mqtt::run_external(
            broker,
            ingestor.clone(),
            shutdown.clone(),
        ))
    });
    let broker_task = mqtt_listener.map(|l| {
        tokio::spawn(mqtt::serve(
            l,
            config.mqtt_users.clone(),
            config.mqtt_json_topic.clone(),
            config.mqtt_tls.clone(),
            ingestor.clone(),
            shutdown.clone(),
        ))
    });
    let service = IngestService::new(ingestor);
    let grpc_task = tokio::spawn(ingest::grpc::serve(
        grpc,
        service,
        config.limits,
        metrics.clone(),
        shutdown.clone(),
    ));

    let job_store = jobs::store::JobStore::new(store.clone())?;
    let hub_url = format!("http://{}", http.local_addr()?);
    let runs_dir = config.data_dir.join("runs");
    let scheduler_config = jobs::scheduler::SchedulerConfig {
        runs_dir: runs_dir.clone(),
        hub_url: hub_url.clone(),
        mlflow_tracking_uri: config.mlflow_tracking_uri.clone(),
        dataset_uri: config.dataset_uri.clone(),
        values_dir: Some(config.data_dir.clone()),
        backoff_base: Duration::from_secs(10),
        log_limit: 1024 * 1024,
        grace: Duration::from_secs(10),
        cluster,
    };
    let (scheduler, scheduler_task) = jobs::scheduler::Scheduler::start(
        job_store.clone(),
        scheduler_config,
        jobs::scheduler::wall_clock(),
        shutdown.clone(),
    )
    .map_err(|e| HubError::Jobs(e.to_string()))?;
    let state = api::AppState {
        jobs: scheduler,
        job_store,
        runs_dir,
        hub_url,
        store,
        fleet,
        metrics,
        thresholds: config.thresholds,
    };
    let mut http_shutdown = shutdown.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http, api::router(state))
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            })
            .await
    });

    let (grpc_res, http_res) = tokio::join!(grpc_task, http_task);
    for t in [mqtt_task, broker_task].into_iter().flatten() {
        let _ = t.await;
    }
    let _ = scheduler_task.await;
    grpc_res.expect("grpc task")?;
    http_res.expect("http task")?;
    // The service (and with it the last writer handle) is gone: the writer commits what is
    // queued and stops.
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    tracing::info!("hub stopped");
    Ok(())
}
