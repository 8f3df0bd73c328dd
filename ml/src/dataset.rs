//! Datasets: telemetry windows as Parquet files in an object store, with a manifest that cites
//! every file by SHA-256.
//!
//! Layout under a dataset URI (a folder, `file:///…`, or `s3://BUCKET/PREFIX`):
//!
//! ```text
//! manifest.json            schema, row count, time range, devices, files with SHA-256
//! part-00000.parquet       one row per sample, at most ROWS_PER_FILE rows each
//! part-00001.parquet
//! ```
//!
//! Rows are flat: the sample's identity (`device_id`, `seq`, `timestamp_ms`) and one nullable
//! DOUBLE column per signal in [`METRICS`]. Readers stream file by file, check every file's
//! digest and schema, and refuse NaN or infinite values naming the file, column and row.

use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::Compression;
use parquet::column::reader::ColumnReader;
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_proto::v1::Sample;

use crate::store::{Location, StoreError};

/// Rows per Parquet file: a reader holds one file at a time, so this bounds its memory.
pub const ROWS_PER_FILE: usize = 262_144;
/// Rows per row group inside a file.
pub const ROWS_PER_GROUP: usize = 65_536;
/// The manifest's format tag.
pub const FORMAT: &str = "shoal-dataset/1";

/// The signal columns, in file order, each a nullable DOUBLE (null: the device does not have
/// that signal). How each is taken from a sample is in [`Row::from_sample`].
pub const METRICS: [&str; 18] = [
    "cpu_percent",
    "load1",
    "load5",
    "load15",
    "memory_used_bytes",
    "memory_total_bytes",
    "swap_used_bytes",
    "net_rx_bytes_per_second",
    "net_tx_bytes_per_second",
    "process_count",
    "uptime_seconds",
    "temperature_celsius",
    "cpu_frequency_mhz",
    "throttled_flags",
    "gpu_utilization_percent",
    "gpu_temperature_celsius",
    "gpu_power_watts",
    "gpu_sm_clock_mhz",
];

/// Index of a metric column in [`METRICS`].
pub fn metric_index(name: &str) -> Option<usize> {
    METRICS.iter().position(|m| *m == name)
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{uri}: no dataset here (no manifest.json): {reason}")]
    NotFound { uri: String, reason: String },
    #[error("{file}: {reason}")]
    Manifest { file: String, reason: String },
    #[error("{uri}: the dataset is empty (0 rows)")]
    Empty { uri: String },
    #[error("{file}: SHA-256 is {actual}, the manifest says {expected}")]
    Digest {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: column {column}: {reason}")]
    Schema {
        file: String,
        column: String,
        reason: String,
    },
    #[error("{file}: column {column}, row {row}: {value} is not a finite number")]
    NotFinite {
        file: String,
        column: String,
        row: u64,
        value: f64,
    },
    #[error("{file}: {source}")]
    Parquet {
        file: String,
        source: parquet::errors::ParquetError,
    },
}

/// One sample, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub device_id: String,
    pub seq: i64,
    pub timestamp_ms: i64,
    pub values: [Option<f64>; METRICS.len()],
}

