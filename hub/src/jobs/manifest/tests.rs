use super::*;

/// The book's hourly dump job (chapter 11) as its readers wrote it for their clusters: a
/// Python container, the script from a ConfigMap, MinIO keys from a Secret.
const HRDUMP: &str = r#"
apiVersion: batch/v1beta1
kind: CronJob
metadata:
  name: hrdump
  namespace: data
spec:
  schedule: "1 * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
            - name: hrdump
              image: python:3.8
              command: ["python", "/scripts/hrdump.py"]
              env:
                - name: ENDPOINT
                  value: minio-hl.data:9000
                - name: ACCESS_KEY_ID
                  valueFrom:
                    secretKeyRef:
                      name: sensor-hrdump
                      key: username
                - name: ACCESS_KEY
                  valueFrom:
                    secretKeyRef:
                      name: sensor-hrdump
                      key: password
              volumeMounts:
                - name: scripts
                  mountPath: /scripts
          volumes:
            - name: scripts
              configMap:
                name: hrdump
"#;

fn with(find: &str, replace: &str) -> String {
    assert!(HRDUMP.contains(find), "{find}");
    HRDUMP.replacen(find, replace, 1)
}

#[test]
fn the_books_hrdump_applies_unchanged() {
    let job = parse(HRDUMP).unwrap();
    assert_eq!(job.name(), "hrdump");
    assert_eq!(job.schedule.source(), "1 * * * *");
    assert_eq!(job.time_zone, chrono_tz::Tz::UTC);
    assert_eq!(job.concurrency, Concurrency::Allow);
    assert_eq!(job.runner, Runner::Local);
    assert_eq!(
        (
            job.backoff_limit,
            job.successful_history,
            job.failed_history
        ),
        (6, 3, 1),
        "Kubernetes defaults"
    );
    let c = &job.manifest.spec.job_template.spec.template.spec.containers[0];
    assert_eq!(c.command, vec!["python", "/scripts/hrdump.py"]);
    assert_eq!(c.env.len(), 3);
    assert!(
        c.other.contains_key("volumeMounts"),
        "fields Shoal does not act on are kept"
    );
}

#[test]
fn settings_are_read() {
    let text = with(
        "  schedule: \"1 * * * *\"",
        "  schedule: \"@hourly\"\n  timeZone: Europe/Berlin\n  concurrencyPolicy: Forbid\n  startingDeadlineSeconds: 300\n  suspend: true\n  successfulJobsHistoryLimit: 10\n  failedJobsHistoryLimit: 0",
    );
    let text = text.replacen(
        "  namespace: data",
        "  namespace: data\n  annotations:\n    shoal.dev/missed-starts: run-latest",
        1,
    );
    let job = parse(&text).unwrap();
    assert_eq!(job.time_zone, chrono_tz::Europe::Berlin);
    assert_eq!(job.concurrency, Concurrency::Forbid);
    assert_eq!(job.missed_starts, MissedStarts::RunLatest);
    assert_eq!((job.successful_history, job.failed_history), (10, 0));
    assert_eq!(job.manifest.spec.suspend, Some(true));
}

#[test]
fn bad_input_names_the_field() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            with("\"1 * * * *\"", "\"61 * * * *\""),
            "spec.schedule",
            "minute: 61",
        ),
        (
            with("  schedule:", "  timeZone: Mars/Olympus\n  schedule:"),
            "spec.timeZone",
            "Mars/Olympus",
        ),
        (
            with("  schedule:", "  concurrencyPolicy: Sometimes\n  schedule:"),
            "spec.concurrencyPolicy",
            "Sometimes",
        ),
        (
            with("  schedule:", "  startingDeadlineSeconds: -5\n  schedule:"),
            "spec.startingDeadlineSeconds",
            "negative",
        ),
        (
            with("  schedule:", "  failedJobsHistoryLimit: -1\n  schedule:"),
            "spec.failedJobsHistoryLimit",
            "negative",
        ),
        (
            with("      template:", "      backoffLimit: -2\n      template:"),
            "spec.jobTemplate.spec.backoffLimit",
            "negative",
        ),
        (
            with(
                "      template:",
                "      activeDeadlineSeconds: 0\n      template:",
            ),
            "spec.jobTemplate.spec.activeDeadlineSeconds",
            "positive",
        ),
        (
            with("  schedule:", "  scheduel: x\n  schedule:"),
            "spec.scheduel",
            "unknown field `scheduel`",
        ),
        (
            with("      template:", "      retries: 3\n      template:"),
            "spec.jobTemplate.spec.retries",
            "unknown field",
        ),
        (
            with(
                "          volumes:",
                "          volumez: []\n          volumes:",
            ),
            "spec.jobTemplate.spec.template.spec.volumez",
            "unknown field",
        ),
        (
            with(
                "              image: python:3.8",
                "              image: python:3.8\n              cmd: [x]",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].cmd",
            "unknown field",
        ),
        (
            with("restartPolicy: OnFailure", "restartPolicy: Always"),
            "spec.jobTemplate.spec.template.spec.restartPolicy",
            "OnFailure or Never",
        ),
        (
            with("  name: hrdump", "  name: HR_Dump"),
            "metadata.name",
            "lowercase",
        ),
        (with("kind: CronJob", "kind: Job"), "kind", "not CronJob"),
        (
            with("apiVersion: batch/v1beta1", "apiVersion: apps/v1"),
            "apiVersion",
            "batch/v1",
        ),
        (
            with(
                "  namespace: data",
                "  namespace: data\n  annotations:\n    shoal.dev/runnr: local",
            ),
            "metadata.annotations[shoal.dev/runnr]",
            "unknown Shoal annotation",
        ),
        (
            with(
                "  namespace: data",
                "  namespace: data\n  annotations:\n    shoal.dev/runner: lambda",
            ),
            "metadata.annotations[shoal.dev/runner]",
            "local or kubernetes",
        ),
        (
            with(
                "              command: [\"python\", \"/scripts/hrdump.py\"]\n",
                "",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].command",
            "local runner",
        ),
    ];
    for (text, field, reason) in cases {
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.reason.contains(reason), "{field}: {}", err.reason);
    }
}

#[test]
fn the_kubernetes_runner_needs_no_command() {
    let text = with(
        "              command: [\"python\", \"/scripts/hrdump.py\"]\n",
        "",
    )
    .replacen(
        "  namespace: data",
        "  namespace: data\n  annotations:\n    shoal.dev/runner: kubernetes",
        1,
    );
    assert_eq!(parse(&text).unwrap().runner, Runner::Kubernetes);
}

#[test]
fn not_yaml_at_all() {
    let err = parse("{{{").unwrap_err();
    assert!(!err.reason.is_empty());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any text, and the book's manifest with any line replaced by anything: `parse`
        /// answers a job or an error that names a field; it never panics.
        #[test]
        fn any_manifest_text_parses_or_names_a_field(
            text in prop_oneof![
                ".{0,300}",
                (any::<prop::sample::Index>(), ".{0,60}").prop_map(|(i, line): (prop::sample::Index, String)| {
                    let mut lines: Vec<&str> = HRDUMP.lines().collect();
                    let at = i.index(lines.len());
                    lines[at] = &line;
                    lines.join("\n")
                }),
            ],
        ) {
            if let Err(e) = parse(&text) {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
