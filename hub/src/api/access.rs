//! The gate every request passes before its handler: the route's access rule, the caller's
//! token, and the browser checks; denials and every change are written to the audit log.
//!
//! Each route states the role it needs in its `#[utoipa::path(security(...))]`: `("token" =
//! ["ROLE"])` needs a bearer token holding ROLE, `()` is open. The rules are read from the same
//! OpenAPI document the hub serves, so the document says exactly what is enforced, and a route
//! without a rule is refused (a test checks that none is missing). `/metrics` is the one
//! configurable route: open by default, or `--metrics-auth token` (viewer).
//!
//! Browsers: credentials travel only in the `Authorization` header (the hub sets no cookies),
//! and a request that changes something is refused when it comes from another origin (its
//! `Origin` or `Sec-Fetch-Site` says so) or carries a body that is not JSON or YAML: a page on
//! another site cannot send such a request without the browser asking the hub first, and the
//! hub answers no such question.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use super::state::AppState;
use crate::auth::audit::Outcome;
use crate::auth::{AuditEntry, Principal, Role};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Open,
    Needs(Role),
}

/// Whether `/metrics` needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MetricsAuth {
    /// Anyone may scrape (counters only: no telemetry, no device ids).
    #[default]
    Open,
    /// A token with any role.
    Token,
}

/// The access rules by (method, route template), read from the OpenAPI document.
#[derive(Debug, Clone, Default)]
pub struct Rules(HashMap<(Method, String), Rule>);

impl Rules {
    /// Reads each operation's `security` from `doc` (as JSON); an operation without one is
    /// listed in the error.
    pub fn from_document(doc: &Value, metrics: MetricsAuth) -> Result<Self, Vec<String>> {
        let mut rules = HashMap::new();
        let mut missing = Vec::new();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        for (path, item) in paths {
            for (method, op) in item.as_object().into_iter().flatten() {
                let Ok(m) = method.to_ascii_uppercase().parse::<Method>() else {
                    continue;
                };
                let rule = match rule_of(&op["security"]) {
                    Some(_) if path == "/metrics" => match metrics {
                        MetricsAuth::Open => Rule::Open,
                        MetricsAuth::Token => Rule::Needs(Role::Viewer),
                    },
                    Some(rule) => rule,
                    None => {
                        missing.push(format!("{} {path}", m.as_str()));
                        continue;
                    }
                };
                rules.insert((m, path.clone()), rule);
            }
        }
        if missing.is_empty() {
            Ok(Self(rules))
        } else {
            Err(missing)
        }
    }

    /// The rule of a route (HEAD is GET's).
    pub fn get(&self, method: &Method, route: &str) -> Option<Rule> {
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        self.0.get(&(method.clone(), route.to_string())).copied()
    }
}

/// `[{}]` → open; `[{"token": ["ROLE"]}]` → that role; anything else → no rule.
fn rule_of(security: &Value) -> Option<Rule> {
    let first = security.as_array()?.first()?.as_object()?;
    if first.is_empty() {
        return Some(Rule::Open);
    }
    let role = first.get("token")?.as_array()?.first()?.as_str()?;
    role.parse().ok().map(Rule::Needs)
}

/// The gate's state: the rules, and the hub's [`AppState`] for tokens, audit and counters.
#[derive(Clone)]
pub struct Gate {
    pub rules: Arc<Rules>,
    pub app: AppState,
}

/// A refusal: status, counted reason, message.
pub(crate) struct Denied(pub StatusCode, pub &'static str, pub String);

/// The middleware.
pub async fn gate(State(g): State<Gate>, mut request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let Some(route) = route else {
        return next.run(request).await; // no such route: the fallback answers 404
    };
    if route.starts_with("/v2/") || route == "/v2" {
        // The Open Inference Protocol's routes: their own gate (`models::v2`) checks them.
        return next.run(request).await;
    }
    if crate::dashboard::is_dashboard(&route) {
        // The dashboard's pages and assets: no data (the pages fetch it from this API).
        return next.run(request).await;
    }
    let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let from = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let mut entry = audit_entry(&method, &route, request.uri().path(), from);
    let checked = check(&g, &method, &route, request.headers(), changes).await;
    let principal = match checked {
        Ok(p) => p,
        Err((principal, denied)) => return refuse(&g.app, entry, principal, denied),
    };
    if let Some(p) = &principal {
        entry.actor = p.name.clone();
        entry.role = Some(p.role);
        request.extensions_mut().insert(p.clone());
    }
    let response = next.run(request).await;
    if changes {
        entry.status = response.status().as_u16();
        if !audit(&g.app, &entry, true) {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the change was made but could not be written to the audit log; see the hub's log",
            )
            .into_response();
        }
    }
    response
}

