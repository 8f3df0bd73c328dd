//! `shoal up`: the one-command demo — a hub on embedded defaults plus a local agent reporting
//! to it, everything under one data folder.

use std::path::PathBuf;
use std::time::Duration;

use shoal_agent::RunOptions;
use shoal_agent::config::AgentConfig;
use tokio::net::TcpListener;
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

/// Runs hub and agent until `shutdown`; `on_ready` gets the bound addresses.
pub async fn up(
    opts: UpOptions,
    on_ready: impl FnOnce(&Endpoints, &AgentConfig),
    shutdown: watch::Receiver<bool>,
) -> Result<(), HubError> {
    let grpc = bind(&opts.grpc_listen, "grpc-listen").await?;
    let http = bind(&opts.http_listen, "http-listen").await?;
    let mqtt = bind(&opts.mqtt_listen, "mqtt-listen").await?;
    let endpoints = Endpoints {
        grpc: grpc.local_addr()?,
        http: http.local_addr()?,
        mqtt: Some(mqtt.local_addr()?),
    };
    let hub_config = HubConfig {
        data_dir: opts.data_dir.join("hub"),
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
    };
    let agent_config = AgentConfig {
        hub: format!("http://{}", endpoints.grpc),
        interval: opts.interval,
        spool_dir: opts.data_dir.join("agent-spool"),
        labels: [("source".to_string(), "shoal-up".to_string())].into(),
        ..AgentConfig::default()
    };
    agent_config.validate().map_err(|e| HubError::Config {
        field: "interval",
        reason: e.to_string(),
    })?;
    on_ready(&endpoints, &agent_config);

    let listeners = crate::Listeners {
        grpc,
        http,
        mqtt: Some(mqtt),
    };
    let hub = tokio::spawn(crate::run(hub_config, listeners, shutdown.clone()));
    let agent = tokio::spawn(shoal_agent::run(
        agent_config,
        RunOptions::default(),
        shutdown,
    ));
    let agent_result = agent.await.expect("agent task");
    let hub_result = hub.await.expect("hub task");
    if let Err(e) = agent_result {
        tracing::error!(error = %e, "the local agent stopped");
    }
    hub_result
}

async fn bind(addr: &str, field: &'static str) -> Result<TcpListener, HubError> {
    TcpListener::bind(addr).await.map_err(|e| HubError::Config {
        field,
        reason: format!("cannot listen on {addr}: {e}"),
    })
}
