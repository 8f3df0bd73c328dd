//! The OpenAPI document: its shape, and its schemas against what the real types serialise to
//! (the mirrors in `schemas.rs` must not drift from the registry, the job store, the telemetry
//! contract and the dataset manifest). `tests/tests/openapi.rs` checks it against a running hub.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use shoal_proto::v1::{
    Cpu, Disk, Gpu, LoadAverage, Memory, NetInterface, PiBoard, Sample, Temperature,
};

use super::datasets::ExportLine;
use super::devices::{DeviceDetail, DeviceView};
use crate::jobs::store::{RunRecord, RunStatus};
use crate::registry::{DeviceRecord, Status};
use crate::store::series::Bucket;

fn doc() -> Value {
    serde_json::to_value(super::openapi()).expect("document serialises")
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(
            doc,
            doc.pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling {r}")),
        ),
        None => schema,
    }
}

/// The schema, its `allOf` parts and its non-null `oneOf` branches (the mirrors use `oneOf`
/// only for nullable values).
fn parts<'a>(doc: &'a Value, schema: &'a Value, out: &mut Vec<&'a Value>) {
    let schema = resolve(doc, schema);
    out.push(schema);
    for sub in schema["allOf"].as_array().into_iter().flatten() {
        parts(doc, sub, out);
    }
    for sub in schema["oneOf"].as_array().into_iter().flatten() {
        if sub["type"] != "null" {
            parts(doc, sub, out);
        }
    }
}

/// Where `value` and the component `name` disagree: a property the schema does not declare (on
/// an object that does not open itself to more), a required one missing, a string not in an
/// enum.
fn mismatches(value: &Value, name: &str) -> Vec<String> {
    let doc = doc();
    let mut out = Vec::new();
    walk(
        &doc,
        &json!({ "$ref": format!("#/components/schemas/{name}") }),
        value,
        name,
        &mut out,
    );
    out
}

fn walk(doc: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let mut ps = Vec::new();
    parts(doc, schema, &mut ps);
    match value {
        Value::Object(map) => {
            let props: BTreeMap<&String, &Value> = ps
                .iter()
                .filter_map(|p| p["properties"].as_object())
                .flatten()
                .collect();
            let open = props.is_empty()
                || ps
                    .iter()
                    .any(|p| p.get("additionalProperties").is_some_and(|a| a != false));
            for (key, v) in map {
                match props.get(key) {
                    Some(sub) => walk(doc, sub, v, &format!("{at}.{key}"), out),
                    None if !open => out.push(format!("{at}: {key:?} is not in the schema")),
                    None => {}
                }
            }
            for p in &ps {
                for r in p["required"].as_array().into_iter().flatten() {
                    let r = r.as_str().unwrap();
                    if !map.contains_key(r) {
                        out.push(format!(
                            "{at}: the schema requires {r:?}, the value lacks it"
                        ));
                    }
                }
            }
        }
        Value::Array(items) => {
            for p in &ps {
                if let Some(item) = p.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        walk(doc, item, v, &format!("{at}[{i}]"), out);
                    }
                }
            }
        }
        Value::String(_) => {
            for p in &ps {
                if let Some(values) = p["enum"].as_array()
                    && !values.contains(value)
                {
                    out.push(format!("{at}: {value} is not one of {values:?}"));
                }
            }
        }
        _ => {}
    }
}

fn assert_matches(value: impl serde::Serialize, name: &str) {
    let value = serde_json::to_value(value).unwrap();
    let found = mismatches(&value, name);
    assert!(found.is_empty(), "{name} vs {value}:\n{}", found.join("\n"));
}

fn record() -> DeviceRecord {
    DeviceRecord {
        device_id: "pi-1".into(),
        hostname: "pi".into(),
        arch: "aarch64".into(),
        os: "Debian GNU/Linux 12".into(),
        kernel: "6.1".into(),
        hardware_model: "Raspberry Pi 4".into(),
        agent_version: "0.1.0".into(),
        gpu_driver_version: String::new(),
        cuda_version: String::new(),
        labels: [("site".to_string(), "lab".to_string())].into(),
        first_seen_ms: 1,
        last_seen_ms: 2,
    }
}

/// A sample with every part filled in.
fn full_sample() -> Sample {
    let gpu = Gpu {
        name: "A100".into(),
        source: "nvml".into(),
        ..Default::default()
    };
    Sample {
        seq: 1,
        timestamp_ms: 1000,
        cpu: Some(Cpu {
            total_percent: 1.0,
            core_percent: vec![1.0],
        }),
        load: Some(LoadAverage {
            one: 1.0,
            five: None,
            fifteen: Some(1.0),
        }),
        memory: Some(Memory::default()),
        disks: vec![Disk::default()],
        networks: vec![NetInterface::default()],
        uptime_seconds: Some(1),
        temperatures: vec![Temperature::default()],
        process_count: None,
        gpus: vec![Gpu {
            mig_devices: vec![gpu.clone()],
            ..gpu
        }],
        pi: Some(PiBoard::default()),
    }
}

