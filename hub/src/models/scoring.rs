//! Scoring the fleet's telemetry with the deployed model, off the ingest path.
//!
//! Ingest never waits for scoring: the scorer reads what the store has already committed,
//! from a cursor per device, and sends the new rows in one V2 request per round (the
//! embedded server in-process, or an external V2 server over REST). A slow or unreachable
//! model server holds the cursors where they are — nothing is lost, the lag is on
//! `/metrics` — and the next successful round catches up, oldest rows first. At first sight
//! of a device the cursor starts [`BACKLOG`] samples back, so a hub that just started (or a
//! model just deployed) scores recent history at once rather than all of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shoal_ml::dataset::{Row, metric_index};
use shoal_ml::serve::model::{Data, NamedTensor};
use shoal_ml::serve::repo::Repository;
use tokio::sync::watch;

use super::alerts::Alerts;
use super::{Deployment, Models, Target};
use crate::store::Store;
use crate::store::writer::Fleet;

/// Samples scored at first sight of a device.
pub const BACKLOG: u64 = 100;
/// Most samples read per device per round.
const PER_DEVICE: usize = 512;
/// Most rows in one V2 request.
const MAX_ROWS: usize = 4096;

/// A device's latest score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceScore {
    /// |observed − expected| in units of the residual spread seen in training.
    pub score: f64,
    /// observed − expected.
    pub residual: f64,
    pub expected: f64,
    pub observed: f64,
    /// The column the model predicts.
    pub target: String,
    pub model: String,
    pub version: String,
    /// The scored sample.
    pub seq: u64,
    pub time_ms: i64,
}

/// Per-device scores and the scorer's counters.
#[derive(Default)]
pub struct Scores {
    latest: RwLock<HashMap<String, DeviceScore>>,
    pub scored: AtomicU64,
    /// Rows without the model's target value (nothing to compare with).
    pub unscorable: AtomicU64,
    /// Rounds whose request failed (the rows stay queued).
    pub failures: AtomicU64,
    /// Samples stored but not yet scored, as of the last round.
    pub lag: AtomicU64,
}

impl Scores {
    pub fn get(&self, device_id: &str) -> Option<DeviceScore> {
        self.latest
            .read()
            .expect("scores lock")
            .get(device_id)
            .cloned()
    }

