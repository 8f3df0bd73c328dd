//! The REST/JSON API under `/api/v1` (one file per resource), plus `/healthz` and Prometheus
//! `/metrics`. Handlers read the store and the fleet view and ask the scheduler; they never
//! open the store's tables. Every request is counted once, by route template and status.
//!
//! Every request passes [`access`] first: the route's role (stated in its `#[utoipa::path]`
//! `security`), the caller's token, the browser checks, the audit log.
//!
//! Every route is registered with utoipa-axum's `routes!`, which takes its path and methods from
//! the handler's `#[utoipa::path]`: the router and the OpenAPI 3.1 document served at
//! `/api/v1/openapi.json` come from the same definitions, so a route cannot be served
//! undocumented or documented under another path.

pub mod access;
pub mod datasets;
pub mod devices;
pub mod enrollment;
pub mod error;
pub mod extract;
pub mod jobs;
pub mod models;
pub mod ops;
pub mod provenance;
pub mod schemas;
pub mod sinks;
pub mod state;
pub mod store;
pub mod tokens;
pub mod v2_grpc;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use self::error::ApiError;
pub use self::state::{AppState, AuthState};

/// The document's root: what `#[utoipa::path]` does not say.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shoal hub API",
        description = "The REST API of a Shoal hub: the fleet's devices and their telemetry, \
            dataset export, scheduled jobs and their runs. Errors answer `{\"error\": \"...\"}` \
            with a message that says what to do.",
    ),
    tags(
        (name = "devices", description = "Devices and their telemetry"),
        (name = "datasets", description = "Telemetry exported to Parquet"),
        (name = "jobs", description = "Scheduled jobs (Kubernetes CronJob manifests)"),
        (name = "runs", description = "Runs of jobs: status, logs, artifacts"),
        (name = "access", description = "API tokens, the caller's identity, the audit log"),
        (name = "models", description = "Deployed models and alerts on their anomaly scores; the models themselves are served at /v2 (the Open Inference Protocol)"),
        (name = "ops", description = "Health, metrics and this document"),
    ),
    modifiers(&BearerToken),
)]
struct Root;

/// The `token` security scheme: `Authorization: Bearer TOKEN`. Each operation's requirement
/// lists the one role it needs (OpenAPI 3.1 allows role names for non-OAuth schemes).
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, doc: &mut Document) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "An API token (`shoal tokens create`); roles: viewer, operator, scientist, admin",
            ))
            .build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("token", SecurityScheme::Http(scheme));
    }
}

/// The documented routes, and their document.
fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(Root::openapi())
        .merge(ops::routes())
        .routes(routes!(openapi_json))
        .merge(devices::routes())
        .merge(datasets::routes())
        .merge(jobs::routes())
        .merge(tokens::routes())
        .merge(enrollment::routes())
        .merge(models::routes())
        .merge(provenance::routes())
        .merge(sinks::routes())
        .merge(store::routes())
}

/// The OpenAPI 3.1 document of [`router`]'s routes.
pub fn openapi() -> Document {
    let (_, doc) = documented().split_for_parts();
    finish(doc)
}

/// Names axum's catch-all `{*path}` as OpenAPI's `{path}`, and adds the gate's 401 and 403
/// answers to every operation that needs a token.
fn finish(mut doc: Document) -> Document {
    doc.paths.paths = std::mem::take(&mut doc.paths.paths)
        .into_iter()
        .map(|(path, mut item)| {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let secured = op
                    .security
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s).ok())
                    .is_some_and(|v| v.to_string().contains("\"token\""));
                if secured {
                    for (status, what) in [
                        ("401", "No token, or one that is unknown, expired or revoked"),
                        ("403", "The token's role does not permit this, or the request came from another origin"),
                    ] {
                        op.responses.responses.entry(status.into()).or_insert_with(|| {
                            ResponseBuilder::new()
                                .description(what)
                                .content(
                                    "application/json",
                                    ContentBuilder::new()
                                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                                        .build(),
                                )
                                .build()
                                .into()
                        });
                    }
                }
            }
            (path.replace("{*", "{"), item)
        })
        .collect();
    doc
}

/// The document, serialised once.
#[derive(Clone)]
struct Served(Bytes);

/// This document: the API in OpenAPI 3.1.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "ops",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
async fn openapi_json(Extension(Served(doc)): Extension<Served>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc)
}

/// The access rules the gate enforces, read from the routes' documentation.
pub fn rules(metrics: access::MetricsAuth) -> access::Rules {
    let (_, doc) = documented().split_for_parts();
    let doc = serde_json::to_value(&doc).expect("the OpenAPI document serialises");
    access::Rules::from_document(&doc, metrics)
        .unwrap_or_else(|missing| panic!("routes without an access rule: {missing:?}"))
}

pub fn router(state: AppState) -> Router {
    let (routes, doc) = documented().split_for_parts();
    let gate = access::Gate {
        rules: std::sync::Arc::new(rules(state.auth.metrics)),
        app: state.clone(),
    };
    let doc = finish(doc)
        .to_json()
        .expect("the OpenAPI document serialises");
    let dashboard = crate::dashboard::Config {
        oidc: state.auth.oidc.as_ref().map(|o| crate::dashboard::Sso {
            issuer: o.config().issuer.clone(),
            client_id: o.config().audience.clone(),
        }),
    };
    routes
        .merge(models::v2(state.clone()))
        .merge(crate::dashboard::router(dashboard))
        .fallback(error::not_found)
        .layer(Extension(Served(Bytes::from(doc))))
        .layer(middleware::from_fn_with_state(gate, access::gate))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts every request, including 404s and the fallback, under its route template (so
/// `/api/v1/devices/{id}` is one series however many devices there are).
async fn count(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    s.metrics.observe_http(&route, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests;