impl Row {
    /// Flattens a stored sample. Several interfaces, disks or sensors become one column:
    /// network rates are summed over interfaces; `temperature_celsius` is the Raspberry Pi SoC
    /// temperature where there is one, else the hottest sensor; GPU columns are over all GPUs
    /// (mean utilisation, hottest temperature, total power, highest SM clock).
    pub fn from_sample(device_id: &str, seq: u64, s: &Sample) -> Self {
        let mut v = [None; METRICS.len()];
        let mut set = |name: &str, value: f64| {
            if let Some(i) = metric_index(name) {
                v[i] = Some(value);
            }
        };
        if let Some(cpu) = &s.cpu {
            set("cpu_percent", cpu.total_percent);
        }
        if let Some(l) = &s.load {
            set("load1", l.one);
            if let Some(v) = l.five {
                set("load5", v);
            }
            if let Some(v) = l.fifteen {
                set("load15", v);
            }
        }
        if let Some(m) = &s.memory {
            set("memory_used_bytes", m.used_bytes as f64);
            set("memory_total_bytes", m.total_bytes as f64);
            set("swap_used_bytes", m.swap_used_bytes as f64);
        }
        if !s.networks.is_empty() {
            set(
                "net_rx_bytes_per_second",
                s.networks.iter().map(|n| n.rx_bytes_per_second).sum(),
            );
            set(
                "net_tx_bytes_per_second",
                s.networks.iter().map(|n| n.tx_bytes_per_second).sum(),
            );
        }
        if let Some(v) = s.process_count {
            set("process_count", f64::from(v));
        }
        if let Some(v) = s.uptime_seconds {
            set("uptime_seconds", v as f64);
        }
        set_thermal(s, &mut set);
        set_gpus(s, &mut set);
        // Non-finite readings (a broken sensor) are left out rather than poisoning a dataset.
        for x in &mut v {
            if x.is_some_and(|x| !x.is_finite()) {
                *x = None;
            }
        }
        Self {
            device_id: device_id.to_string(),
            seq: i64::try_from(seq).unwrap_or(i64::MAX),
            timestamp_ms: s.timestamp_ms,
            values: v,
        }
    }
}

/// The Raspberry Pi's SoC temperature, clock and throttle flags; without a Pi, the hottest
/// sensor as `temperature_celsius`.
fn set_thermal(s: &Sample, set: &mut impl FnMut(&str, f64)) {
    let hottest = s
        .temperatures
        .iter()
        .map(|t| t.celsius)
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    match &s.pi {
        Some(pi) => {
            set("temperature_celsius", pi.soc_temperature_celsius);
            if pi.cpu_frequency_mhz > 0 {
                set("cpu_frequency_mhz", f64::from(pi.cpu_frequency_mhz));
            }
            if pi.throttled_known {
                set("throttled_flags", f64::from(pi.throttled_flags));
            }
        }
        None => {
            if let Some(t) = hottest {
                set("temperature_celsius", t);
            }
        }
    }
}

/// The GPU columns over all GPUs: mean utilisation, hottest temperature, total power, highest
/// SM clock (none without GPUs).
fn set_gpus(s: &Sample, set: &mut impl FnMut(&str, f64)) {
    if s.gpus.is_empty() {
        return;
    }
    let n = s.gpus.len() as f64;
    set(
        "gpu_utilization_percent",
        s.gpus.iter().map(|g| g.utilization_percent).sum::<f64>() / n,
    );
    set(
        "gpu_temperature_celsius",
        s.gpus
            .iter()
            .map(|g| g.temperature_celsius)
            .fold(f64::MIN, f64::max),
    );
    set(
        "gpu_power_watts",
        s.gpus.iter().map(|g| g.power_watts).sum(),
    );
    set(
        "gpu_sm_clock_mhz",
        f64::from(s.gpus.iter().map(|g| g.sm_clock_mhz).max().unwrap_or(0)),
    );
}

/// A column of the dataset schema.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// `string`, `int64`, `timestamp(ms, UTC)` (Parquet INT64 with logical type
    /// TIMESTAMP(MILLIS, UTC)) or `double`.
    #[serde(rename = "type")]
    pub kind: String,
    pub nullable: bool,
}

/// The manifest's name for the `timestamp_ms` column's type.
pub const TIMESTAMP_MS_UTC: &str = "timestamp(ms, UTC)";

/// The schema every file of a `shoal-dataset/1` dataset has.
pub fn schema() -> Vec<ColumnInfo> {
    let mut cols = vec![
        ColumnInfo {
            name: "device_id".into(),
            kind: "string".into(),
            nullable: false,
        },
        ColumnInfo {
            name: "seq".into(),
            kind: "int64".into(),
            nullable: false,
        },
        ColumnInfo {
            name: "timestamp_ms".into(),
            kind: TIMESTAMP_MS_UTC.into(),
            nullable: false,
        },
    ];
    cols.extend(METRICS.iter().map(|m| ColumnInfo {
        name: (*m).into(),
        kind: "double".into(),
        nullable: true,
    }));
    cols
}

