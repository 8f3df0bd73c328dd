//! The data platform: sinks that forward what the hub stores to Kafka and Elasticsearch, and
//! consumer mode, where hubs ingest from Kafka in a consumer group.
//!
//! Every sink reads the store's [outbox](crate::store::outbox) after commit through its own
//! durable cursor: the store is the buffer. A sink that is down keeps its place and catches up,
//! in order, when it comes back; ingest never waits for a sink. One [`Sink`] per engine
//! ([`kafka`], [`elastic`]); [`run_sink`] is the loop they share (bounded batches, backoff with
//! jitter, the cursor, the counters `shoal sinks status` and `/metrics` show).

pub mod consume;
pub mod elastic;
pub mod kafka;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use shoal_proto::v1::{DeviceEvent, StatusChange, device_event};
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::registry::StatusThresholds;
use crate::store::outbox::Entry;
use crate::store::series::now_ms;
use crate::store::writer::{Fleet, Writer};
use crate::store::{RecordTable, RecordWrite, Store, StoreError};

/// The Kafka topic a sink writes when its URL names none.
pub const DEFAULT_TOPIC: &str = "shoal.telemetry.v1";
/// The Elasticsearch index prefix when the URL names none: indices are `PREFIX-YYYY-MM`.
pub const DEFAULT_INDEX_PREFIX: &str = "sensor";
/// Most outbox entries a sink takes in one batch, unless its URL says `batch=N`.
pub const DEFAULT_BATCH: usize = 5_000;
/// Longest pause between retries of a failing sink.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a batch did not get through; the loop retries it after a pause.
#[derive(Debug, Clone)]
pub struct SinkError {
    pub message: String,
    /// What the far end asked for (HTTP `Retry-After`), if anything.
    pub retry_after: Option<Duration>,
}

impl SinkError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry_after: None,
        }
    }
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What one delivered batch came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Entries now downstream for the first time.
    pub sent: u64,
    /// Entries the far end already had (a retry after a partial failure, or a restart).
    pub already: u64,
    /// Entries the far end refuses for good (e.g. a mapping error), written to the sink's
    /// dead-letter file instead.
    pub dead: u64,
    /// Entries this engine does not take (device events, for Elasticsearch).
    pub skipped: u64,
}

/// One downstream engine.
pub trait Sink: Send {
    /// Connects and checks the far end (the topic exists; the index template is installed), and
    /// finds out what of the outbox it already has. Called before the first batch and again
    /// after every failed one; `resume_ms` is when the first entry not yet delivered was
    /// committed (`None` when there is none), so nothing older needs looking at.
    fn prepare(&mut self, resume_ms: Option<i64>) -> BoxFuture<'_, Result<(), SinkError>>;
    /// Delivers `batch` (in offset order); `Ok` once every entry is downstream or dead-lettered.
    fn deliver<'a>(&'a mut self, batch: &'a [Entry])
    -> BoxFuture<'a, Result<Delivered, SinkError>>;
}

/// Which engine a sink feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Kafka,
    Elasticsearch,
}

/// How the Kafka sink encodes values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `shoal.v1.Sample` / `shoal.v1.DeviceEvent` protobuf (the default).
    Protobuf,
    /// The JSON documented in docs/data-platform.md.
    Json,
}

/// A sink as configured: `kafka://HOST:PORT[,HOST:PORT…]/TOPIC` or
/// `elasticsearch+http(s)://[USER:PASSWORD@]HOST:PORT[/PATH]`, with query options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    pub name: String,
    pub kind: SinkKind,
    /// Kafka: the bootstrap servers; Elasticsearch: the base URL (`http(s)://HOST:PORT/PATH`).
    pub endpoint: String,
    /// Kafka: the topic; Elasticsearch: the index prefix.
    pub target: String,
    pub format: Format,
    pub batch: usize,
    /// Elasticsearch basic auth.
    pub credentials: Option<(String, String)>,
    pub timeout: Duration,
    /// Longest pause between retries.
    pub max_backoff: Duration,
}

