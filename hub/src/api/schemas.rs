//! OpenAPI schemas for the types the API answers with that live outside `api/` (the registry's
//! device record, the job store's run record, the telemetry contract's `Sample`, the dataset
//! manifest). They are mirrors used only for the document (`#[schema(value_type = …)]` on the
//! real fields), never built; the tests at the bottom serialise the real types and fail when a
//! mirror misses a property the real one carries, or requires one it no longer does.
//!
//! A mirror without `additionalProperties` lists every property the hub sends today; a reader
//! should still ignore ones it does not know, since a later hub may add some. Free-form parts
//! (labels, Kubernetes manifests, the export's `source`) say so with `additionalProperties`.

// Mirrors are read by the OpenAPI derive only.
#![allow(dead_code)]

use std::collections::BTreeMap;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

/// A device's status from the age of its last heartbeat (hello or batch): `online` until the
/// stale threshold, then `stale`, then `offline`.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum DeviceStatus {
    Online,
    Stale,
    Offline,
}

/// What a device said about itself in its last hello, and when the hub saw it (the registry's
/// record). Hub versions may add properties: ignore unknown ones.
#[derive(ToSchema)]
pub struct DeviceRecord {
    /// Stable across restarts: `[A-Za-z0-9._:-]{1,128}`.
    device_id: String,
    hostname: String,
    /// e.g. `x86_64`, `aarch64`.
    arch: String,
    /// e.g. `Debian GNU/Linux 12`.
    os: String,
    kernel: String,
    /// e.g. `Raspberry Pi 4 Model B Rev 1.4`.
    hardware_model: String,
    agent_version: String,
    /// NVIDIA driver version (empty without an NVIDIA GPU).
    gpu_driver_version: String,
    /// CUDA version (empty without an NVIDIA GPU).
    cuda_version: String,
    /// The labels the agent was started with.
    labels: BTreeMap<String, String>,
    /// First hello, epoch milliseconds (hub clock).
    first_seen_ms: i64,
    /// Last hello or batch, epoch milliseconds (hub clock).
    last_seen_ms: i64,
}

/// One sampling of a device (the telemetry contract's `Sample`, `shoal.v1`). Every property is
/// present; a part the device did not read is `null` (messages, optional numbers) or `[]`
/// (lists). Ignore unknown properties: the contract may grow.
#[derive(ToSchema)]
pub struct Sample {
    /// Per device, starts at 1 and never repeats.
    seq: u64,
    /// Epoch milliseconds, device clock.
    timestamp_ms: i64,
    #[schema(required)]
    cpu: Option<Cpu>,
    #[schema(required)]
    load: Option<LoadAverage>,
    #[schema(required)]
    memory: Option<Memory>,
    disks: Vec<Disk>,
    networks: Vec<NetInterface>,
    #[schema(required)]
    uptime_seconds: Option<u64>,
    temperatures: Vec<Temperature>,
    #[schema(required)]
    process_count: Option<u32>,
    /// From the GPU collectors (NVML, Jetson sysfs).
    gpus: Vec<Gpu>,
    /// From the Raspberry Pi collector.
    #[schema(required)]
    pi: Option<PiBoard>,
}

#[derive(ToSchema)]
pub struct Cpu {
    total_percent: f64,
    core_percent: Vec<f64>,
}

#[derive(ToSchema)]
pub struct LoadAverage {
    one: f64,
    /// `null` when only the 1-minute figure is known.
    #[schema(required)]
    five: Option<f64>,
    #[schema(required)]
    fifteen: Option<f64>,
}

#[derive(ToSchema)]
pub struct Memory {
    total_bytes: u64,
    used_bytes: u64,
    available_bytes: u64,
    swap_total_bytes: u64,
    swap_used_bytes: u64,
}

#[derive(ToSchema)]
pub struct Disk {
    mount_point: String,
    device: String,
    filesystem: String,
    total_bytes: u64,
    used_bytes: u64,
}

#[derive(ToSchema)]
pub struct NetInterface {
    name: String,
    /// Counter since boot.
    rx_bytes: u64,
    /// Counter since boot.
    tx_bytes: u64,
    rx_bytes_per_second: f64,
    tx_bytes_per_second: f64,
}

#[derive(ToSchema)]
pub struct Temperature {
    sensor: String,
    celsius: f64,
}

