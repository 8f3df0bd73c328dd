//! `/healthz` and Prometheus `/metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::MetricsAuth;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::store::series;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the hub answers.
    #[schema(example = "ok")]
    status: &'static str,
}

/// Liveness: answers while the hub serves. A full disk or a failed commit does not make the hub
/// dead (it recovers by itself once it can write); that is what `/readyz` reports.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    security(()),
    responses((status = 200, description = "The hub is up", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// Always `ready` (a hub that is not ready answers 503 with the reason).
    #[schema(example = "ready")]
    status: &'static str,
}

/// Readiness: ready only while the store takes writes (free space above `--min-free-space`,
/// and no failed commit it has not recovered from). A hub that is not ready still serves reads.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    security(()),
    responses(
        (status = 200, description = "The store takes writes", body = Readiness),
        (status = 503, description = "The store refuses writes for now (a full disk, a failed commit); the error says which", body = ErrorBody),
    ),
)]
pub async fn readyz(State(s): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    match s.store.health().state().reason() {
        None => Ok(Json(Readiness { status: "ready" })),
        Some(why) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why)),
    }
}

/// Prometheus metrics: ingest counters, HTTP requests by route and status, devices by status.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    security(()),
    responses((
        status = 200,
        description = "Prometheus text exposition format 0.0.4",
        body = String,
        content_type = "text/plain; version=0.0.4",
    )),
)]
pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let now = series::now_ms();
    let mut counts = [("online", 0), ("stale", 0), ("offline", 0)];
    for d in s.fleet.all() {
        counts[s.thresholds.status(d.record.last_seen_ms, now) as usize].1 += 1;
    }
    let mut text = s.metrics.render(&counts);
    text.push_str(&store_metrics(&s));
    text.push_str(&scoring_metrics(&s));
    text.push_str(&provenance_metrics(&s));
    let sinks = s.sinks.clone();
    if !sinks.is_empty()
        && let Ok(t) = tokio::task::spawn_blocking(move || sinks.render_metrics()).await
    {
        text.push_str(&t);
    }
    if let Some(c) = &s.consumer {
        text.push_str(&c.render());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The scorer's and the alerts' counters; each device's latest score only when `/metrics`
/// needs a token (open, it shows no device ids).
fn scoring_metrics(s: &AppState) -> String {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let sc = &s.models.scores;
    let mut out = String::new();
    for (name, kind, help, value) in [
        (
            "shoal_scoring_samples_total",
            "counter",
            "Samples scored by the scoring model",
            sc.scored.load(Relaxed),
        ),
        (
            "shoal_scoring_unscorable_total",
            "counter",
            "Samples without the model's target value",
            sc.unscorable.load(Relaxed),
        ),
        (
            "shoal_scoring_failures_total",
            "counter",
            "Scoring rounds whose model request failed (the samples wait)",
            sc.failures.load(Relaxed),
        ),
        (
            "shoal_scoring_lag_samples",
            "gauge",
            "Samples stored but not yet scored",
            sc.lag.load(Relaxed),
        ),
        (
            "shoal_alerts_opened_total",
            "counter",
            "Anomaly alerts opened",
            s.alerts.opened.load(Relaxed),
        ),
        (
            "shoal_alerts_open",
            "gauge",
            "Anomaly alerts open now (acknowledged or not)",
            s.alerts.open_count() as u64,
        ),
        (
            "shoal_alert_webhook_failures_total",
            "counter",
            "Alert notifications the webhook never took",
            s.alerts.webhook_failures.load(Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    if s.auth.metrics == MetricsAuth::Token {
        let _ = writeln!(
            out,
            "# HELP shoal_device_anomaly_score Latest anomaly score per device\n# TYPE shoal_device_anomaly_score gauge"
        );
        for (device, score) in sc.all() {
            let _ = writeln!(
                out,
                "shoal_device_anomaly_score{{device_id=\"{}\",model=\"{}\",version=\"{}\"}} {}",
                escape(&device),
                escape(&score.model),
                escape(&score.version),
                score.score
            );
        }
    }
    out
}

/// Whether the store takes writes, and the free space it watches.
fn store_metrics(s: &AppState) -> String {
    use std::fmt::Write;
    let health = s.store.health();
    let mut out = String::new();
    let writable = u8::from(health.state().is_writable());
    let _ = writeln!(
        out,
        "# HELP shoal_store_writable 1 while the store takes writes, 0 while it refuses them (full disk, failed commit)\n# TYPE shoal_store_writable gauge\nshoal_store_writable {writable}"
    );
    if let Ok(free) = crate::store::health::free_bytes(s.store.dir()) {
        let _ = writeln!(
            out,
            "# HELP shoal_store_free_bytes Bytes free on the data directory's filesystem\n# TYPE shoal_store_free_bytes gauge\nshoal_store_free_bytes {free}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP shoal_store_min_free_bytes The low-disk watermark (--min-free-space)\n# TYPE shoal_store_min_free_bytes gauge\nshoal_store_min_free_bytes {}",
        health.min_free_bytes()
    );
    out
}

/// The ledger's size and, with a chain, what is not anchored yet and how anchoring goes.
fn provenance_metrics(s: &AppState) -> String {
    use crate::provenance::anchor::Anchorer;
    use std::fmt::Write;
    let entries = s.ledger.len();
    let mut rows = vec![(
        "shoal_provenance_entries",
        "gauge",
        "Signed model statements in the provenance ledger",
        entries,
    )];
    if let Some(a) = &s.anchorer
        && let Ok(anchors) = a.anchors()
    {
        let (pending, confirming) = Anchorer::counts(entries, &anchors);
        let health = a.health();
        rows.extend([
            (
                "shoal_provenance_pending_entries",
                "gauge",
                "Ledger entries no anchor covers yet",
                pending,
            ),
            (
                "shoal_provenance_confirming_entries",
                "gauge",
                "Ledger entries whose anchor is sent but not confirmed",
                confirming,
            ),
            (
                "shoal_provenance_anchor_transactions_total",
                "counter",
                "Anchor transactions sent",
                health.sent,
            ),
            (
                "shoal_provenance_anchor_errors_total",
                "counter",
                "Anchoring rounds that failed (the chain down or refusing; retried)",
                health.errors,
            ),
        ]);
    }
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
}

/// A Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
