//! The Elasticsearch (and OpenSearch) sink: samples bulk-indexed into monthly indices named
//! like the book's (`sensor-YYYY-MM`), one flat document per sample.
//!
//! - At start the index template `PREFIX` (patterns `PREFIX-*`) is installed: `@timestamp`,
//!   `device_id` and every device label as keywords, and a numeric mapping for every metric
//!   family (per-core, per-disk, per-sensor series as `family.LABEL` fields).
//! - Each document's `_id` is `DEVICE-SEQ` and each action is `create`: a batch sent again
//!   creates nothing twice (409 counts as already there).
//! - Per item: a document the server refuses as wrong (400: a mapping or parse error) goes to
//!   the dead-letter file `DATA_DIR/sinks/NAME.dead-letter.jsonl` and is counted, never retried
//!   forever; anything else (429, 5xx, a blocked or missing index) is retried, that item only.
//!   A request the server finds too large (413) is split.
//!
//! Only the documented request and response shapes of `_bulk` and `_index_template` are used
//! (Elasticsearch 8/9 and OpenSearch 2 agree on them).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value, json};
use shoal_proto::metrics::{FAMILIES, Unit, for_each_point};

use super::{BoxFuture, Delivered, Sink, SinkError, SinkSpec, backoff};
use crate::store::outbox::{Entry, Item};

/// Attempts at the items of one batch that answer 429 or 5xx before the batch counts as failed.
const ITEM_ATTEMPTS: u32 = 5;

pub struct ElasticSink {
    name: String,
    base: String,
    prefix: String,
    http: reqwest::Client,
    credentials: Option<(String, String)>,
    dead_letter: PathBuf,
    /// Ids written to the dead-letter file since the last batch that got through, so a batch
    /// tried again does not write them twice.
    dead_lettered: std::collections::HashSet<String>,
}