#[derive(ToSchema)]
pub struct Gpu {
    index: u32,
    name: String,
    uuid: String,
    utilization_percent: f64,
    memory_utilization_percent: f64,
    memory_used_bytes: u64,
    memory_total_bytes: u64,
    temperature_celsius: f64,
    power_watts: f64,
    power_limit_watts: f64,
    sm_clock_mhz: u32,
    memory_clock_mhz: u32,
    fan_percent: f64,
    throttle_reasons: u64,
    ecc_errors_corrected: u64,
    ecc_errors_uncorrected: u64,
    process_count: u32,
    /// Where the figures come from: `nvml` or `jetson-sysfs`.
    source: String,
    /// MIG instances of this GPU, when MIG is enabled.
    #[schema(no_recursion)]
    mig_devices: Vec<Gpu>,
}

/// Raspberry Pi specifics.
#[derive(ToSchema)]
pub struct PiBoard {
    soc_temperature_celsius: f64,
    /// The firmware's get_throttled bits (0 under-voltage, 1 ARM frequency capped, 2 throttled,
    /// 3 soft temperature limit; 16..19 the same, since boot).
    throttled_flags: u32,
    cpu_frequency_mhz: u32,
    /// Whether the kernel exposes get_throttled (false: `throttled_flags` means nothing).
    throttled_known: bool,
    /// eMMC wear per JEDEC (1 = 0-10 % used … 11 = exceeded); 0 when unknown.
    emmc_life_time_a: u32,
    emmc_life_time_b: u32,
    /// eMMC pre-EOL: 1 normal, 2 warning, 3 urgent; 0 when unknown.
    emmc_pre_eol: u32,
}

/// One downsampled point: the summary of the samples in `[t, t + step)`.
#[derive(ToSchema)]
pub struct Bucket {
    /// Start of the bucket, epoch milliseconds.
    t: i64,
    count: u64,
    min: f64,
    max: f64,
    avg: f64,
    /// The value of the bucket's latest sample.
    last: f64,
}

/// What became of a run.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    DeadlineExceeded,
    /// Stopped by `concurrencyPolicy: Replace` or a delete.
    Cancelled,
    /// Not started: Forbid with a run active, or its starting deadline passed.
    Skipped,
    /// The hub stopped while it ran; its outcome is unknown.
    Interrupted,
    StartFailed,
}

/// One run of a job (the job store's record).
#[derive(ToSchema)]
pub struct RunRecord {
    id: String,
    job: String,
    /// The schedule time it is for (epoch ms); manual runs carry the trigger time.
    scheduled_ms: i64,
    manual: bool,
    #[schema(required)]
    started_ms: Option<i64>,
    #[schema(required)]
    finished_ms: Option<i64>,
    status: RunStatus,
    /// Why it ended as it did; absent when there is nothing to say.
    #[schema(nullable = false)]
    reason: Option<String>,
    /// Exit code of each attempt (`null`: killed).
    attempts: Vec<Option<i32>>,
}

/// A Kubernetes object (`apiVersion`, `kind`, `metadata`, `spec`): the CronJob manifest as
/// applied, or one rendered for `kubectl apply`.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct KubernetesObject {
    /// `batch/v1`.
    api_version: String,
    /// `CronJob` or `Job`.
    kind: String,
    /// Kubernetes object metadata (free-form here).
    #[schema(value_type = Object)]
    metadata: (),
    /// The object's spec (free-form here).
    #[schema(value_type = Object)]
    spec: (),
}

/// A column of the dataset schema.
#[derive(ToSchema)]
pub struct DatasetColumn {
    name: String,
    /// `string`, `int64` or `double`.
    #[schema(rename = "type")]
    kind: String,
    nullable: bool,
}

/// One file of a dataset.
#[derive(ToSchema)]
pub struct DatasetFile {
    /// Relative to the dataset URI.
    path: String,
    rows: u64,
    bytes: u64,
    sha256: String,
}

/// A dataset's `manifest.json` (format `shoal-dataset/1`).
#[derive(ToSchema)]
pub struct DatasetManifest {
    format: String,
    created_ms: i64,
    schema: Vec<DatasetColumn>,
    rows: u64,
    /// Earliest sample timestamp (epoch ms); `null` when empty.
    #[schema(required)]
    from_ms: Option<i64>,
    /// Latest sample timestamp (epoch ms); `null` when empty.
    #[schema(required)]
    to_ms: Option<i64>,
    devices: Vec<String>,
    files: Vec<DatasetFile>,
    /// Where the rows came from (the export's request), free-form.
    #[schema(value_type = Object)]
    source: (),
}

/// Any bytes (for `application/octet-stream` answers).
pub struct Binary;

impl PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/octet-stream")
            .into()
    }
}

impl ToSchema for Binary {}
