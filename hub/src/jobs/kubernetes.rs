//! Kubernetes objects for a job: the `batch/v1` CronJob itself (`shoal jobs export`) and the
//! `batch/v1` Job of one run, as the Kubernetes runner submits it. Shoal's run variables are
//! added to every container, so a run behaves the same on the hub and in a cluster.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::manifest::JobDefinition;

/// The job as a `batch/v1` CronJob (a `batch/v1beta1` manifest comes out as `batch/v1`).
pub fn cronjob(def: &JobDefinition) -> Value {
    let mut v = serde_json::to_value(&def.manifest).expect("manifest serialises");
    v["apiVersion"] = json!("batch/v1");
    v
}

/// The `batch/v1` Job for run `run_id` of `def`, scheduled at `scheduled`, with Shoal's run
/// variables `env` added to every container.
pub fn job(
    def: &JobDefinition,
    run_id: &str,
    scheduled: DateTime<Utc>,
    env: &[(String, String)],
) -> Value {
    let m = &def.manifest;
    let run_env = env;
    let mut spec = serde_json::to_value(&m.spec.job_template.spec).expect("job spec serialises");
    if let Some(containers) = spec
        .pointer_mut("/template/spec/containers")
        .and_then(Value::as_array_mut)
    {
        for c in containers {
            let env = c
                .as_object_mut()
                .expect("container object")
                .entry("env")
                .or_insert_with(|| json!([]));
            if let Some(list) = env.as_array_mut() {
                for (name, value) in run_env {
                    list.push(json!({ "name": name, "value": value }));
                }
            }
        }
    }
    let mut metadata = json!({
        "name": run_id,
        "labels": { "shoal.dev/job": def.name(), "shoal.dev/run": run_id },
        "annotations": {
            "batch.kubernetes.io/cronjob-scheduled-timestamp": scheduled.to_rfc3339_opts(SecondsFormat::Secs, true),
        },
    });
    if let Some(ns) = &m.metadata.namespace {
        metadata["namespace"] = json!(ns);
    }
    json!({ "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::manifest;

    const BOOK: &str = "apiVersion: batch/v1beta1\nkind: CronJob\nmetadata:\n  name: hrdump\n  namespace: data\nspec:\n  schedule: \"1 * * * *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: OnFailure\n          containers:\n            - name: hrdump\n              image: python:3.8\n              command: [\"python\", \"/scripts/hrdump.py\"]\n";

    #[test]
    fn exports_as_batch_v1() {
        let def = manifest::parse(BOOK).unwrap();
        let v = cronjob(&def);
        assert_eq!(v["apiVersion"], "batch/v1");
        assert_eq!(v["spec"]["schedule"], "1 * * * *");
        // What comes out goes back in.
        let again = manifest::parse(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(again.manifest.spec, def.manifest.spec);
    }

    #[test]
    fn a_run_becomes_a_job_with_shoal_variables() {
        let def = manifest::parse(BOOK).unwrap();
        let at = DateTime::parse_from_rfc3339("2026-11-23T10:01:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let env = [("SHOAL_RUN_ID".to_string(), "hrdump-29401921".to_string())];
        let v = job(&def, "hrdump-29401921", at, &env);
        assert_eq!(v["kind"], "Job");
        assert_eq!(v["metadata"]["namespace"], "data");
        assert_eq!(
            v["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"],
            "2026-11-23T10:01:00Z"
        );
        let env = v["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        assert!(
            env.iter()
                .any(|e| e["name"] == "SHOAL_RUN_ID" && e["value"] == "hrdump-29401921")
        );
        assert_eq!(v["spec"]["template"]["spec"]["restartPolicy"], "OnFailure");
    }
}