impl SinkSpec {
    /// Parses a `--sink` URL; the error says what is wrong and what is expected.
    pub fn parse(url: &str) -> Result<Self, String> {
        let usage = "expected kafka://HOST:PORT/TOPIC or elasticsearch+http://HOST:PORT";
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not a URL; {usage}"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (kind, http_scheme) = match scheme {
            "kafka" => (SinkKind::Kafka, None),
            "elasticsearch+http" | "opensearch+http" => (SinkKind::Elasticsearch, Some("http")),
            "elasticsearch+https" | "opensearch+https" => (SinkKind::Elasticsearch, Some("https")),
            other => return Err(format!("unknown sink scheme {other:?}; {usage}")),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p.trim_end_matches('/')),
            None => (rest, ""),
        };
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => {
                let (u, p) = user.split_once(':').unwrap_or((user, ""));
                (Some((u.to_string(), p.to_string())), hosts)
            }
            None => (None, authority),
        };
        if hosts.is_empty() {
            return Err(format!("{url:?} names no host; {usage}"));
        }
        for host in hosts.split(',') {
            let port = host.rsplit_once(':').map(|(_, p)| p);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(format!("{url:?}: {host:?} is not HOST:PORT"));
            }
        }
        let mut spec = SinkSpec {
            name: match kind {
                SinkKind::Kafka => "kafka".into(),
                SinkKind::Elasticsearch => "elasticsearch".into(),
            },
            kind,
            endpoint: match http_scheme {
                Some(s) if path.is_empty() => format!("{s}://{hosts}"),
                Some(s) => format!("{s}://{hosts}/{path}"),
                None => hosts.to_string(),
            },
            target: match kind {
                SinkKind::Kafka if path.is_empty() => DEFAULT_TOPIC.into(),
                SinkKind::Kafka => path.to_string(),
                SinkKind::Elasticsearch => DEFAULT_INDEX_PREFIX.into(),
            },
            format: Format::Protobuf,
            batch: DEFAULT_BATCH,
            credentials,
            timeout: Duration::from_secs(30),
            max_backoff: MAX_BACKOFF,
        };
        if kind == SinkKind::Kafka && spec.credentials.is_some() {
            return Err(format!(
                "{url:?}: kafka:// takes no user name; SASL is not supported yet"
            ));
        }
        if kind == SinkKind::Kafka && !valid_topic(&spec.target) {
            return Err(format!(
                "{url:?}: {:?} is not a Kafka topic name (1-249 of A-Z a-z 0-9 . _ -)",
                spec.target
            ));
        }
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (kind, k) {
                (_, "name") => {
                    if !valid_name(v) {
                        return Err(format!(
                            "{url:?}: sink name {v:?} must be 1-64 of a-z 0-9 _ -"
                        ));
                    }
                    spec.name = v.to_string();
                }
                (_, "batch") => {
                    spec.batch = v
                        .parse()
                        .ok()
                        .filter(|b| (1..=100_000).contains(b))
                        .ok_or_else(|| format!("{url:?}: batch must be 1 to 100000"))?;
                }
                (_, "timeout") => {
                    spec.timeout = humantime::parse_duration(v)
                        .map_err(|e| format!("{url:?}: timeout: {e}"))?;
                }
                (_, "max_backoff") => {
                    spec.max_backoff = humantime::parse_duration(v)
                        .ok()
                        .filter(|d| *d >= Duration::from_millis(100))
                        .ok_or_else(|| {
                            format!("{url:?}: max_backoff must be a duration of at least 100ms")
                        })?;
                }
                (SinkKind::Kafka, "format") => {
                    spec.format = match v {
                        "protobuf" => Format::Protobuf,
                        "json" => Format::Json,
                        _ => return Err(format!("{url:?}: format is protobuf or json")),
                    };
                }
                (SinkKind::Elasticsearch, "prefix") => {
                    if v.is_empty()
                        || !v.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                        })
                    {
                        return Err(format!(
                            "{url:?}: prefix {v:?} must be lowercase letters, digits, - _ ."
                        ));
                    }
                    spec.target = v.to_string();
                }
                _ => return Err(format!("{url:?}: unknown option {k:?}")),
            }
        }
        Ok(spec)
    }

    /// The URL without its password, for status and logs.
    pub fn display_url(&self) -> String {
        match self.kind {
            SinkKind::Kafka => format!("kafka://{}/{}", self.endpoint, self.target),
            SinkKind::Elasticsearch => {
                let (scheme, rest) = self.endpoint.split_once("://").expect("parsed URL");
                let user = self
                    .credentials
                    .as_ref()
                    .map(|(u, _)| format!("{u}:***@"))
                    .unwrap_or_default();
                format!("elasticsearch+{scheme}://{user}{rest}")
            }
        }
    }
}