impl ElasticSink {
    pub fn new(spec: &SinkSpec, data_dir: &std::path::Path) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(spec.timeout)
            .build()
            .map_err(|e| format!("{}: {e}", spec.display_url()))?;
        Ok(Self {
            name: spec.name.clone(),
            base: spec.endpoint.trim_end_matches('/').to_string(),
            prefix: spec.target.clone(),
            http,
            credentials: spec.credentials.clone(),
            dead_letter: super::dead_letter_path(data_dir, &spec.name),
            dead_lettered: std::collections::HashSet::new(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}/{path}", self.base));
        match &self.credentials {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }
}

/// The index a sample goes to: `PREFIX-YYYY-MM` of its own timestamp (UTC).
pub fn index_for(prefix: &str, timestamp_ms: i64) -> String {
    let month = chrono::DateTime::from_timestamp_millis(timestamp_ms)
        .unwrap_or_default()
        .format("%Y-%m");
    format!("{prefix}-{month}")
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A label value as a field name: letters, digits and `_` (`/` → `root`, `/var/log` →
/// `var_log`).
pub fn field_label(v: &str) -> String {
    let s: String = v
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let s = s.trim_matches('_');
    if s.is_empty() {
        "root".into()
    } else {
        s.to_string()
    }
}

/// One sample as a flat document: `@timestamp`, `device_id`, `seq`, `labels.*`, then one
/// field per metric point (`cpu_percent`, `temperature_celsius.soc`, …).
pub fn document(
    device_id: &str,
    sample: &shoal_proto::v1::Sample,
    labels: &std::collections::BTreeMap<String, String>,
    committed_ms: i64,
) -> Value {
    let mut doc = Map::new();
    doc.insert("@timestamp".into(), json!(rfc3339(sample.timestamp_ms)));
    doc.insert("device_id".into(), json!(device_id));
    doc.insert("seq".into(), json!(sample.seq));
    doc.insert("hub_received".into(), json!(rfc3339(committed_ms)));
    if !labels.is_empty() {
        doc.insert("labels".into(), json!(labels));
    }
    let mut grouped: Map<String, Value> = Map::new();
    for_each_point(sample, |name, value| {
        if !value.is_finite() {
            return;
        }
        match name.split_once('{') {
            None => {
                doc.insert(name.to_string(), number(value));
            }
            Some((family, rest)) => {
                let label = rest
                    .split_once('"')
                    .and_then(|(_, r)| r.rsplit_once('"'))
                    .map_or(rest, |(v, _)| v);
                let slot = grouped
                    .entry(family.to_string())
                    .or_insert_with(|| json!({}));
                slot.as_object_mut()
                    .expect("object")
                    .insert(field_label(label), number(value));
            }
        }
    });
    doc.extend(grouped);
    Value::Object(doc)
}

/// Whole numbers as integers (byte counts fit `long` fields exactly), others as floats.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

fn mapping_type(unit: Unit) -> &'static str {
    match unit {
        Unit::Bytes => "long",
        _ => "double",
    }
}

/// The index template for `PREFIX-*`.
pub fn index_template(prefix: &str) -> Value {
    let mut properties = Map::new();
    properties.insert("@timestamp".into(), json!({"type": "date"}));
    properties.insert("hub_received".into(), json!({"type": "date"}));
    properties.insert("device_id".into(), json!({"type": "keyword"}));
    properties.insert("seq".into(), json!({"type": "long"}));
    let mut dynamic = vec![json!({"labels": {
        "path_match": "labels.*",
        "mapping": {"type": "keyword"}
    }})];
    for f in FAMILIES {
        match f.label {
            None => {
                properties.insert(f.name.into(), json!({"type": mapping_type(f.unit)}));
            }
            Some(_) => {
                properties.insert(f.name.into(), json!({"type": "object"}));
                dynamic.push(json!({ f.name: {
                    "path_match": format!("{}.*", f.name),
                    "mapping": {"type": mapping_type(f.unit)}
                }}));
            }
        }
    }
    json!({
        "index_patterns": [format!("{prefix}-*")],
        "priority": 100,
        "template": {
            "settings": {"number_of_shards": 1},
            "mappings": {
                "dynamic_templates": dynamic,
                "properties": properties,
            }
        },
        "_meta": {"managed_by": "shoal", "schema": "docs/data-platform.md"}
    })
}

/// Why an HTTP answer is not usable, in words.
fn answer_error(what: &str, status: reqwest::StatusCode, body: &str) -> SinkError {
    let snippet: String = body.chars().take(200).collect();
    SinkError::new(format!("{what}: HTTP {status}: {snippet}"))
}

fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    h.get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(300)))
}

