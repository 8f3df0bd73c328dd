//! The job definition **is** a Kubernetes `batch/v1` CronJob manifest (`batch/v1beta1`, the
//! book's era, reads the same). Fields Shoal acts on are typed; every other field Kubernetes
//! defines for a CronJob, Job or Pod is accepted and kept (a manifest applies unchanged), and a
//! field Kubernetes does not define is an error naming its path. Shoal's own settings are
//! annotations under `shoal.dev/`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cron::Schedule;
use super::policy::{Concurrency, MissedStarts};

/// Why a manifest is refused: the field (as a path) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ManifestError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CronJob {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: CronJobSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CronJobSpec {
    pub schedule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_deadline_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successful_jobs_history_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_jobs_history_limit: Option<i64>,
    pub job_template: JobTemplate,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    pub spec: JobSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<i64>,
    pub template: PodTemplate,
    /// Other Job fields Kubernetes defines (kept, not acted on locally).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<Value>,
}

/// Job fields of `batch/v1` besides those typed above.
const JOB_FIELDS: &[&str] = &[
    "completions",
    "parallelism",
    "completionMode",
    "manualSelector",
    "selector",
    "suspend",
    "ttlSecondsAfterFinished",
    "podFailurePolicy",
    "podReplacementPolicy",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
    "successPolicy",
    "managedBy",
];

/// Pod spec fields of `v1` besides `containers` and `restartPolicy`.
const POD_FIELDS: &[&str] = &[
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "ephemeralContainers",
    "hostAliases",
    "hostIPC",
    "hostNetwork",
    "hostPID",
    "hostUsers",
    "hostname",
    "imagePullSecrets",
    "initContainers",
    "nodeName",
    "nodeSelector",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "readinessGates",
    "resourceClaims",
    "resources",
    "runtimeClassName",
    "schedulerName",
    "schedulingGates",
    "securityContext",
    "serviceAccount",
    "serviceAccountName",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "subdomain",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
];

/// Container fields of `v1` besides those typed above.
const CONTAINER_FIELDS: &[&str] = &[
    "envFrom",
    "imagePullPolicy",
    "lifecycle",
    "livenessProbe",
    "ports",
    "readinessProbe",
    "resizePolicy",
    "resources",
    "restartPolicy",
    "securityContext",
    "startupProbe",
    "stdin",
    "stdinOnce",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "tty",
    "volumeDevices",
    "volumeMounts",
];

/// Shoal's annotations.
pub const ANNOTATION_RUNNER: &str = "shoal.dev/runner";
pub const ANNOTATION_MISSED_STARTS: &str = "shoal.dev/missed-starts";

/// Where a job's runs execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// The first container's command as a local process group (the image is not used).
    Local,
    /// A `batch/v1` Job through the Kubernetes API.
    Kubernetes,
}

/// A checked job: the manifest as given plus what Shoal reads from it.
#[derive(Debug, Clone)]
pub struct JobDefinition {
    pub manifest: CronJob,
    pub schedule: Schedule,
    pub time_zone: chrono_tz::Tz,
    pub concurrency: Concurrency,
    pub missed_starts: MissedStarts,
    pub runner: Runner,
    pub backoff_limit: u32,
    pub successful_history: u32,
    pub failed_history: u32,
}

impl JobDefinition {
    pub fn name(&self) -> &str {
        &self.manifest.metadata.name
    }
}

/// Reads and checks a manifest (YAML or JSON); the first problem is returned, naming its field.
pub fn parse(text: &str) -> Result<JobDefinition, ManifestError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let manifest: CronJob = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        // serde_yaml_ng appends " at line L column C"; keep it, it helps.
        bad(
            if path == "." {
                "manifest".to_string()
            } else {
                path
            },
            reason,
        )
    })?;
    check(manifest)
}

/// Checks a manifest already read (e.g. from the store).
pub fn check(m: CronJob) -> Result<JobDefinition, ManifestError> {
    check_type(&m)?;
    check_name(&m.metadata.name)?;
    let spec = &m.spec;
    let schedule = Schedule::parse(&spec.schedule).map_err(|e| bad("spec.schedule", e.reason))?;
    let time_zone = parse_time_zone(spec.time_zone.as_deref())?;
    let concurrency = parse_concurrency(spec.concurrency_policy.as_deref())?;
    non_negative(
        "spec.startingDeadlineSeconds",
        spec.starting_deadline_seconds,
        0,
    )?;
    let successful_history = non_negative(
        "spec.successfulJobsHistoryLimit",
        spec.successful_jobs_history_limit,
        3,
    )?;
    let failed_history = non_negative(
        "spec.failedJobsHistoryLimit",
        spec.failed_jobs_history_limit,
        1,
    )?;
    let job = &spec.job_template.spec;
    let backoff_limit = check_job(job)?;
    let (runner, missed_starts) = read_annotations(&m.metadata.annotations)?;
    if runner == Runner::Local && job.template.spec.containers[0].command.is_empty() {
        return Err(bad(
            "spec.jobTemplate.spec.template.spec.containers[0].command",
            "the local runner runs this command (an image's entrypoint is unknown outside Kubernetes); set it, or annotate shoal.dev/runner: kubernetes",
        ));
    }
    Ok(JobDefinition {
        schedule,
        time_zone,
        concurrency,
        missed_starts,
        runner,
        backoff_limit,
        successful_history,
        failed_history,
        manifest: m,
    })
}