fn parquet_schema() -> Arc<Type> {
    let mut text = String::from(
        "message shoal_telemetry {\n  required binary device_id (STRING);\n  required int64 seq;\n  required int64 timestamp_ms (TIMESTAMP(MILLIS,true));\n",
    );
    for m in METRICS {
        text.push_str(&format!("  optional double {m};\n"));
    }
    text.push('}');
    Arc::new(parquet::schema::parser::parse_message_type(&text).expect("schema parses"))
}

/// One file of a dataset, as the manifest cites it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the dataset URI.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub created_ms: i64,
    pub schema: Vec<ColumnInfo>,
    pub rows: u64,
    /// Earliest and latest sample timestamp (ms since the epoch); `None` when empty.
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub devices: Vec<String>,
    pub files: Vec<FileEntry>,
    /// Where the rows came from (the export's request), free-form.
    #[serde(default)]
    pub source: serde_json::Value,
}

impl Manifest {
    /// One digest for the whole dataset: SHA-256 over the files' digests in order. Training
    /// runs cite it.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(f.path.as_bytes());
            h.update(b"\0");
            h.update(f.sha256.as_bytes());
            h.update(b"\n");
        }
        hex(&h.finalize())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes rows into Parquet files under a location, then the manifest.
pub struct DatasetWriter {
    location: Location,
    rows: Vec<Row>,
    files: Vec<FileEntry>,
    total: u64,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    devices: std::collections::BTreeSet<String>,
}

impl DatasetWriter {
    pub fn new(location: Location) -> Self {
        Self {
            location,
            rows: Vec::with_capacity(ROWS_PER_GROUP),
            files: Vec::new(),
            total: 0,
            from_ms: None,
            to_ms: None,
            devices: Default::default(),
        }
    }

    /// Rows written so far (buffered included).
    pub fn rows(&self) -> u64 {
        self.total
    }

    pub async fn push(&mut self, row: Row) -> Result<(), DatasetError> {
        self.total += 1;
        self.from_ms = Some(
            self.from_ms
                .map_or(row.timestamp_ms, |m| m.min(row.timestamp_ms)),
        );
        self.to_ms = Some(
            self.to_ms
                .map_or(row.timestamp_ms, |m| m.max(row.timestamp_ms)),
        );
        if !self.devices.contains(&row.device_id) {
            self.devices.insert(row.device_id.clone());
        }
        self.rows.push(row);
        if self.rows.len() >= ROWS_PER_FILE {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), DatasetError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let path = format!("part-{:05}.parquet", self.files.len());
        let (bytes, n) =
            tokio::task::spawn_blocking(move || encode(&rows).map(|b| (b, rows.len())))
                .await
                .expect("encoder thread")
                .map_err(|source| DatasetError::Parquet {
                    file: path.clone(),
                    source,
                })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let len = bytes.len() as u64;
        self.location.put(&path, Bytes::from(bytes)).await?;
        self.files.push(FileEntry {
            path,
            rows: n as u64,
            bytes: len,
            sha256,
        });
        Ok(())
    }