impl Sink for ElasticSink {
    fn prepare(&mut self, _resume_ms: Option<i64>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let url = &self.base;
            let r = self
                .request(
                    reqwest::Method::PUT,
                    &format!("_index_template/{}", self.prefix),
                )
                .json(&index_template(&self.prefix))
                .send()
                .await
                .map_err(|e| SinkError::new(format!("{url}: cannot reach it: {e}")))?;
            let status = r.status();
            let ra = retry_after(r.headers());
            let body = r.text().await.unwrap_or_default();
            if !status.is_success() {
                let mut e = answer_error(
                    &format!("{url}: installing the index template {}", self.prefix),
                    status,
                    &body,
                );
                e.retry_after = ra;
                return Err(e);
            }
            let v: Value = serde_json::from_str(&body).map_err(|_| {
                answer_error(
                    &format!(
                        "{url}: not an Elasticsearch/OpenSearch answer to PUT _index_template"
                    ),
                    status,
                    &body,
                )
            })?;
            if v.get("acknowledged") != Some(&Value::Bool(true)) {
                return Err(answer_error(
                    &format!("{url}: the index template was not acknowledged"),
                    status,
                    &body,
                ));
            }
            Ok(())
        })
    }

    fn deliver<'a>(
        &'a mut self,
        batch: &'a [Entry],
    ) -> BoxFuture<'a, Result<Delivered, SinkError>> {
        Box::pin(async move {
            let mut out = Delivered::default();
            // (index, id, document) of every sample in the batch.
            let mut todo: Vec<(String, String, Value)> = Vec::with_capacity(batch.len());
            for entry in batch {
                match &entry.item {
                    Item::Sample {
                        device_id,
                        sample,
                        labels,
                    } => todo.push((
                        index_for(&self.prefix, sample.timestamp_ms),
                        format!("{device_id}-{}", sample.seq),
                        document(device_id, sample, labels, entry.committed_ms),
                    )),
                    Item::Event(_) => out.skipped += 1,
                }
            }
            // Documents per request: halved whenever the server finds a request too large.
            let mut chunk = todo.len().max(1);
            let mut attempt = 0;
            while !todo.is_empty() {
                attempt += 1;
                let mut again = Vec::new();
                let mut dead = Vec::new();
                let mut last_retry_reason = String::new();
                let mut rest = std::mem::take(&mut todo);
                while !rest.is_empty() {
                    let tail = rest.split_off(chunk.min(rest.len()));
                    let part = std::mem::replace(&mut rest, tail);
                    match self.bulk(&part).await? {
                        Bulk::TooLarge if part.len() > 1 => {
                            chunk = (part.len() / 2).max(1);
                            // Back in front, to be sent in smaller requests.
                            let mut back = part;
                            back.append(&mut rest);
                            rest = back;
                        }
                        Bulk::TooLarge => {
                            let (index, id, doc) = part.into_iter().next().expect("one");
                            if !self.dead_lettered.contains(&id) {
                                dead.push(json!({
                                    "sink": self.name, "index": index, "id": id, "status": 413,
                                    "error": "larger than the server takes in one request",
                                    "document": doc,
                                }));
                            }
                        }
                        Bulk::Items(items) => {
                            for (item, doc) in items.iter().zip(part) {
                                let result = item.get("create").or_else(|| item.get("index"));
                                let code = result
                                    .and_then(|r| r.get("status"))
                                    .and_then(Value::as_u64)
                                    .unwrap_or(0);
                                match code {
                                    200 | 201 => out.sent += 1,
                                    409 => out.already += 1,
                                    // The document itself is wrong (a mapping or parse error):
                                    // no retry can fix it.
                                    400 => {
                                        if !self.dead_lettered.contains(&doc.1) {
                                            dead.push(json!({
                                                "sink": self.name,
                                                "index": doc.0,
                                                "id": doc.1,
                                                "status": code,
                                                "error": result.and_then(|r| r.get("error")).cloned(),
                                                "document": doc.2,
                                            }));
                                        }
                                    }
                                    // Back-pressure, a blocked or missing index, a server error:
                                    // this document again, by itself.
                                    _ => {
                                        last_retry_reason =
                                            result.and_then(|r| r.get("error")).map_or_else(
                                                || format!("status {code}"),
                                                |e| e.to_string(),
                                            );
                                        again.push(doc);
                                    }
                                }
                            }
                        }
                    }
                }
                if !dead.is_empty() {
                    out.dead += dead.len() as u64;
                    let ids: Vec<String> = dead
                        .iter()
                        .filter_map(|d| d["id"].as_str().map(str::to_string))
                        .collect();
                    let (path, n) = (self.dead_letter.clone(), dead.len());
                    tokio::task::spawn_blocking(move || super::append_dead_letters(&path, &dead))
                        .await
                        .expect("dead-letter write")?;
                    // Written: a retry of this batch must not write them again.
                    self.dead_lettered.extend(ids);
                    tracing::warn!(
                        sink = %self.name,
                        documents = n,
                        file = %self.dead_letter.display(),
                        "documents refused for good; written to the dead-letter file"
                    );
                }
                if !again.is_empty() && attempt >= ITEM_ATTEMPTS {
                    return Err(SinkError::new(format!(
                        "{}/_bulk: {} documents still refused after {attempt} attempts: {last_retry_reason}",
                        self.base,
                        again.len()
                    )));
                }
                if !again.is_empty() {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                todo = again;
            }
            // A batch that got through: its dead letters will not come back.
            self.dead_lettered.clear();
            Ok(out)
        })
    }
}