#[test]
fn the_document_is_openapi_3_1_with_every_operation_described() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "Shoal hub API");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        assert!(!path.contains('*'), "{path}: axum's catch-all leaked");
        let placeholders: BTreeSet<&str> = path
            .split('{')
            .skip(1)
            .map(|p| p.split('}').next().unwrap())
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let at = format!("{} {path}", method.to_uppercase());
            assert!(
                ids.insert(op["operationId"].as_str().unwrap().to_string()),
                "{at}: operationId repeats"
            );
            assert!(op["summary"].is_string(), "{at}: no summary");
            assert_eq!(op["tags"].as_array().map(Vec::len), Some(1), "{at}");
            let path_params: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert_eq!(path_params, placeholders, "{at}: path parameters");
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.contains_key("200") || responses.contains_key("201"),
                "{at}: no 200 or 201"
            );
            for (status, response) in responses {
                let content = response["content"].as_object().unwrap_or_else(|| {
                    panic!("{at} {status}: no content");
                });
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &content["application/json"]["schema"]["$ref"];
                    assert!(
                        schema == "#/components/schemas/ErrorBody"
                            || schema == "#/components/schemas/ManifestErrorBody",
                        "{at} {status}: errors answer the API's error form"
                    );
                }
            }
        }
    }
    // Every error form carries `error`, so a client reads them all alike.
    for name in ["ErrorBody", "ManifestErrorBody"] {
        let required = &doc["components"]["schemas"][name]["required"];
        assert!(required.as_array().unwrap().contains(&json!("error")));
    }
}

#[test]
fn the_device_schemas_match_what_devices_serialise_to() {
    assert_matches(record(), "DeviceRecord");
    for status in [Status::Online, Status::Stale, Status::Offline] {
        // A new status fails to compile here: add it to `schemas::DeviceStatus` too.
        match status {
            Status::Online | Status::Stale | Status::Offline => {}
        }
        assert_matches(status, "DeviceStatus");
    }
    let view = || DeviceView {
        record: record(),
        status: Status::Stale,
        stored_up_to_seq: 9,
        anomaly: Some(crate::models::scoring::DeviceScore {
            score: 4.5,
            residual: -6.75,
            expected: 51.5,
            observed: 44.75,
            target: "temperature_celsius".into(),
            model: "shoal-anomaly".into(),
            version: "3".into(),
            seq: 9,
            time_ms: 1_700_000_000_000,
        }),
        latest: Some(crate::store::readings::Readings::of(&full_sample())),
    };
    assert_matches(view(), "DeviceView");
    let mut unread = view();
    unread.latest = Some(crate::store::readings::Readings::of(&Sample::default()));
    assert_matches(unread, "DeviceView");
    let mut never = view();
    never.latest = None;
    assert_matches(never, "DeviceView");
    assert_matches(full_sample(), "Sample");
    assert_matches(Sample::default(), "Sample");
    assert_matches(
        DeviceDetail {
            view: view(),
            latest_sample: Some(full_sample()),
            stored: Some(super::devices::StoredSeqs {
                first_seq: 3,
                last_seq: 9,
                samples: 6,
                missing: 1,
            }),
        },
        "DeviceDetail",
    );
    assert_matches(
        DeviceDetail {
            view: view(),
            latest_sample: None,
            stored: None,
        },
        "DeviceDetail",
    );
    assert_matches(
        Bucket {
            t: 0,
            count: 1,
            min: 1.0,
            max: 2.0,
            avg: 1.5,
            last: 2.0,
        },
        "Bucket",
    );
}

#[test]
fn the_mirrors_notice_a_property_they_lack() {
    let mut v = serde_json::to_value(record()).unwrap();
    v["owner"] = json!("ops");
    v.as_object_mut().unwrap().remove("arch");
    let found = mismatches(&v, "DeviceRecord");
    assert_eq!(found.len(), 2, "{found:?}");
    let mut sample = serde_json::to_value(full_sample()).unwrap();
    sample["gpus"][0]["mig_devices"][0]["fan_rpm"] = json!(1);
    assert_eq!(mismatches(&sample, "Sample").len(), 1);
}

#[test]
fn the_run_schema_matches_what_runs_serialise_to() {
    use RunStatus::*;
    let all = [
        Running,
        Succeeded,
        Failed,
        DeadlineExceeded,
        Cancelled,
        Skipped,
        Interrupted,
        StartFailed,
    ];
    for status in all {
        // A new status fails to compile here: add it to the list and to `schemas::RunStatus`.
        match status {
            Running | Succeeded | Failed | DeadlineExceeded | Cancelled | Skipped | Interrupted
            | StartFailed => {}
        }
        for reason in [None, Some("exit code 1".to_string())] {
            assert_matches(
                RunRecord {
                    id: "r".into(),
                    job: "j".into(),
                    scheduled_ms: 1,
                    manual: true,
                    started_ms: Some(1),
                    finished_ms: None,
                    status,
                    reason,
                    attempts: vec![Some(0), None],
                },
                "RunRecord",
            );
        }
    }
}

