use super::*;

fn row(device: &str, seq: i64, temp: Option<f64>) -> Row {
    let mut values = [None; METRICS.len()];
    values[metric_index("cpu_percent").unwrap()] = Some(seq as f64 % 100.0);
    values[metric_index("temperature_celsius").unwrap()] = temp;
    Row {
        device_id: device.into(),
        seq,
        timestamp_ms: 1_700_000_000_000 + seq * 1000,
        values,
    }
}

async fn write(dir: &std::path::Path, rows: impl IntoIterator<Item = Row>) -> Manifest {
    let mut w = DatasetWriter::new(Location::parse(dir.to_str().unwrap()).unwrap());
    for r in rows {
        w.push(r).await.unwrap();
    }
    w.finish(serde_json::json!({ "test": true })).await.unwrap()
}

async fn read_back(dir: &std::path::Path) -> Result<Vec<Batch>, DatasetError> {
    let loc = Location::parse(dir.to_str().unwrap()).unwrap();
    let manifest = open(&loc).await?;
    let mut out = Vec::new();
    for f in &manifest.files {
        let bytes = fetch(&loc, f).await?;
        decode(&loc.display(&f.path), bytes, |b| {
            out.push(Batch {
                device_ids: b.device_ids.clone(),
                seqs: b.seqs.clone(),
                timestamps_ms: b.timestamps_ms.clone(),
                columns: b.columns.clone(),
            })
        })?;
    }
    Ok(out)
}

#[tokio::test]
async fn rows_round_trip_through_parquet_with_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let n = ROWS_PER_FILE as i64 + 10;
    let manifest = write(
        dir.path(),
        (0..n).map(|i| {
            row(
                if i % 2 == 0 { "pi-a" } else { "pi-b" },
                i,
                (i % 3 != 0).then_some(40.0),
            )
        }),
    )
    .await;
    assert_eq!(manifest.rows, n as u64);
    assert_eq!(manifest.files.len(), 2, "split at ROWS_PER_FILE");
    assert_eq!(manifest.devices, vec!["pi-a", "pi-b"]);
    assert_eq!(manifest.from_ms, Some(1_700_000_000_000));
    assert_eq!(manifest.files[0].sha256.len(), 64);
    let batches = read_back(dir.path()).await.unwrap();
    let seqs: Vec<i64> = batches.iter().flat_map(|b| b.seqs.clone()).collect();
    assert_eq!(seqs, (0..n).collect::<Vec<_>>());
    let temps: Vec<Option<f64>> = batches
        .iter()
        .flat_map(|b| b.columns[metric_index("temperature_celsius").unwrap()].clone())
        .collect();
    assert_eq!(temps[0], None);
    assert_eq!(temps[1], Some(40.0));
}

#[tokio::test]
async fn a_missing_dataset_names_its_uri() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let e = read_back(&missing).await.err().unwrap();
    assert!(matches!(e, DatasetError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("nothing-here"), "{e}");
}

#[tokio::test]
async fn an_empty_dataset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), []).await;
    let e = read_back(dir.path()).await.err().unwrap();
    assert!(matches!(e, DatasetError::Empty { .. }), "{e}");
}

#[tokio::test]
async fn a_changed_file_fails_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), (0..10).map(|i| row("d", i, Some(1.0)))).await;
    let part = dir.path().join("part-00000.parquet");
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();
    let e = read_back(dir.path()).await.err().unwrap();
    assert!(matches!(e, DatasetError::Digest { .. }), "{e}");
    assert!(e.to_string().contains("part-00000.parquet"), "{e}");
}

/// A file written by another tool: right name, wrong column type, or a NaN.
fn foreign_file(schema_text: &str, nan: bool) -> Vec<u8> {
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema_text).unwrap());
    let mut out = Vec::new();
    let mut w =
        SerializedFileWriter::new(&mut out, schema, Arc::new(WriterProperties::default())).unwrap();
    let mut rg = w.next_row_group().unwrap();
    while let Some(mut col) = rg.next_column().unwrap() {
        match col.untyped() {
            ColumnWriter::ByteArrayColumnWriter(c) => {
                c.write_batch(&[ByteArray::from("d")], None, None).unwrap();
            }
            ColumnWriter::Int64ColumnWriter(c) => {
                c.write_batch(&[1], None, None).unwrap();
            }
            ColumnWriter::Int32ColumnWriter(c) => {
                c.write_batch(&[1], Some(&[1]), None).unwrap();
            }
            ColumnWriter::DoubleColumnWriter(c) => {
                let v = if nan { f64::NAN } else { 1.0 };
                c.write_batch(&[v], Some(&[1]), None).unwrap();
            }
            _ => unreachable!(),
        }
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
    out
}

async fn with_replaced_part(bytes: Vec<u8>) -> DatasetError {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), (0..3).map(|i| row("d", i, Some(1.0)))).await;
    let manifest_path = dir.path().join("manifest.json");
    let mut manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest.files[0].sha256 = hex(&Sha256::digest(&bytes));
    std::fs::write(dir.path().join("part-00000.parquet"), bytes).unwrap();
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    read_back(dir.path()).await.err().unwrap()
}

