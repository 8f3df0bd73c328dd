//! Built-in jobs (`shoal jobs template NAME`): CronJob manifests for the telemetry-to-model
//! loop, ready for `shoal jobs apply -f -`. They run on the hub's machine with the `shoal` and
//! `shoal-ml` binaries on its PATH, and use what the hub gives every run: SHOAL_HUB_URL,
//! SHOAL_RUN_ID, SHOAL_DATASET_URI (`shoal serve --dataset-uri`), SHOAL_ARTIFACTS_DIR and
//! MLFLOW_TRACKING_URI (`--mlflow-tracking-uri`).

/// Name, what it does, manifest.
pub const TEMPLATES: [(&str, &str, &str); 2] = [
    (
        "dataset-export",
        "every hour, the last hour of telemetry to SHOAL_DATASET_URI/hourly/RUN as Parquet",
        DATASET_EXPORT,
    ),
    (
        "train-anomaly",
        "every night, export the last 24 hours and train the anomaly detector on them (logged to MLflow when the hub has a tracking URI)",
        TRAIN_ANOMALY,
    ),
];

const DATASET_EXPORT: &str = r#"apiVersion: batch/v1
kind: CronJob
metadata:
  name: dataset-export
spec:
  schedule: "@hourly"
  concurrencyPolicy: Forbid
  startingDeadlineSeconds: 600
  successfulJobsHistoryLimit: 24
  failedJobsHistoryLimit: 3
  jobTemplate:
    spec:
      backoffLimit: 2
      activeDeadlineSeconds: 3000
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: export
              image: ghcr.io/shoal-fleet/shoal:0.1.0
              command: ["sh", "-c"]
              args:
                - shoal datasets export --since 1h --to "${SHOAL_DATASET_URI:?start the hub with --dataset-uri}/hourly/$SHOAL_RUN_ID"
"#;

const TRAIN_ANOMALY: &str = r#"apiVersion: batch/v1
kind: CronJob
metadata:
  name: train-anomaly
spec:
  schedule: "30 2 * * *"
  concurrencyPolicy: Forbid
  startingDeadlineSeconds: 3600
  jobTemplate:
    spec:
      backoffLimit: 3
      activeDeadlineSeconds: 7200
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: train
              image: ghcr.io/shoal-fleet/shoal:0.1.0
              command: ["sh", "-c"]
              args:
                - >-
                  set -e;
                  data="${SHOAL_DATASET_URI:?start the hub with --dataset-uri}/train/$SHOAL_RUN_ID";
                  shoal datasets export --since 24h --to "$data";
                  shoal-ml train --quiet --dataset "$data";
                  if [ -n "${SHOAL_SIGNING_KEY_FILE:-}" ]; then shoal models provenance --push "$SHOAL_ARTIFACTS_DIR/provenance.dsse.json"; fi
"#;

/// The manifest of template `name`.
pub fn get(name: &str) -> Option<&'static str> {
    TEMPLATES.iter().find(|t| t.0 == name).map(|t| t.2)
}

/// What `--auto-deploy` adds to a training template: the model it just trained is deployed
/// to the hub (the registered version when MLflow has it), and the hub scores with it.
const DEPLOY: &str = r#";
                  shoal models deploy shoal-anomaly --source "$SHOAL_ARTIFACTS_DIR""#;

/// The manifest of template `name`, with `auto_deploy` the trained model deployed at the end
/// of each run; `Err` when the template trains nothing.
pub fn with_deploy(name: &str, auto_deploy: bool) -> Option<Result<String, String>> {
    let yaml = get(name)?;
    if !auto_deploy {
        return Some(Ok(yaml.to_string()));
    }
    if name != "train-anomaly" {
        return Some(Err(format!(
            "--auto-deploy is for templates that train a model (train-anomaly), not {name}"
        )));
    }
    Some(Ok(format!("{}{DEPLOY}\n", yaml.trim_end())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_is_a_valid_job() {
        for (name, _, yaml) in TEMPLATES {
            let def = super::super::manifest::parse(yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(def.name(), name);
        }
        let deploying = with_deploy("train-anomaly", true).unwrap().unwrap();
        let def = super::super::manifest::parse(&deploying).unwrap();
        assert_eq!(def.name(), "train-anomaly");
        assert!(deploying.contains("shoal models deploy shoal-anomaly"));
        assert!(with_deploy("dataset-export", true).unwrap().is_err());
    }
}