/// Counts, audits and answers a refusal.
fn refuse(
    app: &AppState,
    mut entry: AuditEntry,
    principal: Option<Principal>,
    Denied(status, reason, message): Denied,
) -> Response {
    if let Some(p) = principal {
        entry.actor = p.name;
        entry.role = Some(p.role);
    }
    app.metrics.deny_http(reason);
    entry.outcome = Outcome::Denied;
    entry.status = status.as_u16();
    entry.reason = Some(reason.into());
    audit(app, &entry, false);
    let mut response = ApiError::new(status, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
    }
    response
}

/// The check for routes outside the OpenAPI document (the V2 protocol's): a token holding
/// `needed`, and, for a request with a body, the same-origin check. Refusals are counted and
/// audited like the gate's; allowed requests are not audited.
pub async fn authorize(
    app: &AppState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    needed: Role,
    from: Option<String>,
) -> Result<(), Response> {
    let entry = audit_entry(method, path, path, from);
    let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let checked = async {
        if changes {
            same_origin(headers).map_err(|d| (None, d))?;
        }
        holding(app, method, path, headers, needed).await
    };
    match checked.await {
        Ok(_) => Ok(()),
        Err((principal, denied)) => Err(refuse(app, entry, principal, denied)),
    }
}

/// The audit entry of a request, allowed and unauthenticated until it is checked.
fn audit_entry(method: &Method, route: &str, object: &str, from: Option<String>) -> AuditEntry {
    AuditEntry {
        time_ms: crate::now_ms(),
        actor: "unauthenticated".into(),
        role: None,
        action: format!("{method} {route}"),
        object: object.to_string(),
        from,
        outcome: Outcome::Allowed,
        status: 0,
        reason: None,
    }
}

/// The caller, when its token holds `needed`; else why not (with the caller when known).
async fn holding(
    app: &AppState,
    method: &Method,
    route: &str,
    headers: &HeaderMap,
    needed: Role,
) -> Result<Principal, (Option<Principal>, Denied)> {
    let p = authenticate(&app.auth, headers)
        .await
        .map_err(|d| (None, d))?;
    if !p.role.permits(needed) {
        let message = format!(
            "{method} {route} needs the {needed} role; {} has {}",
            p.name, p.role
        );
        return Err((Some(p), Denied(StatusCode::FORBIDDEN, "role", message)));
    }
    Ok(p)
}

/// Appends to the audit log; false (and logged) when the log cannot be written.
fn audit(app: &AppState, entry: &AuditEntry, durable: bool) -> bool {
    match app.auth.audit.append(entry, durable) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, action = %entry.action, "cannot write the audit log");
            false
        }
    }
}

/// The principal, or why not (with the principal when it was known).
async fn check(
    g: &Gate,
    method: &Method,
    route: &str,
    headers: &HeaderMap,
    changes: bool,
) -> Result<Option<Principal>, (Option<Principal>, Denied)> {
    if changes {
        same_origin(headers).map_err(|d| (None, d))?;
    }
    let rule = g.rules.get(method, route).ok_or_else(|| {
        (
            None,
            Denied(
                StatusCode::FORBIDDEN,
                "no_rule",
                format!("{method} {route} has no access rule; refused"),
            ),
        )
    })?;
    let principal = match rule {
        Rule::Open => None,
        Rule::Needs(needed) => Some(holding(&g.app, method, route, headers, needed).await?),
    };
    if changes {
        body_type(headers).map_err(|d| (principal.clone(), d))?;
    }
    Ok(principal)
}