fn valid_name(v: &str) -> bool {
    (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

pub(crate) fn valid_topic(t: &str) -> bool {
    (1..=249).contains(&t.len())
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Checks a set of `--sink` URLs: parsed, and names unique.
pub fn parse_sinks(urls: &[String]) -> Result<Vec<SinkSpec>, String> {
    let mut out: Vec<SinkSpec> = Vec::new();
    for url in urls {
        let spec = SinkSpec::parse(url)?;
        if out.iter().any(|s| s.name == spec.name) {
            return Err(format!(
                "two sinks are named {:?}; give one another name with ?name=…",
                spec.name
            ));
        }
        out.push(spec);
    }
    Ok(out)
}

/// What `shoal sinks status` and `GET /api/v1/sinks` show of one sink.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SinkStatus {
    pub name: String,
    pub kind: SinkKind,
    /// The sink's URL, without a password.
    pub url: String,
    /// `starting`, `delivering`, `caught-up` or `retrying`.
    pub state: String,
    /// The last outbox offset it delivered.
    pub cursor: u64,
    /// The last outbox offset the hub committed.
    pub committed: u64,
    /// Entries (samples and device events) stored but not yet delivered.
    pub lag_entries: u64,
    /// Age of the oldest entry not yet delivered (0 when caught up).
    pub lag_seconds: f64,
    pub delivered_total: u64,
    /// Entries the far end already had (sent again after a failure; not duplicated there).
    pub already_present_total: u64,
    pub dead_letters_total: u64,
    /// The dead-letter file, once it holds anything.
    pub dead_letter_file: Option<String>,
    pub errors_total: u64,
    pub last_error: Option<String>,
    /// When the last error happened (Unix ms).
    pub last_error_ms: Option<i64>,
    /// When the last batch got through (Unix ms).
    pub last_delivery_ms: Option<i64>,
}

/// One running sink's live counters.
pub struct SinkState {
    pub spec: SinkSpec,
    cursor: AtomicU64,
    /// The cursor as last saved in the store (what a restart resumes from).
    saved: AtomicU64,
    state: Mutex<&'static str>,
    delivered: AtomicU64,
    already: AtomicU64,
    dead: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<(String, i64)>>,
    last_delivery_ms: AtomicI64,
}

impl SinkState {
    fn new(spec: SinkSpec, cursor: u64) -> Self {
        Self {
            spec,
            cursor: AtomicU64::new(cursor),
            saved: AtomicU64::new(cursor),
            state: Mutex::new("starting"),
            delivered: AtomicU64::new(0),
            already: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            last_delivery_ms: AtomicI64::new(0),
        }
    }

    pub fn cursor(&self) -> u64 {
        self.cursor.load(Relaxed)
    }

    fn set_state(&self, s: &'static str) {
        *self.state.lock().expect("sink state") = s;
    }

    fn failed(&self, e: &SinkError) {
        self.errors.fetch_add(1, Relaxed);
        *self.last_error.lock().expect("sink state") = Some((e.message.clone(), now_ms()));
        self.set_state("retrying");
    }
}

/// The hub's sinks, for status and metrics.
#[derive(Default)]
pub struct Sinks {
    pub sinks: Vec<Arc<SinkState>>,
    store: Option<Store>,
    committed: Option<watch::Receiver<u64>>,
    data_dir: std::path::PathBuf,
}

impl Sinks {
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Every sink's status, lag read from the store now.
    pub fn status(&self) -> Result<Vec<SinkStatus>, StoreError> {
        let (Some(store), Some(committed)) = (&self.store, &self.committed) else {
            return Ok(Vec::new());
        };
        let committed = *committed.borrow();
        let now = now_ms();
        let mut out = Vec::new();
        for s in &self.sinks {
            let cursor = s.cursor();
            let oldest = store.outbox_oldest_after(cursor)?;
            let last_error = s.last_error.lock().expect("sink state").clone();
            let at = s.last_delivery_ms.load(Relaxed);
            out.push(SinkStatus {
                name: s.spec.name.clone(),
                kind: s.spec.kind,
                url: s.spec.display_url(),
                state: s.state.lock().expect("sink state").to_string(),
                cursor,
                committed,
                lag_entries: committed.saturating_sub(cursor),
                lag_seconds: oldest.map_or(0.0, |ms| (now - ms).max(0) as f64 / 1000.0),
                delivered_total: s.delivered.load(Relaxed),
                already_present_total: s.already.load(Relaxed),
                dead_letters_total: s.dead.load(Relaxed),
                dead_letter_file: Some(dead_letter_path(&self.data_dir, &s.spec.name))
                    .filter(|p| p.exists())
                    .map(|p| p.display().to_string()),
                errors_total: s.errors.load(Relaxed),
                last_error_ms: last_error.as_ref().map(|(_, t)| *t),
                last_error: last_error.map(|(m, _)| m),
                last_delivery_ms: (at > 0).then_some(at),
            });
        }
        Ok(out)
    }

    /// The sinks' lines of `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let Ok(status) = self.status() else {
            return String::new();
        };
        if status.is_empty() {
            return String::new();
        }
        let mut out = String::new();
        type Get = fn(&SinkStatus) -> f64;
        let rows: [(&str, &str, &str, Get); 6] = [
            (
                "shoal_sink_lag_entries",
                "gauge",
                "Samples and device events stored but not yet delivered by the sink",
                |s| s.lag_entries as f64,
            ),
            (
                "shoal_sink_lag_seconds",
                "gauge",
                "Age of the oldest entry the sink has not delivered (0 when caught up)",
                |s| s.lag_seconds,
            ),
            (
                "shoal_sink_delivered_total",
                "counter",
                "Entries the sink delivered",
                |s| s.delivered_total as f64,
            ),
            (
                "shoal_sink_already_present_total",
                "counter",
                "Entries sent again that the far end already had (not duplicated there)",
                |s| s.already_present_total as f64,
            ),
            (
                "shoal_sink_dead_letters_total",
                "counter",
                "Entries the far end refused for good, written to the dead-letter file",
                |s| s.dead_letters_total as f64,
            ),
            (
                "shoal_sink_errors_total",
                "counter",
                "Failed deliveries (retried after a pause)",
                |s| s.errors_total as f64,
            ),
        ];
        for (name, kind, help, get) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &status {
                let _ = writeln!(
                    out,
                    "{name}{{sink=\"{}\",kind=\"{}\"}} {}",
                    s.name,
                    match s.kind {
                        SinkKind::Kafka => "kafka",
                        SinkKind::Elasticsearch => "elasticsearch",
                    },
                    get(s)
                );
            }
        }
        out
    }
}