    pub fn all(&self) -> Vec<(String, DeviceScore)> {
        let mut v: Vec<_> = self
            .latest
            .read()
            .expect("scores lock")
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Where inference runs: the hub's own repository, or a V2 server over REST.
enum Endpoint {
    Embedded(Arc<Repository>),
    Rest { base: String, http: reqwest::Client },
}

/// Rows to score: features row-major, observed values, and whose they are.
struct Work {
    features: Vec<f64>,
    observed: Vec<f64>,
    rows: Vec<(String, u64, i64)>,
}

/// Expected values and scores, one per row, and the version that computed them.
struct Outcome {
    expected: Vec<f64>,
    score: Vec<f64>,
    version: String,
}

impl Endpoint {
    async fn infer(&self, d: &Deployment, work: &Work) -> Result<Outcome, String> {
        let n = work.observed.len() as i64;
        let k = d.features.len() as i64;
        match self {
            Endpoint::Embedded(repo) => {
                let (version, model) = repo.get(&d.name, &d.version).map_err(|e| e.to_string())?;
                let inputs = vec![
                    NamedTensor {
                        name: "features".into(),
                        shape: vec![n, k],
                        data: Data::Fp64(work.features.clone()),
                    },
                    NamedTensor {
                        name: "observed".into(),
                        shape: vec![n, 1],
                        data: Data::Fp64(work.observed.clone()),
                    },
                ];
                let out = shoal_ml::serve::infer_named(model, inputs, Vec::new())
                    .await
                    .map_err(|e| e.to_string())?;
                let column = |name: &str| match out.iter().find(|t| t.name == name) {
                    Some(NamedTensor {
                        data: Data::Fp64(v),
                        ..
                    }) => Ok(v.clone()),
                    _ => Err(format!("the model gave no FP64 output {name:?}")),
                };
                Ok(Outcome {
                    expected: column("expected")?,
                    score: column("score")?,
                    version,
                })
            }
            Endpoint::Rest { base, http } => {
                let url = format!("{base}/v2/models/{}/versions/{}/infer", d.name, d.version);
                let body = json!({ "inputs": [
                    { "name": "features", "shape": [n, k], "datatype": "FP64", "data": work.features },
                    { "name": "observed", "shape": [n, 1], "datatype": "FP64", "data": work.observed },
                ]});
                let r = http
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                let status = r.status();
                let v: Value = r.json().await.map_err(|e| format!("{url}: {e}"))?;
                if !status.is_success() {
                    return Err(format!("{url}: HTTP {status}: {}", v["error"]));
                }
                let column = |name: &str| -> Result<Vec<f64>, String> {
                    let t = v["outputs"]
                        .as_array()
                        .and_then(|o| o.iter().find(|t| t["name"] == name))
                        .ok_or_else(|| format!("{url}: no output {name:?}"))?;
                    t["data"]
                        .as_array()
                        .ok_or_else(|| format!("{url}: output {name:?} has no data"))?
                        .iter()
                        .map(|x| {
                            x.as_f64()
                                .ok_or_else(|| format!("{url}: {name}: not numbers"))
                        })
                        .collect()
                };
                Ok(Outcome {
                    expected: column("expected")?,
                    score: column("score")?,
                    version: v["model_version"]
                        .as_str()
                        .unwrap_or(&d.version)
                        .to_string(),
                })
            }
        }
    }
}

/// The scorer's task: a round every `period` until `shutdown`.
pub async fn run(
    models: Arc<Models>,
    alerts: Arc<Alerts>,
    fleet: Arc<Fleet>,
    store: Store,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    let mut cursors: HashMap<String, u64> = HashMap::new();
    let mut backoff = period;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some(d) = models
            .scoring()
            .filter(|d| !d.features.is_empty() && d.target.is_some())
        else {
            continue;
        };
        let endpoint = match (&d.to, &d.endpoint) {
            (Target::V2, Some(base)) => Endpoint::Rest {
                base: base.clone(),
                http: http.clone(),
            },
            _ => Endpoint::Embedded(models.repo.clone()),
        };
        match round(
            &d,
            &endpoint,
            &models,
            &alerts,
            &fleet,
            &store,
            &mut cursors,
        )
        .await
        {
            Ok(()) => backoff = period,
            Err(e) => {
                models.scores.failures.fetch_add(1, Ordering::Relaxed);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                tracing::warn!(model = %d.name, error = %e, retry_in = ?backoff, "scoring failed; the rows wait");
            }
        }
    }
}

/// One round: read what is new, score it, publish, advance the cursors.
async fn round(
    d: &Deployment,
    endpoint: &Endpoint,
    models: &Models,
    alerts: &Alerts,
    fleet: &Fleet,
    store: &Store,
    cursors: &mut HashMap<String, u64>,
) -> Result<(), String> {
    let pending: Vec<(String, u32, u64, u64)> = fleet
        .all()
        .into_iter()
        .filter_map(|s| {
            let from = *cursors
                .entry(s.record.device_id.clone())
                .or_insert(s.max_seq.saturating_sub(BACKLOG));
            (s.max_seq > from).then_some((s.record.device_id, s.key, from, s.max_seq))
        })
        .collect();
    models
        .scores
        .lag
        .store(pending.iter().map(|p| p.3 - p.2).sum(), Ordering::Relaxed);
    if pending.is_empty() {
        return Ok(());
    }
    let (features, target) = (d.features.clone(), d.target.clone().unwrap_or_default());
    let reader = store.clone();
    let (work, read_to) =
        tokio::task::spawn_blocking(move || read(&reader, &pending, &features, &target))
            .await
            .map_err(|e| e.to_string())??;
    for chunk in split(work) {
        if chunk.rows.is_empty() {
            continue;
        }
        let out = endpoint.infer(d, &chunk).await?;
        if out.score.len() != chunk.rows.len() || out.expected.len() != chunk.rows.len() {
            return Err(format!(
                "{} scores for {} rows",
                out.score.len(),
                chunk.rows.len()
            ));
        }
        publish(d, &chunk, &out, models, alerts);
    }
    let unscored: u64 = read_to.iter().map(|(_, _, skipped)| skipped).sum();
    models
        .scores
        .unscorable
        .fetch_add(unscored, Ordering::Relaxed);
    for (device, seq, _) in read_to {
        cursors.insert(device, seq);
    }
    Ok(())
}

/// The new rows of each pending device (id, key, cursor, newest): the work, and per device
/// how far it was read and how many rows had no target value.
#[allow(clippy::type_complexity)]
fn read(
    store: &Store,
    pending: &[(String, u32, u64, u64)],
    features: &[String],
    target: &str,
) -> Result<(Work, Vec<(String, u64, u64)>), String> {
    let columns: Vec<Option<usize>> = features.iter().map(|f| metric_index(f)).collect();
    let target = metric_index(target).ok_or_else(|| format!("unknown target column {target:?}"))?;
    let mut work = Work {
        features: Vec::new(),
        observed: Vec::new(),
        rows: Vec::new(),
    };
    let mut read_to = Vec::with_capacity(pending.len());
    for (device, key, from, _) in pending {
        let samples = store
            .samples_after(*key, *from, PER_DEVICE)
            .map_err(|e| e.to_string())?;
        let mut last = *from;
        let mut skipped = 0;
        for s in samples {
            last = s.seq;
            let row = Row::from_sample(device, s.seq, &s);
            let Some(observed) = row.values[target] else {
                skipped += 1;
                continue;
            };
            work.features.extend(
                columns
                    .iter()
                    .map(|c| c.and_then(|i| row.values[i]).unwrap_or(0.0)),
            );
            work.observed.push(observed);
            work.rows.push((device.clone(), s.seq, row.timestamp_ms));
        }
        read_to.push((device.clone(), last, skipped));
    }
    Ok((work, read_to))
}

/// `work` in requests of at most [`MAX_ROWS`] rows.
fn split(work: Work) -> Vec<Work> {
    let k = if work.rows.is_empty() {
        0
    } else {
        work.features.len() / work.rows.len()
    };
    let mut out = Vec::new();
    let mut start = 0;
    while start < work.rows.len() {
        let end = (start + MAX_ROWS).min(work.rows.len());
        out.push(Work {
            features: work.features[start * k..end * k].to_vec(),
            observed: work.observed[start..end].to_vec(),
            rows: work.rows[start..end].to_vec(),
        });
        start = end;
    }
    out
}

/// Latest score per device, and every row through the alert rules in order.
fn publish(d: &Deployment, work: &Work, out: &Outcome, models: &Models, alerts: &Alerts) {
    let target = d.target.clone().unwrap_or_default();
    let mut latest = HashMap::new();
    for (i, (device, seq, time_ms)) in work.rows.iter().enumerate() {
        let s = DeviceScore {
            score: out.score[i],
            residual: work.observed[i] - out.expected[i],
            expected: out.expected[i],
            observed: work.observed[i],
            target: target.clone(),
            model: d.name.clone(),
            version: out.version.clone(),
            seq: *seq,
            time_ms: *time_ms,
        };
        alerts.observe(device, &s, d.threshold);
        latest.insert(device.clone(), s);
    }
    models
        .scores
        .scored
        .fetch_add(work.rows.len() as u64, Ordering::Relaxed);
    models
        .scores
        .latest
        .write()
        .expect("scores lock")
        .extend(latest);
}
