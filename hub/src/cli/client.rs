//! The REST client under every operator command: one request path, errors that say what to do.

use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach the hub at {url}: {reason}. Is `shoal serve` (or `shoal up`) running there? Set --hub or SHOAL_HUB_URL."
    )]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Api(String),
    #[error("the hub answered something that is not JSON: {0}")]
    BadAnswer(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub struct Client {
    pub(super) base: String,
    pub(super) http: reqwest::Client,
}

impl Client {
    /// A client of the hub at `base`, sending `token` (if any) as `Authorization: Bearer`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) =
            token.and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            let mut value = value;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .default_headers(headers)
            .build()
            .expect("http client");
        Self {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub(super) async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Value, CliError> {
        self.request(reqwest::Method::GET, path, query, None).await
    }

    pub(super) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Value, CliError> {
        self.request(method, path, &[], body).await
    }

    /// A JSON body.
    pub(super) async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<Value, CliError> {
        self.request_typed(
            method,
            path,
            &[],
            Some((body.to_string(), "application/json")),
        )
        .await
    }

    /// One REST call with a YAML (or JSON: YAML is a superset) body; a non-2xx answer becomes
    /// the API's own error message.
    pub(super) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<String>,
    ) -> Result<Value, CliError> {
        self.request_typed(method, path, query, body.map(|b| (b, "application/yaml")))
            .await
    }

    async fn request_typed(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(String, &str)>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).query(query);
        if let Some((b, content_type)) = body {
            req = req.header("content-type", content_type).body(b);
        }
        let resp = req.send().await.map_err(|e| CliError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| CliError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            let msg = body["error"]
                .as_str()
                .unwrap_or("request failed")
                .to_string();
            return Err(CliError::Api(format!("{msg} (HTTP {status})")));
        }
        Ok(body)
    }

    pub(super) async fn get_text(&self, path: &str) -> Result<String, CliError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| CliError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| CliError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            return Err(api_error(status, text.as_bytes()));
        }
        Ok(text)
    }
}

pub(super) fn root_cause(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// Percent-encodes a path segment (device ids are already URL-safe; this guards typos).
/// A non-2xx answer as the API's own message (its JSON `error`, else the body as text).
pub(super) fn api_error(status: reqwest::StatusCode, body: &[u8]) -> CliError {
    let msg = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    CliError::Api(format!("{msg} (HTTP {status})"))
}

pub(super) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'-' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
