//! Alerts on anomaly scores. The rule: a device whose score is above the threshold for
//! `samples` readings in a row opens an alert; the same number in a row at or below it
//! resolves the alert. An operator acknowledges an open alert (it stays open until its
//! device recovers). Opening and resolving are kept in the store and POSTed as JSON to the
//! webhook (`--alert-webhook`), retried three times with backoff; a delivery that still fails
//! is logged and counted, and the alert stands.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::scoring::DeviceScore;
use crate::store::records::{RecordTable, RecordWrite};
use crate::store::{Store, StoreError};

pub const ALERTS: RecordTable = RecordTable::new("alerts");

/// When a score opens an alert.
#[derive(Debug, Clone, Copy)]
pub struct AlertRule {
    /// Above this a reading is anomalous; `None`: the model's own threshold (3 without one).
    pub threshold: Option<f64>,
    /// Readings in a row that open (and, below, resolve) an alert.
    pub samples: u32,
}

impl Default for AlertRule {
    fn default() -> Self {
        Self {
            threshold: None,
            samples: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Open,
    Acknowledged,
    Resolved,
}

/// An alert on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Alert {
    pub id: String,
    pub device_id: String,
    pub state: AlertState,
    /// The threshold its readings crossed.
    pub threshold: f64,
    /// The highest score while open.
    pub peak_score: f64,
    /// The latest score seen while open.
    pub last_score: f64,
    pub model: String,
    pub version: String,
    /// Time of the reading that opened it (ms since the epoch).
    pub opened_ms: i64,
    pub acknowledged_by: Option<String>,
    pub acknowledged_ms: Option<i64>,
    pub resolved_ms: Option<i64>,
}

/// Readings in a row above (positive) or at/below (negative) the threshold.
#[derive(Default)]
struct Streak {
    run: i64,
    open: Option<Alert>,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("no alert {0:?}")]
    NotFound(String),
    #[error("alert {0:?} is resolved")]
    Resolved(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Alerts {
    store: Store,
    rule: AlertRule,
    webhook: Option<String>,
    http: reqwest::Client,
    devices: Mutex<HashMap<String, Streak>>,
    pub opened: AtomicU64,
    pub webhook_failures: std::sync::Arc<AtomicU64>,
}

impl Alerts {
    /// The alert rules over `store`'s alerts (the open ones carry on from before a restart).
    pub fn open(
        store: &Store,
        rule: AlertRule,
        webhook: Option<String>,
    ) -> Result<Self, StoreError> {
        store.create_record_tables(&[ALERTS])?;
        let mut devices: HashMap<String, Streak> = HashMap::new();
        for a in store.records::<Alert>(ALERTS)? {
            if a.state != AlertState::Resolved {
                let device = a.device_id.clone();
                devices.entry(device).or_default().open = Some(a);
            }
        }
        Ok(Self {
            store: store.clone(),
            rule,
            webhook,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
            devices: Mutex::new(devices),
            opened: AtomicU64::new(0),
            webhook_failures: std::sync::Arc::default(),
        })
    }

    /// Every alert, newest first; only those not resolved unless `all`.
    pub fn list(&self, all: bool) -> Result<Vec<Alert>, StoreError> {
        let mut v: Vec<Alert> = self
            .store
            .records::<Alert>(ALERTS)?
            .into_iter()
            .filter(|a| all || a.state != AlertState::Resolved)
            .map(|a| self.current(a))
            .collect();
        v.sort_by(|a, b| b.opened_ms.cmp(&a.opened_ms).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    /// `a` with the in-memory peak and last score when it is open.
    fn current(&self, a: Alert) -> Alert {
        let devices = self.devices.lock().expect("alerts lock");
        match devices.get(&a.device_id).and_then(|s| s.open.as_ref()) {
            Some(open) if open.id == a.id => open.clone(),
            _ => a,
        }
    }

    /// Open alerts (acknowledged or not).
    pub fn open_count(&self) -> usize {
        self.devices
            .lock()
            .expect("alerts lock")
            .values()
            .filter(|s| s.open.is_some())
            .count()
    }

    /// Acknowledges open alert `id` as `by`.
    pub fn acknowledge(&self, id: &str, by: &str) -> Result<Alert, AlertError> {
        let mut devices = self.devices.lock().expect("alerts lock");
        let open = devices
            .values_mut()
            .filter_map(|s| s.open.as_mut())
            .find(|a| a.id == id);
        let Some(alert) = open else {
            return match self.store.record::<Alert>(ALERTS, id)? {
                Some(_) => Err(AlertError::Resolved(id.into())),
                None => Err(AlertError::NotFound(id.into())),
            };
        };
        let mut acked = alert.clone();
        acked.state = AlertState::Acknowledged;
        acked.acknowledged_by = Some(by.to_string());
        acked.acknowledged_ms = Some(crate::now_ms());
        self.store
            .write_records(&[RecordWrite::put(ALERTS, id, &acked)])?;
        *alert = acked.clone();
        Ok(acked)
    }

    /// Runs one scored reading of `device` through the rule.
    pub fn observe(&self, device: &str, s: &DeviceScore, model_threshold: Option<f64>) {
        let threshold = self.rule.threshold.or(model_threshold).unwrap_or(3.0);
        let needed = i64::from(self.rule.samples.max(1));
        let mut devices = self.devices.lock().expect("alerts lock");
        let streak = devices.entry(device.to_string()).or_default();
        let above = s.score > threshold;
        streak.run = match (above, streak.run) {
            (true, r) if r > 0 => r + 1,
            (true, _) => 1,
            (false, r) if r < 0 => r - 1,
            (false, _) => -1,
        };
        let changed = match &mut streak.open {
            Some(open) => {
                open.last_score = s.score;
                open.peak_score = open.peak_score.max(s.score);
                if streak.run <= -needed {
                    let mut done = streak.open.take().expect("open");
                    done.state = AlertState::Resolved;
                    done.resolved_ms = Some(s.time_ms);
                    Some(("resolved", done))
                } else {
                    None
                }
            }
            None if streak.run >= needed => {
                let alert = Alert {
                    id: format!("{device}-{}", s.time_ms),
                    device_id: device.to_string(),
                    state: AlertState::Open,
                    threshold,
                    peak_score: s.score,
                    last_score: s.score,
                    model: s.model.clone(),
                    version: s.version.clone(),
                    opened_ms: s.time_ms,
                    acknowledged_by: None,
                    acknowledged_ms: None,
                    resolved_ms: None,
                };
                streak.open = Some(alert.clone());
                self.opened.fetch_add(1, Ordering::Relaxed);
                Some(("opened", alert))
            }
            None => None,
        };
        drop(devices);
        if let Some((event, alert)) = changed {
            if let Err(e) = self
                .store
                .write_records(&[RecordWrite::put(ALERTS, &alert.id, &alert)])
            {
                tracing::error!(alert = %alert.id, error = %e, "cannot keep the alert");
            }
            tracing::warn!(alert = %alert.id, device = %alert.device_id, event, score = s.score, "anomaly alert");
            self.notify(event, alert);
        }
    }

    /// POSTs `{event, alert}` to the webhook, off the caller's path.
    fn notify(&self, event: &'static str, alert: Alert) {
        let Some(url) = self.webhook.clone() else {
            return;
        };
        let http = self.http.clone();
        let failures = self.webhook_failures.clone();
        tokio::spawn(async move {
            let body = json!({ "event": event, "alert": alert });
            let mut delay = Duration::from_millis(500);
            for attempt in 1..=3 {
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => return,
                    Ok(r) => {
                        tracing::warn!(%url, attempt, status = %r.status(), "alert webhook refused")
                    }
                    Err(e) => {
                        tracing::warn!(%url, attempt, error = %e, "alert webhook unreachable")
                    }
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            failures.fetch_add(1, Ordering::Relaxed);
        });
    }
}