#[test]
fn the_dataset_manifest_schema_matches_the_manifest() {
    use shoal_ml::dataset::{FileEntry, Manifest, schema};
    let manifest = Manifest {
        format: "shoal-dataset/1".into(),
        created_ms: 1,
        schema: schema(),
        rows: 1,
        from_ms: Some(1),
        to_ms: None,
        devices: vec!["pi-1".into()],
        files: vec![FileEntry {
            path: "part-0.parquet".into(),
            rows: 1,
            bytes: 10,
            sha256: "0".repeat(64),
        }],
        source: json!({ "since": "1h", "hub": "http://hub" }),
    };
    assert_matches(&manifest, "DatasetManifest");
    // The lines keep the form the CLI reads.
    let lines = [
        ExportLine::Progress { rows: 0, total: 5 },
        ExportLine::Manifest(manifest),
        ExportLine::Error("disk full".into()),
    ];
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::to_value(l).unwrap())
        .collect();
    assert_eq!(lines[0], json!({ "progress": { "rows": 0, "total": 5 } }));
    assert_eq!(lines[1]["manifest"]["rows"], 1);
    assert_eq!(lines[2], json!({ "error": "disk full" }));
}

#[test]
fn every_operation_states_the_role_it_needs() {
    use super::access::{MetricsAuth, Rule};
    use crate::auth::Role;
    use axum::http::Method;
    let doc = doc();
    assert_eq!(
        doc["components"]["securitySchemes"]["token"]["scheme"], "bearer",
        "{:#}",
        doc["components"]["securitySchemes"]
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let security = op["security"].as_array();
            assert!(security.is_some(), "{method} {path} states no role");
            if op["security"][0].get("token").is_some() {
                for status in ["401", "403"] {
                    assert!(
                        op["responses"][status].is_object(),
                        "{method} {path} does not document {status}"
                    );
                }
            }
        }
    }
    let rules = super::rules(MetricsAuth::Open);
    for (method, route, rule) in [
        (Method::GET, "/healthz", Rule::Open),
        (Method::GET, "/readyz", Rule::Open),
        (Method::GET, "/metrics", Rule::Open),
        (Method::GET, "/api/v1/devices", Rule::Needs(Role::Viewer)),
        (Method::POST, "/api/v1/jobs", Rule::Needs(Role::Scientist)),
        (
            Method::POST,
            "/api/v1/jobs/{name}/run",
            Rule::Needs(Role::Scientist),
        ),
        (
            Method::DELETE,
            "/api/v1/jobs/{name}",
            Rule::Needs(Role::Scientist),
        ),
        (
            Method::POST,
            "/api/v1/datasets/export",
            Rule::Needs(Role::Scientist),
        ),
        (
            Method::GET,
            "/api/v1/runs/{id}/artifacts/{*path}",
            Rule::Needs(Role::Viewer),
        ),
        (Method::POST, "/api/v1/tokens", Rule::Needs(Role::Admin)),
        (Method::GET, "/api/v1/audit", Rule::Needs(Role::Admin)),
        (
            Method::GET,
            "/api/v1/models/deployments",
            Rule::Needs(Role::Viewer),
        ),
        (
            Method::POST,
            "/api/v1/models/deployments",
            Rule::Needs(Role::Scientist),
        ),
        (
            Method::DELETE,
            "/api/v1/models/deployments/{name}",
            Rule::Needs(Role::Scientist),
        ),
        (
            Method::POST,
            "/api/v1/models/seldon",
            Rule::Needs(Role::Scientist),
        ),
        (Method::GET, "/api/v1/alerts", Rule::Needs(Role::Viewer)),
        (
            Method::POST,
            "/api/v1/alerts/{id}/ack",
            Rule::Needs(Role::Operator),
        ),
        (Method::GET, "/api/v1/provenance", Rule::Needs(Role::Viewer)),
        (Method::GET, "/api/v1/sinks", Rule::Needs(Role::Viewer)),
        (Method::GET, "/api/v1/store", Rule::Needs(Role::Viewer)),
        (
            Method::POST,
            "/api/v1/provenance",
            Rule::Needs(Role::Scientist),
        ),
    ] {
        assert_eq!(rules.get(&method, route), Some(rule), "{method} {route}");
    }
    let closed = super::rules(MetricsAuth::Token);
    assert_eq!(
        closed.get(&Method::GET, "/metrics"),
        Some(Rule::Needs(Role::Viewer))
    );
}
