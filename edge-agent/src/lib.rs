//! `shoal-agent`: samples its device and reports to the hub without losing a sample.
//!
//! # Layout
//! - [`config`]: the agent's settings, defaults and validation.
//! - [`collector`]: what a sample holds (system metrics via `sysinfo`) and who the device is.
//! - [`board`]: Raspberry Pi, Jetson and thermal-zone readings through a sysroot.
//! - [`spool`]: the durable, bounded, crash-safe on-disk queue between sampling and sending.
//! - [`transport`]: gRPC or MQTT to the hub, acks, reconnects with backoff.
//! - [`identity`]: the device's key and certificate on a hub that requires them: enrollment,
//!   renewal, and the TLS settings the gRPC transport presents them with.
//! - [`metrics`]: the agent's own counters for Prometheus, on an opt-in `--metrics-listen`.
//!
//! [`run`] wires them: a sampler task appends to the spool every interval, a sender task drains
//! it; both stop on the shutdown signal.
#![forbid(unsafe_code)]

pub mod board;
pub mod clock;
pub mod collector;
pub mod config;
pub mod gpu;
pub mod identity;
pub mod metrics;
pub mod spool;
pub mod transport;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::{Notify, watch};

use crate::collector::SystemCollector;
use crate::config::{AgentConfig, ConfigError};
use crate::spool::{Spool, SpoolError, SpoolLimits, SpoolStatus};
use crate::transport::{Sender, Stopped};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Collector(#[from] collector::CollectorError),
    #[error(
        "no device id given and none could be derived from /etc/machine-id or the hostname; pass --device-id"
    )]
    NoDeviceId,
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("this device is enrolled as {enrolled:?} (its certificate names it), not {given:?}")]
    DeviceIdMismatch { enrolled: String, given: String },
    #[error("cannot serve metrics on --metrics-listen {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Counters of one agent run (what `--metrics-listen` serves).
#[derive(Debug, Default)]
pub struct Stats {
    pub samples_taken: AtomicU64,
    pub samples_sent: AtomicU64,
    pub samples_acked: AtomicU64,
    pub samples_rejected: AtomicU64,
    pub reconnects: AtomicU64,
    /// Spooled samples renumbered above a hub's seq instead of being discarded.
    pub samples_renumbered: AtomicU64,
    /// True while a stream to the hub (or its broker) is up.
    pub connected: AtomicBool,
    /// Errors by [`ErrorKind`].
    pub errors: [AtomicU64; ErrorKind::ALL.len()],
    /// The last error: its kind and time always, its message only with `keep_last_error`.
    pub last_error: Mutex<Option<LastError>>,
    /// Keep the last error's message (for the metrics endpoint); off, recording an error
    /// allocates nothing.
    pub keep_last_error: bool,
}

/// What kind of trouble the agent ran into, for `shoal_agent_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The hub (or broker) could not be reached.
    Connect = 0,
    /// An established stream failed or was closed.
    Stream = 1,
    /// The hub did not acknowledge in time; what was in flight is resent.
    AckTimeout = 2,
    /// The hub answered out of protocol.
    Protocol = 3,
    /// The spool could not be read or written.
    Spool = 4,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Stream,
        ErrorKind::AckTimeout,
        ErrorKind::Protocol,
        ErrorKind::Spool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Stream => "stream",
            ErrorKind::AckTimeout => "ack_timeout",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Spool => "spool",
        }
    }
}

/// The most recent error.
#[derive(Debug, Clone)]
pub struct LastError {
    pub kind: ErrorKind,
    pub unix_seconds: u64,
    /// Empty unless [`Stats::keep_last_error`].
    pub message: String,
}

impl Stats {
    /// Counts an error and remembers it as the last one.
    pub fn record_error(&self, kind: ErrorKind, error: &dyn std::fmt::Display) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        let unix_seconds = u64::try_from(clock::now_ms() / 1000).unwrap_or(0);
        let message = if self.keep_last_error {
            error.to_string()
        } else {
            String::new()
        };
        *self.last_error.lock().expect("last error lock") = Some(LastError {
            kind,
            unix_seconds,
            message,
        });
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub device_id: String,
    pub samples_taken: u64,
    pub samples_acked: u64,
    pub samples_rejected: u64,
    pub reconnects: u64,
    pub spool: SpoolStatus,
    pub drained: bool,
}

/// Options of a run that are not device configuration.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunOptions {
    /// Take this many samples, wait until all are acknowledged, then return.
    pub count: Option<u64>,
}