fn schema_text(cpu_type: &str) -> String {
    let mut t = String::from(
        "message m {\n required binary device_id (STRING);\n required int64 seq;\n required int64 timestamp_ms;\n",
    );
    for m in METRICS {
        let ty = if m == "cpu_percent" {
            cpu_type
        } else {
            "double"
        };
        t.push_str(&format!(" optional {ty} {m};\n"));
    }
    t.push('}');
    t
}

#[tokio::test]
async fn a_schema_mismatch_names_the_file_and_column() {
    let e = with_replaced_part(foreign_file(&schema_text("int32"), false)).await;
    assert!(matches!(e, DatasetError::Schema { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("part-00000.parquet") && text.contains("cpu_percent"),
        "{text}"
    );
}

#[tokio::test]
async fn nan_values_name_the_file_column_and_row() {
    let e = with_replaced_part(foreign_file(&schema_text("double"), true)).await;
    assert!(matches!(e, DatasetError::NotFinite { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("part-00000.parquet")
            && text.contains("cpu_percent")
            && text.contains("row 0"),
        "{text}"
    );
}

#[test]
fn samples_flatten_into_rows() {
    use shoal_proto::v1::{Cpu, Gpu, LoadAverage as Load, PiBoard, Temperature};
    let s = Sample {
        timestamp_ms: 5,
        cpu: Some(Cpu {
            total_percent: 12.5,
            ..Default::default()
        }),
        load: Some(Load {
            one: 1.0,
            five: Some(0.5),
            fifteen: Some(0.25),
        }),
        temperatures: vec![
            Temperature {
                sensor: "a".into(),
                celsius: 50.0,
            },
            Temperature {
                sensor: "b".into(),
                celsius: 61.0,
            },
        ],
        gpus: vec![
            Gpu {
                utilization_percent: 20.0,
                temperature_celsius: 70.0,
                power_watts: 100.0,
                sm_clock_mhz: 1400,
                ..Default::default()
            },
            Gpu {
                utilization_percent: 40.0,
                temperature_celsius: 65.0,
                power_watts: 150.0,
                sm_clock_mhz: 1500,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let r = Row::from_sample("gpu-1", 9, &s);
    let get = |m: &str| r.values[metric_index(m).unwrap()];
    assert_eq!(get("temperature_celsius"), Some(61.0), "hottest sensor");
    assert_eq!(get("gpu_utilization_percent"), Some(30.0));
    assert_eq!(get("gpu_temperature_celsius"), Some(70.0));
    assert_eq!(get("gpu_power_watts"), Some(250.0));
    assert_eq!(get("gpu_sm_clock_mhz"), Some(1500.0));
    assert_eq!(get("cpu_frequency_mhz"), None);
    // Readings a sample does not carry (the book's JSON form) are null in the dataset, never 0.
    let bare = Sample {
        load: Some(Load {
            one: 0.4,
            five: None,
            fifteen: None,
        }),
        ..Default::default()
    };
    let b = Row::from_sample("json-1", 1, &bare);
    assert_eq!(b.values[metric_index("load1").unwrap()], Some(0.4));
    for absent in ["load5", "load15", "uptime_seconds", "process_count"] {
        assert_eq!(b.values[metric_index(absent).unwrap()], None, "{absent}");
    }
    let pi = Sample {
        pi: Some(PiBoard {
            soc_temperature_celsius: 48.0,
            cpu_frequency_mhz: 1800,
            ..Default::default()
        }),
        ..s
    };
    let r = Row::from_sample("pi-1", 1, &pi);
    assert_eq!(
        r.values[metric_index("temperature_celsius").unwrap()],
        Some(48.0)
    );
    assert_eq!(
        r.values[metric_index("cpu_frequency_mhz").unwrap()],
        Some(1800.0)
    );
}

#[test]
fn the_manifest_schema_says_what_the_parquet_columns_are() {
    use parquet::basic::{LogicalType, TimeUnit, Type as Physical};
    let parquet = parquet_schema();
    let fields = parquet.get_fields();
    assert_eq!(fields.len(), schema().len());
    for (col, field) in schema().iter().zip(fields) {
        assert_eq!(col.name, field.name());
        let info = field.get_basic_info();
        let utc_millis = LogicalType::timestamp(true, TimeUnit::MILLIS);
        let kind = match (field.get_physical_type(), info.logical_type_ref()) {
            (Physical::BYTE_ARRAY, _) => "string",
            (Physical::INT64, Some(t)) if *t == utc_millis => TIMESTAMP_MS_UTC,
            (Physical::INT64, None) => "int64",
            (Physical::DOUBLE, None) => "double",
            other => panic!("{}: no manifest type for {other:?}", col.name),
        };
        assert_eq!(col.kind, kind, "{}", col.name);
        assert_eq!(
            col.nullable,
            info.repetition() == parquet::basic::Repetition::OPTIONAL
        );
    }
}