    /// Writes what is buffered and then `manifest.json` (last, so a dataset with a manifest is
    /// complete).
    pub async fn finish(mut self, source: serde_json::Value) -> Result<Manifest, DatasetError> {
        self.flush().await?;
        let manifest = Manifest {
            format: FORMAT.into(),
            created_ms: chrono::Utc::now().timestamp_millis(),
            schema: schema(),
            rows: self.total,
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            devices: self.devices.into_iter().collect(),
            files: self.files,
            source,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        self.location
            .put("manifest.json", Bytes::from(json))
            .await?;
        Ok(manifest)
    }
}

/// One Parquet file of `rows`.
fn encode(rows: &[Row]) -> parquet::errors::Result<Vec<u8>> {
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("shoal {}", env!("CARGO_PKG_VERSION")))
            .build(),
    );
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, parquet_schema(), props)?;
    for group in rows.chunks(ROWS_PER_GROUP) {
        let mut rg = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut col) = rg.next_column()? {
            match (index, col.untyped()) {
                (0, ColumnWriter::ByteArrayColumnWriter(w)) => {
                    let ids: Vec<ByteArray> = group
                        .iter()
                        .map(|r| ByteArray::from(r.device_id.as_str()))
                        .collect();
                    w.write_batch(&ids, None, None)?;
                }
                (1, ColumnWriter::Int64ColumnWriter(w)) => {
                    let v: Vec<i64> = group.iter().map(|r| r.seq).collect();
                    w.write_batch(&v, None, None)?;
                }
                (2, ColumnWriter::Int64ColumnWriter(w)) => {
                    let v: Vec<i64> = group.iter().map(|r| r.timestamp_ms).collect();
                    w.write_batch(&v, None, None)?;
                }
                (i, ColumnWriter::DoubleColumnWriter(w)) => {
                    let m = i - 3;
                    let values: Vec<f64> = group.iter().filter_map(|r| r.values[m]).collect();
                    let defs: Vec<i16> = group
                        .iter()
                        .map(|r| i16::from(r.values[m].is_some()))
                        .collect();
                    w.write_batch(&values, Some(&defs), None)?;
                }
                _ => unreachable!("the writer follows the schema"),
            }
            col.close()?;
            index += 1;
        }
        rg.close()?;
    }
    writer.close()?;
    Ok(out)
}

/// A batch of rows read back, column-major: `columns[m][i]` is metric `m` of row `i`.
#[derive(Debug, Default)]
pub struct Batch {
    pub device_ids: Vec<String>,
    pub seqs: Vec<i64>,
    pub timestamps_ms: Vec<i64>,
    pub columns: Vec<Vec<Option<f64>>>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// Reads a dataset's manifest; `NotFound` when there is none.
pub async fn open(location: &Location) -> Result<Manifest, DatasetError> {
    let bytes = location
        .get("manifest.json")
        .await
        .map_err(|e| DatasetError::NotFound {
            uri: location.uri().to_string(),
            reason: e.to_string(),
        })?;
    let file = location.display("manifest.json");
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| DatasetError::Manifest {
            file: file.clone(),
            reason: e.to_string(),
        })?;
    if manifest.format != FORMAT {
        return Err(DatasetError::Manifest {
            file,
            reason: format!("format {:?}, expected {FORMAT:?}", manifest.format),
        });
    }
    if manifest.rows == 0 {
        return Err(DatasetError::Empty {
            uri: location.uri().to_string(),
        });
    }
    Ok(manifest)
}