/// Samples and reports until `shutdown` turns true (or, with `count`, until done).
pub async fn run(
    config: AgentConfig,
    options: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<RunSummary, AgentError> {
    config.validate()?;
    let (identity, device_id) = who_am_i(&config).await?;
    let grpc_tls = start_renewal(&config, identity.as_ref(), &shutdown)?;
    let collector = SystemCollector::new()?;
    let spool = Arc::new(Mutex::new(open_spool(&config, &device_id)?));
    let new_data = Arc::new(Notify::new());
    let metrics_addr = config.metrics_addr()?;
    let stats = Arc::new(Stats {
        keep_last_error: metrics_addr.is_some(),
        ..Stats::default()
    });
    // Off (the default), the metrics endpoint costs nothing: no listener, no task.
    if let Some(addr) = metrics_addr {
        let info = metrics::Info {
            device_id: device_id.clone(),
            transport: transport::name(&config.hub),
        };
        serve_metrics(addr, info, &stats, &spool, shutdown.clone()).await?;
    }
    let (done_tx, done_rx) = watch::channel(false);

    let sender = Sender {
        hub: config.hub.clone(),
        hello: hello(&config, identity.as_ref(), &device_id, &collector),
        spool: spool.clone(),
        new_data: new_data.clone(),
        stats: stats.clone(),
        batch_max_samples: config.batch_max_samples,
        sampling_done: done_rx,
        ack_timeout: config.ack_timeout,
        tls: match (&identity, config.hub.starts_with("mqtts://")) {
            (Some(i), true) => Some(i.mqtt_tls_config(config.tls_ca.as_deref())?),
            _ => tls_config(&config)?,
        },
        grpc_tls,
        mqtt_credentials: mqtt_credentials(&config)?,
    };
    let sender = tokio::spawn(sender.run(shutdown.clone()));

    let mut sampler = Sampler {
        collector,
        spool: spool.clone(),
        new_data,
        stats: stats.clone(),
        interval: config.interval,
        count: options.count,
    };
    let sampled = sampler.run(shutdown).await;
    let _ = done_tx.send(true);
    let stopped = match sampled {
        Err(e) => {
            sender.abort();
            return Err(e.into());
        }
        Ok(()) => sender.await.unwrap_or(Stopped::Shutdown),
    };
    let summary = RunSummary {
        device_id,
        samples_taken: stats.samples_taken.load(Ordering::Relaxed),
        samples_acked: stats.samples_acked.load(Ordering::Relaxed),
        samples_rejected: stats.samples_rejected.load(Ordering::Relaxed),
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        spool: spool.lock().expect("spool lock").status(),
        drained: stopped == Stopped::Drained,
    };
    tracing::info!(?summary, "agent stopped");
    Ok(summary)
}

/// The device's identity (when the hub is reached with a certificate) and its id: the
/// certificate's, else `device_id`, else the machine's.
async fn who_am_i(
    config: &AgentConfig,
) -> Result<(Option<identity::Identity>, String), AgentError> {
    let identity = if config.uses_identity() {
        Some(load_or_enroll(config).await?)
    } else {
        None
    };
    let device_id = match (&identity, &config.device_id) {
        (Some(i), Some(given)) if *given != i.info.device_id => {
            return Err(AgentError::DeviceIdMismatch {
                enrolled: i.info.device_id.clone(),
                given: given.clone(),
            });
        }
        (Some(i), _) => i.info.device_id.clone(),
        (None, Some(id)) => id.clone(),
        (None, None) => collector::default_device_id().ok_or(AgentError::NoDeviceId)?,
    };
    Ok((identity, device_id))
}

/// The hello: the device as the collector sees it, with the enrollment's labels under the
/// configured ones.
fn hello(
    config: &AgentConfig,
    identity: Option<&identity::Identity>,
    device_id: &str,
    collector: &SystemCollector,
) -> shoal_proto::v1::DeviceHello {
    let mut labels = identity.map(|i| i.info.labels.clone()).unwrap_or_default();
    labels.extend(config.labels.clone());
    let mut hello = collector::describe_device(device_id, &labels);
    (hello.gpu_driver_version, hello.cuda_version) = collector.gpu_versions();
    hello
}

/// The identity in the identity dir; with none there and `enroll_token_file` set, enrolls
/// first.
async fn load_or_enroll(config: &AgentConfig) -> Result<identity::Identity, AgentError> {
    let dir = config.identity_dir();
    if let Some(found) = identity::Identity::load(&dir)? {
        return Ok(found);
    }
    let Some(file) = &config.enroll_token_file else {
        return Err(identity::IdentityError::NotEnrolled(dir).into());
    };
    let token = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.clone(),
        source,
    })?;
    let trust = match (&config.ca_sha256, &config.tls_ca) {
        (Some(pin), _) => identity::Trust::Fingerprint(pin.clone()),
        (None, Some(ca)) => identity::Trust::CaFile(ca.clone()),
        (None, None) => unreachable!("validate() requires one"),
    };
    let enrolled = identity::enroll(&config.hub, token.trim(), &trust, &dir).await?;
    tracing::info!(device_id = %enrolled.info.device_id, identity = %dir.display(), "enrolled");
    Ok(enrolled)
}