/// Where sink `name` writes what the far end refuses for good.
pub fn dead_letter_path(data_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    data_dir
        .join("sinks")
        .join(format!("{name}.dead-letter.jsonl"))
}

/// Appends rows to a dead-letter file (one JSON line each), synced before the batch counts.
pub fn append_dead_letters(
    path: &std::path::Path,
    rows: &[serde_json::Value],
) -> Result<(), SinkError> {
    use std::io::Write;
    let io = |e: std::io::Error| {
        SinkError::new(format!(
            "cannot write the dead-letter file {}: {e}",
            path.display()
        ))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r).expect("JSON");
        buf.push(b'\n');
    }
    f.write_all(&buf).map_err(io)?;
    f.sync_data().map_err(io)?;
    Ok(())
}

const HUB: RecordTable = RecordTable::new("hub_identity");

/// This hub's stable id (made once, kept in the store): the Kafka sink marks its messages with
/// it, so it can tell its own apart when it looks for where it stopped.
pub fn hub_id(store: &Store) -> Result<String, StoreError> {
    store.create_record_tables(&[HUB])?;
    if let Some(id) = store.record::<String>(HUB, "id")? {
        return Ok(id);
    }
    let id = format!("{:016x}", fastrand::u64(..));
    store.write_records(&[RecordWrite::put(HUB, "id", &id)])?;
    Ok(id)
}