/// What one `_bulk` request came to.
enum Bulk {
    /// One result per document, in order.
    Items(Vec<Value>),
    /// 413: the request was larger than the server takes.
    TooLarge,
}

impl ElasticSink {
    /// Sends one `_bulk` request of `create` actions; anything but a bulk answer with one item
    /// per document is an error (the whole batch is tried again later).
    async fn bulk(&self, docs: &[(String, String, Value)]) -> Result<Bulk, SinkError> {
        let mut body = Vec::with_capacity(docs.len() * 512);
        for (index, id, doc) in docs {
            serde_json::to_writer(&mut body, &json!({"create": {"_index": index, "_id": id}}))
                .expect("JSON");
            body.push(b'\n');
            serde_json::to_writer(&mut body, doc).expect("JSON");
            body.push(b'\n');
        }
        let url = &self.base;
        let r = self
            .request(reqwest::Method::POST, "_bulk")
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .send()
            .await
            .map_err(|e| SinkError::new(format!("{url}/_bulk: {e}")))?;
        let status = r.status();
        if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE {
            return Ok(Bulk::TooLarge);
        }
        let ra = retry_after(r.headers());
        let text = r
            .text()
            .await
            .map_err(|e| SinkError::new(format!("{url}/_bulk: reading the answer: {e}")))?;
        if !status.is_success() {
            let mut e = answer_error(&format!("{url}/_bulk"), status, &text);
            e.retry_after = ra;
            return Err(e);
        }
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            answer_error(&format!("{url}/_bulk: not a bulk response"), status, &text)
        })?;
        match v.get("items").and_then(Value::as_array) {
            Some(items) if items.len() == docs.len() => Ok(Bulk::Items(items.clone())),
            _ => Err(answer_error(
                &format!(
                    "{url}/_bulk: the answer does not list one item per document ({} sent)",
                    docs.len()
                ),
                status,
                &text,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::v1::{Cpu, Disk, Sample, Temperature};

    #[test]
    fn monthly_indices_and_flat_documents() {
        assert_eq!(index_for("sensor", 1_764_460_800_000), "sensor-2025-11");
        assert_eq!(index_for("sensor", 1_764_547_200_000), "sensor-2025-12");
        let s = Sample {
            seq: 7,
            timestamp_ms: 1_764_460_800_123,
            cpu: Some(Cpu {
                total_percent: 12.5,
                core_percent: vec![10.0, 15.0],
            }),
            disks: vec![Disk {
                mount_point: "/".into(),
                total_bytes: 100,
                used_bytes: 40,
                ..Default::default()
            }],
            temperatures: vec![Temperature {
                sensor: "soc".into(),
                celsius: 51.0,
            }],
            ..Default::default()
        };
        let labels = [("site".to_string(), "north".to_string())].into();
        let d = document("pi-1", &s, &labels, 1_764_460_801_000);
        assert_eq!(d["@timestamp"], "2025-11-30T00:00:00.123Z");
        assert_eq!(d["device_id"], "pi-1");
        assert_eq!(d["labels"]["site"], "north");
        assert_eq!(d["cpu_percent"], 12.5);
        assert_eq!(d["cpu_core_percent"]["1"], 15.0);
        assert_eq!(d["disk_used_bytes"]["root"], 40.0);
        assert_eq!(d["temperature_celsius"]["soc"], 51.0);
        assert!(
            d.get("memory_used_bytes").is_none(),
            "missing stays missing"
        );
        assert_eq!(field_label("/var/log"), "var_log");
    }

    #[test]
    fn the_template_maps_every_metric_family() {
        let t = index_template("sensor");
        let props = &t["template"]["mappings"]["properties"];
        for f in FAMILIES {
            assert!(props.get(f.name).is_some(), "{}", f.name);
        }
        assert_eq!(props["memory_used_bytes"]["type"], "long");
        assert_eq!(props["device_id"]["type"], "keyword");
        assert_eq!(t["index_patterns"][0], "sensor-*");
    }
}