/// The TLS settings that present `identity`, kept current by a renewal task of their own.
fn start_renewal(
    config: &AgentConfig,
    identity: Option<&identity::Identity>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<identity::SharedTls>, AgentError> {
    let Some(identity) = identity else {
        return Ok(None);
    };
    if !config.hub.starts_with("https://") {
        // MQTT presents the certificate; renewal needs the gRPC port (`shoal-agent enroll`
        // again when it nears expiry).
        return Ok(None);
    }
    let tls = Arc::new(std::sync::RwLock::new(
        identity.tls_config(config.tls_ca.as_deref())?,
    ));
    tokio::spawn(identity::keep_renewed(
        config.hub.clone(),
        identity.clone(),
        config.tls_ca.clone(),
        tls.clone(),
        shutdown.clone(),
    ));
    Ok(Some(tls))
}

/// Opens the spool under its size bound and logs the start of the run with what it holds.
fn open_spool(config: &AgentConfig, device_id: &str) -> Result<Spool, AgentError> {
    let limits = SpoolLimits::with_max_bytes(config.spool_max_bytes()?);
    let (spool, report) = Spool::open(&config.spool_dir, limits)?;
    let status = spool.status();
    tracing::info!(
        device_id = %device_id,
        hub = %config.hub,
        spool = %config.spool_dir.display(),
        pending = status.pending,
        torn_bytes = report.torn_bytes,
        "agent starting"
    );
    Ok(spool)
}

/// Binds the metrics endpoint on `addr` and serves it in a task of its own until shutdown.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    info: metrics::Info,
    stats: &Arc<Stats>,
    spool: &Arc<Mutex<Spool>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let server = metrics::Server::bind(addr, info, stats.clone(), spool.clone())
        .await
        .map_err(|source| AgentError::MetricsListen { addr, source })?;
    tokio::spawn(server.serve(shutdown));
    Ok(())
}

/// The TLS settings for an `mqtts://` hub, from `--tls-ca` when given.
fn tls_config(config: &AgentConfig) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
    let Some(ca) = &config.tls_ca else {
        return Ok(None);
    };
    shoal_proto::mqtt::client::tls_config(ca)
        .map(Some)
        .map_err(|reason| ConfigError::Invalid {
            field: "tls-ca",
            reason,
        })
}

/// The MQTT user name and password, when a user name is configured.
fn mqtt_credentials(config: &AgentConfig) -> Result<Option<(String, String)>, ConfigError> {
    config
        .mqtt_username
        .clone()
        .map(|user| {
            config
                .mqtt_password()
                .map(|p| (user, p.unwrap_or_default()))
        })
        .transpose()
}

/// The sampling side of a run: a sample every interval, appended to the spool for the sender.
struct Sampler {
    collector: SystemCollector,
    spool: Arc<Mutex<Spool>>,
    new_data: Arc<Notify>,
    stats: Arc<Stats>,
    interval: std::time::Duration,
    /// Stop after this many samples.
    count: Option<u64>,
}

impl Sampler {
    /// Samples until `shutdown` turns true or `count` samples are taken; stops at the first
    /// spool write that fails, so that no sample is lost silently.
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), SpoolError> {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self
                .count
                .is_some_and(|n| self.stats.samples_taken.load(Ordering::Relaxed) >= n)
            {
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.append_sample() {
                self.stats.record_error(ErrorKind::Spool, &e);
                tracing::error!(error = %e, "cannot write to the spool; stopping so that no sample is lost silently");
                return Err(e);
            }
            self.stats.samples_taken.fetch_add(1, Ordering::Relaxed);
            self.new_data.notify_one();
        }
    }

    /// Takes one sample and appends it to the spool under the spool's next seq.
    fn append_sample(&mut self) -> Result<(), SpoolError> {
        let mut sample = self.collector.sample();
        let mut spool = self.spool.lock().expect("spool lock");
        sample.seq = spool.next_seq();
        spool.append(sample.seq, &sample.encode_to_vec())
    }
}