/// A configured sink, ready to start.
pub type Built = (SinkSpec, Box<dyn Sink>);

/// Builds each configured sink, or names the one that cannot be built.
pub fn build(
    specs: &[SinkSpec],
    store: &Store,
    data_dir: &std::path::Path,
) -> Result<Vec<Built>, String> {
    let hub = hub_id(store).map_err(|e| e.to_string())?;
    let mut out: Vec<Built> = Vec::new();
    for spec in specs {
        let sink: Box<dyn Sink> = match spec.kind {
            SinkKind::Kafka => Box::new(kafka::KafkaSink::new(spec, &hub, data_dir)?),
            SinkKind::Elasticsearch => Box::new(elastic::ElasticSink::new(spec, data_dir)?),
        };
        out.push((spec.clone(), sink));
    }
    Ok(out)
}

/// Starts every sink's loop, the outbox trimmer and the status-change recorder; returns the
/// status handle and the tasks (they end when `shutdown` turns true).
pub fn start(
    sinks: Vec<Built>,
    store: &Store,
    writer: &Writer,
    fleet: Arc<Fleet>,
    thresholds: StatusThresholds,
    data_dir: &std::path::Path,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Arc<Sinks>, Vec<tokio::task::JoinHandle<()>>), StoreError> {
    let bounds = store.outbox_bounds()?;
    let mut states = Vec::new();
    let mut tasks = Vec::new();
    for (spec, sink) in sinks {
        // A sink seen for the first time starts at the oldest entry still kept.
        let cursor = match store.sink_cursor(&spec.name)? {
            Some(c) => c,
            None => bounds
                .first
                .map_or(bounds.last_written, |f| f.saturating_sub(1)),
        };
        let state = Arc::new(SinkState::new(spec, cursor));
        tasks.push(tokio::spawn(run_sink(
            state.clone(),
            sink,
            store.clone(),
            writer.committed(),
            shutdown.clone(),
        )));
        states.push(state);
    }
    let sinks = Arc::new(Sinks {
        sinks: states,
        store: Some(store.clone()),
        committed: Some(writer.committed()),
        data_dir: data_dir.to_path_buf(),
    });
    tasks.push(tokio::spawn(trim_outbox(
        sinks.clone(),
        store.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(record_status_changes(
        fleet,
        writer.clone(),
        thresholds,
        shutdown.clone(),
    )));
    Ok((sinks, tasks))
}

/// The pause before retry `n` (1, 2, …): doubling from 200 ms up to [`MAX_BACKOFF`], with
/// ±50 % jitter so hubs that failed together do not retry together.
pub fn backoff(n: u32) -> Duration {
    backoff_up_to(n, MAX_BACKOFF)
}

/// [`backoff`] with another cap.
pub fn backoff_up_to(n: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << n.saturating_sub(1).min(10));
    let base = base.min(max);
    base.mul_f64(0.5 + fastrand::f64())
}

/// Sleeps `d` unless shutdown comes first; returns false on shutdown.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.wait_for(|s| *s) => false,
    }
}