/// Fetches one file of the dataset and checks its digest.
pub async fn fetch(location: &Location, entry: &FileEntry) -> Result<Bytes, DatasetError> {
    let bytes = location.get(&entry.path).await?;
    let actual = hex(&Sha256::digest(&bytes));
    if actual != entry.sha256 {
        return Err(DatasetError::Digest {
            file: location.display(&entry.path),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(bytes)
}

/// Decodes a fetched file into batches (one per row group), calling `f` for each. Checks the
/// schema and refuses non-finite values.
pub fn decode(file: &str, bytes: Bytes, mut f: impl FnMut(&Batch)) -> Result<u64, DatasetError> {
    let pq = |source| DatasetError::Parquet {
        file: file.to_string(),
        source,
    };
    let reader = SerializedFileReader::new(bytes).map_err(pq)?;
    check_schema(file, &reader)?;
    let columns = schema();
    let mut row_base = 0u64;
    let mut batch = Batch::default();
    for g in 0..reader.num_row_groups() {
        let rg = reader.get_row_group(g).map_err(pq)?;
        let n = usize::try_from(rg.metadata().num_rows()).unwrap_or(0);
        batch.device_ids.clear();
        batch.seqs.clear();
        batch.timestamps_ms.clear();
        batch.columns.resize(METRICS.len(), Vec::new());
        for (j, col) in columns.iter().enumerate() {
            match rg.get_column_reader(j).map_err(pq)? {
                ColumnReader::ByteArrayColumnReader(mut r) => {
                    let mut v: Vec<ByteArray> = Vec::with_capacity(n);
                    read_all(&mut r, n, None, &mut v).map_err(pq)?;
                    batch.device_ids.extend(
                        v.iter()
                            .map(|b| String::from_utf8_lossy(b.data()).into_owned()),
                    );
                }
                ColumnReader::Int64ColumnReader(mut r) => {
                    let out = if j == 1 {
                        &mut batch.seqs
                    } else {
                        &mut batch.timestamps_ms
                    };
                    read_all(&mut r, n, None, out).map_err(pq)?;
                }
                ColumnReader::DoubleColumnReader(mut r) => {
                    let m = j - 3;
                    let mut values = Vec::with_capacity(n);
                    let mut defs = Vec::with_capacity(n);
                    read_all(&mut r, n, Some(&mut defs), &mut values).map_err(pq)?;
                    let out = &mut batch.columns[m];
                    out.clear();
                    let mut it = values.into_iter();
                    for (i, d) in defs.iter().enumerate() {
                        if *d == 0 {
                            out.push(None);
                            continue;
                        }
                        let x = it.next().unwrap_or(f64::NAN);
                        if !x.is_finite() {
                            return Err(DatasetError::NotFinite {
                                file: file.to_string(),
                                column: col.name.clone(),
                                row: row_base + i as u64,
                                value: x,
                            });
                        }
                        out.push(Some(x));
                    }
                }
                _ => {
                    return Err(DatasetError::Schema {
                        file: file.to_string(),
                        column: col.name.clone(),
                        reason: "unexpected physical type".into(),
                    });
                }
            }
        }
        f(&batch);
        row_base += n as u64;
    }
    Ok(row_base)
}

fn read_all<T: parquet::data_type::DataType>(
    r: &mut parquet::column::reader::ColumnReaderImpl<T>,
    n: usize,
    mut defs: Option<&mut Vec<i16>>,
    values: &mut Vec<T::T>,
) -> parquet::errors::Result<()> {
    let mut read = 0;
    while read < n {
        let (records, _, _) = r.read_records(n - read, defs.as_deref_mut(), None, values)?;
        if records == 0 {
            break;
        }
        read += records;
    }
    Ok(())
}

/// Every column of [`schema`], by name and type, in order.
fn check_schema(file: &str, reader: &SerializedFileReader<Bytes>) -> Result<(), DatasetError> {
    let descr = reader.metadata().file_metadata().schema_descr();
    let expected = schema();
    let columns = descr.columns();
    for (i, col) in expected.iter().enumerate() {
        let Some(actual) = columns.get(i) else {
            return Err(DatasetError::Schema {
                file: file.to_string(),
                column: col.name.clone(),
                reason: "missing".into(),
            });
        };
        let physical = match col.kind.as_str() {
            "string" => parquet::basic::Type::BYTE_ARRAY,
            "int64" | TIMESTAMP_MS_UTC => parquet::basic::Type::INT64,
            _ => parquet::basic::Type::DOUBLE,
        };
        if actual.name() != col.name {
            return Err(DatasetError::Schema {
                file: file.to_string(),
                column: col.name.clone(),
                reason: format!("expected at position {i}, found {:?}", actual.name()),
            });
        }
        if actual.physical_type() != physical {
            return Err(DatasetError::Schema {
                file: file.to_string(),
                column: col.name.clone(),
                reason: format!(
                    "type {:?}, expected {} ({physical:?})",
                    actual.physical_type(),
                    col.kind
                ),
            });
        }
    }
    if columns.len() > expected.len() {
        return Err(DatasetError::Schema {
            file: file.to_string(),
            column: columns[expected.len()].name().to_string(),
            reason: "not part of the shoal-dataset/1 schema".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