/// The bearer token's principal (everyone is admin when authentication is off): an API token,
/// or a JWT from the OpenID Connect issuer.
pub(crate) async fn authenticate(
    auth: &super::state::AuthState,
    headers: &HeaderMap,
) -> Result<Principal, Denied> {
    if !auth.enforce {
        return Ok(Principal::anonymous_admin());
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(Denied(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "this hub needs an API token: send `Authorization: Bearer TOKEN` (the CLI reads \
             SHOAL_TOKEN or `shoal login`; an admin makes tokens with `shoal tokens create`)"
                .into(),
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            Denied(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the Authorization header must be `Bearer TOKEN`".into(),
            )
        })?;
    if crate::auth::oidc::Oidc::is_jwt(token) {
        let Some(oidc) = &auth.oidc else {
            return Err(Denied(
                StatusCode::UNAUTHORIZED,
                "jwt_not_accepted",
                "this hub accepts no JWTs (it runs without --oidc-issuer); use an API token".into(),
            ));
        };
        return oidc
            .authenticate(token, crate::now_ms() / 1000)
            .await
            .map_err(|e| {
                let status = match e {
                    crate::auth::oidc::OidcError::NoRole(_) => StatusCode::FORBIDDEN,
                    crate::auth::oidc::OidcError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::UNAUTHORIZED,
                };
                Denied(status, e.reason(), e.to_string())
            });
    }
    auth.tokens
        .authenticate(token, crate::now_ms())
        .map_err(|e| Denied(StatusCode::UNAUTHORIZED, e.reason(), e.to_string()))
}

/// Refuses a change that a browser says comes from another site.
fn same_origin(headers: &HeaderMap) -> Result<(), Denied> {
    let cross = |why: String| Err(Denied(StatusCode::FORBIDDEN, "cross_origin", why));
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return cross(format!(
            "a change requested by a page of another site (Sec-Fetch-Site: {site}) is refused"
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(()); // not a browser, or a same-origin request of an older one
    };
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'));
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => cross(format!(
            "a change requested by a page of another origin ({origin}) is refused; use the \
             CLI or call the API from the hub's own origin"
        )),
    }
}

/// A change's body must say it is JSON or YAML (a form or `text/plain` is what a page of
/// another site can send without asking first).
fn body_type(headers: &HeaderMap) -> Result<(), Denied> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?").to_ascii_lowercase());
    let has_body = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|n| n != "0")
        || headers.contains_key(header::TRANSFER_ENCODING);
    let essence = content_type
        .as_deref()
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    match essence.as_deref() {
        None if !has_body => Ok(()),
        Some("application/json" | "application/yaml" | "application/x-yaml") => Ok(()),
        other => Err(Denied(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            format!(
                "a request body must be application/json or application/yaml, not {}",
                other.unwrap_or("unlabelled")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_come_from_the_security_of_each_operation() {
        let doc = json!({"paths": {
            "/healthz": {"get": {"security": [{}]}},
            "/metrics": {"get": {"security": [{}]}},
            "/api/v1/jobs": {
                "get": {"security": [{"token": ["viewer"]}]},
                "post": {"security": [{"token": ["scientist"]}]},
            },
        }});
        let rules = Rules::from_document(&doc, MetricsAuth::Token).unwrap();
        assert_eq!(rules.get(&Method::GET, "/healthz"), Some(Rule::Open));
        assert_eq!(
            rules.get(&Method::HEAD, "/api/v1/jobs"),
            Some(Rule::Needs(Role::Viewer))
        );
        assert_eq!(
            rules.get(&Method::POST, "/api/v1/jobs"),
            Some(Rule::Needs(Role::Scientist))
        );
        assert_eq!(
            rules.get(&Method::GET, "/metrics"),
            Some(Rule::Needs(Role::Viewer))
        );
        let missing =
            json!({"paths": {"/x": {"delete": {}, "get": {"security": [{"token": ["root"]}]}}}});
        let err = Rules::from_document(&missing, MetricsAuth::Open).unwrap_err();
        assert_eq!(err, vec!["DELETE /x".to_string(), "GET /x".to_string()]);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn another_origin_may_not_change_anything() {
        let ok = |p: &[(&'static str, &str)]| same_origin(&headers(p)).is_ok();
        assert!(ok(&[("host", "127.0.0.1:8080")]));
        assert!(ok(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ]));
        assert!(!ok(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example")
        ]));
        assert!(!ok(&[("host", "127.0.0.1:8080"), ("origin", "null")]));
        assert!(!ok(&[
            ("host", "127.0.0.1:8080"),
            ("sec-fetch-site", "cross-site")
        ]));
        assert!(ok(&[("host", "h"), ("sec-fetch-site", "same-origin")]));
    }

    #[test]
    fn a_change_carries_json_or_yaml_or_nothing() {
        let ok = |p: &[(&'static str, &str)]| body_type(&headers(p)).is_ok();
        assert!(ok(&[]));
        assert!(ok(&[("content-length", "0")]));
        assert!(ok(&[
            ("content-type", "application/json; charset=utf-8"),
            ("content-length", "2")
        ]));
        assert!(ok(&[
            ("content-type", "application/yaml"),
            ("content-length", "9")
        ]));
        assert!(!ok(&[
            ("content-type", "text/plain"),
            ("content-length", "9")
        ]));
        assert!(!ok(&[(
            "content-type",
            "application/x-www-form-urlencoded"
        )]));
        assert!(!ok(&[("content-length", "9")]));
    }
}