/// One sink's loop: read after the cursor, deliver, move the cursor; on failure, pause and try
/// again from the same place.
async fn run_sink(
    state: Arc<SinkState>,
    mut sink: Box<dyn Sink>,
    store: Store,
    mut committed: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = state.spec.name.clone();
    let batch_max = state.spec.batch;
    let max_backoff = state.spec.max_backoff;
    let mut prepared = false;
    let mut failures = 0u32;
    let mut last_save = std::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        if !prepared {
            let resume = {
                let (store, cursor) = (store.clone(), state.cursor());
                tokio::task::spawn_blocking(move || store.outbox_oldest_after(cursor))
                    .await
                    .expect("outbox read")
                    .unwrap_or(None)
            };
            match sink.prepare(resume).await {
                Ok(()) => prepared = true,
                Err(e) => {
                    failures += 1;
                    state.failed(&e);
                    tracing::warn!(sink = %name, error = %e, "sink not ready; retrying");
                    if !pause(
                        e.retry_after
                            .unwrap_or(backoff_up_to(failures, max_backoff)),
                        &mut shutdown,
                    )
                    .await
                    {
                        break;
                    }
                    continue;
                }
            }
        }
        let cursor = state.cursor();
        let committed_before = *committed.borrow_and_update();
        let read = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.outbox_after(cursor, batch_max))
                .await
                .expect("outbox read")
        };
        let batch = match read {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                state.failed(&SinkError::new(format!("reading the outbox: {e}")));
                if !pause(backoff_up_to(failures, max_backoff), &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        if batch.is_empty() {
            // Everything committed up to `committed_before` is visible to that read: entries
            // it did not find were trimmed, so delivered.
            if committed_before > cursor {
                state.cursor.store(committed_before, Relaxed);
            }
            state.set_state("caught-up");
            save_cursor(&store, &state).await;
            if *committed.borrow() > state.cursor() {
                continue;
            }
            tokio::select! {
                _ = committed.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            continue;
        }
        state.set_state("delivering");
        match sink.deliver(&batch).await {
            Ok(d) => {
                failures = 0;
                let last = batch.last().expect("not empty").offset;
                state.cursor.store(last, Relaxed);
                state.delivered.fetch_add(d.sent, Relaxed);
                state.already.fetch_add(d.already, Relaxed);
                state.dead.fetch_add(d.dead, Relaxed);
                state.last_delivery_ms.store(now_ms(), Relaxed);
                // The cursor is saved at most every 100 ms: a crash in between sends a few
                // entries again, which the sinks recognise (Kafka: the hub's marks on its
                // messages; Elasticsearch: create by id).
                if last_save.elapsed() >= Duration::from_millis(100) {
                    save_cursor(&store, &state).await;
                    last_save = std::time::Instant::now();
                }
            }
            Err(e) => {
                failures += 1;
                prepared = false;
                state.failed(&e);
                tracing::warn!(sink = %name, error = %e, "sink delivery failed; retrying from offset {}", cursor + 1);
                if !pause(
                    e.retry_after
                        .unwrap_or(backoff_up_to(failures, max_backoff)),
                    &mut shutdown,
                )
                .await
                {
                    break;
                }
            }
        }
    }
    save_cursor(&store, &state).await;
}

async fn save_cursor(store: &Store, state: &Arc<SinkState>) {
    let cursor = state.cursor();
    if cursor == state.saved.load(Relaxed) {
        return;
    }
    let (store, name) = (store.clone(), state.spec.name.clone());
    let result = tokio::task::spawn_blocking(move || store.set_sink_cursor(&name, cursor))
        .await
        .expect("cursor write");
    match result {
        Ok(()) => state.saved.store(cursor, Relaxed),
        Err(e) => {
            tracing::warn!(sink = %state.spec.name, error = %e, "could not save the sink's cursor; will try again")
        }
    }
}

/// Deletes outbox entries every sink has delivered, a few thousand per transaction.
async fn trim_outbox(sinks: Arc<Sinks>, store: Store, mut shutdown: watch::Receiver<bool>) {
    loop {
        if !pause(Duration::from_secs(2), &mut shutdown).await {
            break;
        }
        // Up to the saved cursors: a restart resumes from those, and must find what follows.
        let Some(min) = sinks.sinks.iter().map(|s| s.saved.load(Relaxed)).min() else {
            break;
        };
        loop {
            let store = store.clone();
            let n = tokio::task::spawn_blocking(move || store.trim_outbox(min, 5_000))
                .await
                .expect("trim task");
            match n {
                Ok(5_000) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not trim the outbox; will try again");
                    break;
                }
            }
        }
    }
}