/// The manifest must be a `batch/v1` (or `batch/v1beta1`) CronJob.
fn check_type(m: &CronJob) -> Result<(), ManifestError> {
    if !matches!(m.api_version.as_str(), "batch/v1" | "batch/v1beta1") {
        return Err(bad(
            "apiVersion",
            format!("{:?} is not batch/v1 (or batch/v1beta1)", m.api_version),
        ));
    }
    if m.kind != "CronJob" {
        return Err(bad("kind", format!("{:?} is not CronJob", m.kind)));
    }
    Ok(())
}

/// `spec.timeZone` as an IANA zone; UTC when not set.
fn parse_time_zone(tz: Option<&str>) -> Result<chrono_tz::Tz, ManifestError> {
    match tz {
        None => Ok(chrono_tz::Tz::UTC),
        Some(tz) => tz.parse().map_err(|_| {
            bad(
                "spec.timeZone",
                format!("{tz:?} is not a time zone of the IANA database (e.g. Europe/Berlin)"),
            )
        }),
    }
}

/// `spec.concurrencyPolicy`; Allow when not set.
fn parse_concurrency(policy: Option<&str>) -> Result<Concurrency, ManifestError> {
    match policy {
        None | Some("Allow") => Ok(Concurrency::Allow),
        Some("Forbid") => Ok(Concurrency::Forbid),
        Some("Replace") => Ok(Concurrency::Replace),
        Some(other) => Err(bad(
            "spec.concurrencyPolicy",
            format!("{other:?} is not Allow, Forbid or Replace"),
        )),
    }
}

/// A count field that must fit a `u32`; `default` when not set.
fn non_negative(field: &str, v: Option<i64>, default: u32) -> Result<u32, ManifestError> {
    match v {
        None => Ok(default),
        Some(n) if n < 0 => Err(bad(field, format!("{n} is negative"))),
        Some(n) => u32::try_from(n).map_err(|_| bad(field, format!("{n} is too large"))),
    }
}

/// Checks `spec.jobTemplate.spec` and its pod; returns the backoff limit (default 6).
fn check_job(job: &JobSpec) -> Result<u32, ManifestError> {
    let backoff_limit = non_negative("spec.jobTemplate.spec.backoffLimit", job.backoff_limit, 6)?;
    if let Some(d) = job.active_deadline_seconds
        && d <= 0
    {
        return Err(bad(
            "spec.jobTemplate.spec.activeDeadlineSeconds",
            format!("{d} must be positive"),
        ));
    }
    known_fields("spec.jobTemplate.spec", &job.other, JOB_FIELDS)?;
    check_pod(&job.template.spec)?;
    Ok(backoff_limit)
}

/// Checks `spec.jobTemplate.spec.template.spec`: its fields, restart policy and containers.
fn check_pod(pod: &PodSpec) -> Result<(), ManifestError> {
    known_fields(
        "spec.jobTemplate.spec.template.spec",
        &pod.other,
        POD_FIELDS,
    )?;
    if let Some(rp) = &pod.restart_policy
        && !matches!(rp.as_str(), "OnFailure" | "Never")
    {
        return Err(bad(
            "spec.jobTemplate.spec.template.spec.restartPolicy",
            format!("{rp:?}: a Job's pods restart OnFailure or Never"),
        ));
    }
    if pod.containers.is_empty() {
        return Err(bad(
            "spec.jobTemplate.spec.template.spec.containers",
            "at least one container is needed",
        ));
    }
    for (i, c) in pod.containers.iter().enumerate() {
        known_fields(
            &format!("spec.jobTemplate.spec.template.spec.containers[{i}]"),
            &c.other,
            CONTAINER_FIELDS,
        )?;
    }
    Ok(())
}

/// Shoal's `shoal.dev/` annotations (other annotations are left alone).
fn read_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<(Runner, MissedStarts), ManifestError> {
    let mut runner = Runner::Local;
    let mut missed_starts = MissedStarts::Refuse;
    for (key, value) in annotations {
        let field = format!("metadata.annotations[{key}]");
        match key.as_str() {
            ANNOTATION_RUNNER => {
                runner = match value.as_str() {
                    "local" => Runner::Local,
                    "kubernetes" => Runner::Kubernetes,
                    v => return Err(bad(field, format!("{v:?} is not local or kubernetes"))),
                }
            }
            ANNOTATION_MISSED_STARTS => {
                missed_starts = match value.as_str() {
                    "refuse" => MissedStarts::Refuse,
                    "run-latest" => MissedStarts::RunLatest,
                    v => return Err(bad(field, format!("{v:?} is not refuse or run-latest"))),
                }
            }
            k if k.starts_with("shoal.dev/") => {
                return Err(bad(
                    field,
                    format!(
                        "unknown Shoal annotation (known: {ANNOTATION_RUNNER}, {ANNOTATION_MISSED_STARTS})"
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok((runner, missed_starts))
}

fn known_fields(
    at: &str,
    other: &BTreeMap<String, Value>,
    known: &[&str],
) -> Result<(), ManifestError> {
    match other.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(
            format!("{at}.{k}"),
            "unknown field (not part of the Kubernetes API)",
        )),
        None => Ok(()),
    }
}

/// CronJob names: a DNS label of at most 52 characters (Kubernetes appends 11 for its Jobs).
fn check_name(name: &str) -> Result<(), ManifestError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 52
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(bad(
            "metadata.name",
            format!(
                "{name:?} must be 1-52 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