/// Records a device event whenever a device's status (online, stale, offline) changes.
async fn record_status_changes(
    fleet: Arc<Fleet>,
    writer: Writer,
    thresholds: StatusThresholds,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known: std::collections::HashMap<String, crate::registry::Status> = fleet
        .all()
        .into_iter()
        .map(|d| {
            let s = thresholds.status(d.record.last_seen_ms, now_ms());
            (d.record.device_id, s)
        })
        .collect();
    // Whether the last failure was logged (one warning per run of failures).
    let mut warned = false;
    loop {
        if !pause(Duration::from_secs(1), &mut shutdown).await {
            break;
        }
        let now = now_ms();
        let mut events = Vec::new();
        let mut next = known.clone();
        for d in fleet.all() {
            let status = thresholds.status(d.record.last_seen_ms, now);
            let before = known.get(&d.record.device_id).copied();
            // A device's first appearance is its hello event; only changes after it count.
            if let Some(before) = before
                && before != status
            {
                events.push(DeviceEvent {
                    device_id: d.record.device_id.clone(),
                    timestamp_ms: now,
                    event: Some(device_event::Event::Status(StatusChange {
                        from: before.to_string(),
                        to: status.to_string(),
                    })),
                });
            }
            next.insert(d.record.device_id, status);
        }
        if events.is_empty() {
            known = next;
            continue;
        }
        match writer.events(events).await {
            Ok(()) => {
                known = next;
                warned = false;
            }
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %e, "could not record device status changes; will try again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_urls_parse_with_defaults_and_options() {
        let k = SinkSpec::parse("kafka://127.0.0.1:9092").unwrap();
        assert_eq!(
            (
                k.kind,
                k.endpoint.as_str(),
                k.target.as_str(),
                k.name.as_str()
            ),
            (SinkKind::Kafka, "127.0.0.1:9092", DEFAULT_TOPIC, "kafka")
        );
        let k = SinkSpec::parse("kafka://a:1,b:2/fleet.v1?format=json&name=lake&batch=50").unwrap();
        assert_eq!(
            (
                k.endpoint.as_str(),
                k.target.as_str(),
                k.format,
                k.name.as_str(),
                k.batch
            ),
            ("a:1,b:2", "fleet.v1", Format::Json, "lake", 50)
        );
        assert_eq!(k.display_url(), "kafka://a:1,b:2/fleet.v1");
        let e =
            SinkSpec::parse("elasticsearch+https://elastic:pw@es:9200/proxy?prefix=iot").unwrap();
        assert_eq!(
            (e.kind, e.endpoint.as_str(), e.target.as_str()),
            (SinkKind::Elasticsearch, "https://es:9200/proxy", "iot")
        );
        assert_eq!(e.credentials, Some(("elastic".into(), "pw".into())));
        assert_eq!(
            e.display_url(),
            "elasticsearch+https://elastic:***@es:9200/proxy"
        );
        assert_eq!(
            SinkSpec::parse("elasticsearch+http://es:9200")
                .unwrap()
                .target,
            DEFAULT_INDEX_PREFIX
        );
    }

    #[test]
    fn bad_sink_urls_say_what_is_wrong() {
        for (url, says) in [
            ("kafka:/x", "not a URL"),
            ("redis://h:1", "unknown sink scheme"),
            ("kafka://h/t", "not HOST:PORT"),
            ("kafka://h:1/bad topic", "not a Kafka topic name"),
            ("kafka://h:1/t?format=avro", "protobuf or json"),
            ("kafka://h:1/t?batch=0", "batch must be"),
            ("elasticsearch+http://h:1?prefix=Sensor", "lowercase"),
            ("elasticsearch+http://h:1?colour=red", "unknown option"),
            ("elasticsearch+http://h:1?name=Big", "sink name"),
        ] {
            let err = SinkSpec::parse(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
        let err = parse_sinks(&["kafka://h:1".into(), "kafka://h:2".into()]).unwrap_err();
        assert!(err.contains("?name="), "{err}");
    }

    /// A sink that fails its first deliveries, then records what it gets.
    struct Recording {
        got: Arc<Mutex<Vec<u64>>>,
        fail: u32,
        prepares: Arc<AtomicU64>,
    }

    impl Sink for Recording {
        fn prepare(&mut self, _: Option<i64>) -> BoxFuture<'_, Result<(), SinkError>> {
            self.prepares.fetch_add(1, Relaxed);
            Box::pin(async { Ok(()) })
        }
        fn deliver<'a>(
            &'a mut self,
            batch: &'a [Entry],
        ) -> BoxFuture<'a, Result<Delivered, SinkError>> {
            Box::pin(async move {
                if self.fail > 0 {
                    self.fail -= 1;
                    return Err(SinkError::new("down"));
                }
                self.got
                    .lock()
                    .unwrap()
                    .extend(batch.iter().map(|e| e.offset));
                Ok(Delivered {
                    sent: batch.len() as u64,
                    ..Default::default()
                })
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_gets_every_entry_once_in_order_through_failures_and_a_restart() {
        use crate::metrics::Metrics;
        use crate::store::writer::Row;
        let dir = tempfile::tempdir().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let prepares = Arc::new(AtomicU64::new(0));
        let spec = SinkSpec {
            batch: 7,
            max_backoff: Duration::from_millis(100),
            ..SinkSpec::parse("kafka://h:1?name=rec").unwrap()
        };
        let row = |seq: u64| {
            Row::new(shoal_proto::v1::Sample {
                seq,
                timestamp_ms: 1,
                ..Default::default()
            })
        };
        for round in 0..2u64 {
            let store = Store::open(dir.path()).unwrap();
            let fleet = Arc::new(Fleet::from_loaded(&store).unwrap());
            let (writer, thread) = Writer::start_with(
                store.clone(),
                fleet.clone(),
                Arc::new(Metrics::default()),
                true,
            )
            .unwrap();
            let (stop_tx, stop) = watch::channel(false);
            let sink = Recording {
                got: got.clone(),
                fail: 2,
                prepares: prepares.clone(),
            };
            let (sinks, tasks) = start(
                vec![(spec.clone(), Box::new(sink))],
                &store,
                &writer,
                fleet,
                StatusThresholds::default(),
                dir.path(),
                &stop,
            )
            .unwrap();
            writer
                .hello(
                    shoal_proto::v1::DeviceHello {
                        device_id: "d".into(),
                        ..Default::default()
                    },
                    1,
                )
                .await
                .unwrap();
            let first = round * 100 + 1;
            for chunk in (first..first + 100).collect::<Vec<_>>().chunks(9) {
                writer
                    .write("d".into(), chunk.iter().map(|&s| row(s)).collect(), 2)
                    .await
                    .unwrap();
            }
            let committed = *writer.committed().borrow();
            assert_eq!(committed, (round + 1) * 101);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while sinks.sinks[0].cursor() < committed {
                assert!(std::time::Instant::now() < deadline, "the sink caught up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The outbox is trimmed behind the sink, and a caught-up sink does not spin.
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            let status = sinks.status().unwrap();
            assert_eq!(status[0].lag_entries, 0);
            assert_eq!(status[0].state, "caught-up");
            assert!(status[0].errors_total >= 2);
            assert_eq!(store.outbox_bounds().unwrap().first, None, "trimmed");
            stop_tx.send(true).unwrap();
            for t in tasks {
                t.await.unwrap();
            }
            drop((writer, sinks, store));
            thread.join().unwrap();
        }
        let got = got.lock().unwrap().clone();
        assert_eq!(got, (1..=202).collect::<Vec<_>>(), "each once, in order");
        assert!(
            prepares.load(Relaxed) >= 6,
            "prepared again after each failure"
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        for n in 1..40 {
            let d = backoff(n);
            let base = Duration::from_millis(200)
                .saturating_mul(1 << (n - 1).min(10))
                .min(MAX_BACKOFF);
            assert!(d >= base / 2 && d <= base.mul_f64(1.5), "{n}: {d:?}");
        }
    }
}
