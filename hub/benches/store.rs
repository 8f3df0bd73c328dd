//! The store's figures, each beside its baseline in the same run:
//!
//! 1. **Bytes per metric point**, Shoal's store against a Prometheus TSDB block built from the
//!    same samples (`promtool tsdb create-blocks-from openmetrics`, Debian's `prometheus`).
//! 2. **Ingest with retention and rollups running vs off**: the store writer at full speed, with
//!    a retention pass (which rolls up first) every second beside it, or nothing; pair by pair.
//! 3. **Series queries**: 7 days of one device at full resolution (every sample read) and at a
//!    1-hour step (from the hour rollups).
//! 4. **The fleet's latest values** for 10,000 devices.
//!
//! Samples are made like a server's (37 points: 8 cores, 3 disks, 2 interfaces, 4 sensors) with
//! values that move as real ones do: random walks at the collectors' precision, counters that
//! only rise, totals that stay put.
//!
//! Usage: `cargo bench -p shoal-hub --bench store -- [DEVICES] [HOURS] [ROUNDS]` (default 10 24 3;
//! 0 rounds: figure 1 only)

// A harness that prints its figures.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shoal_hub::metrics::Metrics;
use shoal_hub::store::Store;
use shoal_hub::store::retention::{Retention, RetentionPolicy};
use shoal_hub::store::rollup;
use shoal_hub::store::series::Downsampler;
use shoal_hub::store::writer::{Fleet, Row, Writer};
use shoal_proto::v1::{
    Cpu, DeviceHello, Disk, LoadAverage, Memory, NetInterface, Sample, Temperature,
};

const INTERVAL_MS: i64 = 10_000;

/// A device's collector: each call is the next sample, 10 s after the last.
struct Device {
    rng: u64,
    seq: u64,
    t: i64,
    cpu: f64,
    cores: Vec<f64>,
    load: f64,
    mem: u64,
    disks: [u64; 3],
    rx: [u64; 2],
    tx: [u64; 2],
    temps: [f64; 4],
    procs: u32,
}

impl Device {
    fn new(i: u64, start: i64) -> Self {
        Self {
            rng: 0x9E37_79B9_7F4A_7C15 ^ (i + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            seq: 0,
            t: start,
            cpu: 30.0,
            cores: vec![30.0; 8],
            load: 1.0,
            mem: 6 << 30,
            disks: [100 << 30, 20 << 30, 300 << 30],
            rx: [1 << 30, 1 << 20],
            tx: [1 << 29, 1 << 19],
            temps: [48.0, 40.0, 45.0, 52.0],
            procs: 230,
        }
    }

    fn unit(&mut self) -> f64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn walk(&mut self, v: f64, step: f64, lo: f64, hi: f64) -> f64 {
        (v + (self.unit() - 0.5) * 2.0 * step).clamp(lo, hi)
    }

    fn next(&mut self) -> Sample {
        self.seq += 1;
        self.t += INTERVAL_MS;
        // Percentages as /proc/stat deltas give them: ratios of tick counts.
        let ticks = |p: f64| (p * 10.0).round() / 10.0;
        self.cpu = self.walk(self.cpu, 8.0, 0.0, 100.0);
        for c in 0..8 {
            self.cores[c] = self.walk(self.cores[c], 15.0, 0.0, 100.0);
        }
        self.load = self.walk(self.load, 0.2, 0.0, 8.0);
        let mem_step = (self.unit() * 64.0) as u64 * 4096;
        self.mem = if self.unit() < 0.5 {
            self.mem.saturating_sub(mem_step)
        } else {
            self.mem + mem_step
        };
        self.disks[0] += (self.unit() * 10.0) as u64 * 4096;
        self.disks[2] += (self.unit() * 200.0) as u64 * 4096;
        let rates: Vec<f64> = (0..4).map(|_| (self.unit() * 50_000.0).round()).collect();
        for k in 0..2 {
            self.rx[k] += rates[k] as u64 * 10;
            self.tx[k] += rates[k + 2] as u64 * 10;
        }
        for k in 0..4 {
            // Millidegrees, as the kernel reports them.
            self.temps[k] = (self.walk(self.temps[k], 0.5, 30.0, 90.0) * 1000.0).round() / 1000.0;
        }
        if self.unit() < 0.1 {
            self.procs = (self.procs as i64 + (self.unit() * 6.0) as i64 - 3).max(100) as u32;
        }
        let load = (self.load * 100.0).round() / 100.0;
        Sample {
            seq: self.seq,
            timestamp_ms: self.t,
            cpu: Some(Cpu {
                total_percent: ticks(self.cpu),
                core_percent: self.cores.iter().map(|c| ticks(*c)).collect(),
            }),
            load: Some(LoadAverage {
                one: load,
                five: Some((load * 0.8 * 100.0).round() / 100.0),
                fifteen: Some((load * 0.6 * 100.0).round() / 100.0),
            }),
            memory: Some(Memory {
                total_bytes: 16 << 30,
                used_bytes: self.mem,
                available_bytes: (16u64 << 30) - self.mem,
                swap_total_bytes: 2 << 30,
                swap_used_bytes: 1 << 20,
            }),
            disks: ["/", "/var", "/data"]
                .iter()
                .zip(self.disks)
                .map(|(m, used)| Disk {
                    mount_point: m.to_string(),
                    device: "/dev/nvme0n1p2".into(),
                    filesystem: "ext4".into(),
                    total_bytes: 512 << 30,
                    used_bytes: used,
                })
                .collect(),
            networks: ["eth0", "wlan0"]
                .iter()
                .enumerate()
                .map(|(k, n)| NetInterface {
                    name: n.to_string(),
                    rx_bytes: self.rx[k],
                    tx_bytes: self.tx[k],
                    rx_bytes_per_second: rates[k],
                    tx_bytes_per_second: rates[k + 2],
                })
                .collect(),
            uptime_seconds: Some(86_400 + self.seq * 10),
            temperatures: ["cpu_thermal", "nvme", "acpitz", "gpu"]
                .iter()
                .zip(self.temps)
                .map(|(s, c)| Temperature {
                    sensor: s.to_string(),
                    celsius: c,
                })
                .collect(),
            process_count: Some(self.procs),
            gpus: vec![],
            pi: None,
        }
    }
}

fn row(s: &Sample) -> Row {
    Row::new(s.clone())
}

fn now_ms() -> i64 {
    shoal_hub::store::series::now_ms()
}

fn open(dir: &std::path::Path) -> (Store, Arc<Fleet>, Writer, std::thread::JoinHandle<()>) {
    let store = Store::open(dir).expect("store");
    let fleet = Arc::new(Fleet::from_loaded(&store).expect("fleet"));
    let (writer, thread) =
        Writer::start(store.clone(), fleet.clone(), Arc::new(Metrics::default()));
    (store, fleet, writer, thread)
}

async fn hello(writer: &Writer, id: &str) {
    writer
        .hello(
            DeviceHello {
                device_id: id.into(),
                ..Default::default()
            },
            now_ms(),
        )
        .await
        .expect("hello");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn du(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let m = e.metadata().expect("metadata");
            total += if m.is_dir() { du(&e.path()) } else { m.len() };
        }
    }
    total
}

/// Figure 1: bytes per point against a Prometheus block of the same samples.
async fn bytes_per_point(devices: u64, hours: i64) {
    println!("== 1. bytes per metric point: {devices} devices x {hours} h at 10 s");
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _fleet, writer, thread) = open(&dir.path().join("shoal"));
    let start = now_ms() - hours * 3_600_000 - 60_000;
    let per_device = (hours * 3_600_000 / INTERVAL_MS) as u64;
    let mut all: Vec<(String, Vec<Sample>)> = Vec::new();
    let mut points = 0u64;
    for d in 0..devices {
        let id = format!("dev-{d:04}");
        hello(&writer, &id).await;
        let mut dev = Device::new(d, start);
        let samples: Vec<Sample> = (0..per_device).map(|_| dev.next()).collect();
        points += samples
            .iter()
            .map(|s| shoal_proto::metrics::point_count(s) as u64)
            .sum::<u64>();
        all.push((id, samples));
    }
    // As a fleet sends them: a minute of every device in turn, rolled up every ten minutes.
    for (minute, at) in (0..per_device as usize).step_by(6).enumerate() {
        for (id, samples) in &all {
            let batch = &samples[at..(at + 6).min(samples.len())];
            writer
                .write(id.clone(), batch.iter().map(row).collect(), now_ms())
                .await
                .expect("write");
        }
        if minute % 10 == 9 {
            rollup::roll(&store, now_ms()).expect("roll");
        }
    }
    rollup::roll(&store, now_ms()).expect("roll");
    let file = store.file_bytes();
    let used = store.used_bytes().expect("used");
    let (sample_bytes, _) = store.sample_totals().expect("totals");
    let tables = store.table_bytes().expect("tables");
    drop((writer, store));
    thread.join().expect("writer");

    // The same samples as OpenMetrics, one metric family after another, then a block.
    let om = dir.path().join("samples.om");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&om).expect("om file"));
        let mut families: Vec<String> = Vec::new();
        shoal_proto::metrics::for_each_point(&all[0].1[0], |name, _| {
            let family = name.split('{').next().unwrap_or(name).to_string();
            if !families.contains(&family) {
                families.push(family);
            }
        });
        for family in &families {
            writeln!(out, "# TYPE {family} gauge").expect("write");
            for (id, samples) in &all {
                for s in samples {
                    shoal_proto::metrics::for_each_point(s, |name, v| {
                        let (f, labels) = match name.split_once('{') {
                            Some((f, rest)) => (f, format!(",{}", rest.trim_end_matches('}'))),
                            None => (name, String::new()),
                        };
                        if f == family {
                            let _ = writeln!(
                                out,
                                "{f}{{device=\"{id}\"{labels}}} {v} {}.{:03}",
                                s.timestamp_ms / 1000,
                                s.timestamp_ms % 1000
                            );
                        }
                    });
                }
            }
        }
        writeln!(out, "# EOF").expect("write");
    }
    let blocks = dir.path().join("blocks");
    let started = Instant::now();
    let status = std::process::Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics", "-q"])
        .arg(&om)
        .arg(&blocks)
        .status()
        .expect("promtool (Debian: prometheus) runs");
    assert!(status.success(), "promtool failed");
    let prom_total = du(&blocks);
    let mut prom_chunks = 0;
    for b in std::fs::read_dir(&blocks).expect("blocks").flatten() {
        prom_chunks += du(&b.path().join("chunks"));
    }
    let per = |b: u64| b as f64 / points as f64;
    println!("points: {points} ({} samples)", devices * per_device);
    println!(
        "shoal: file {file} B ({:.2} B/point), in use {used} B ({:.2} B/point), samples alone {sample_bytes} B ({:.2} B/point)",
        per(file),
        per(used),
        per(sample_bytes)
    );
    for (name, pages, stored) in &tables {
        println!(
            "  {name}: pages {pages} B ({:.2} B/point), stored {stored} B ({:.2} B/point)",
            per(*pages),
            per(*stored)
        );
    }
    println!(
        "prometheus: blocks {prom_total} B ({:.2} B/point), chunks alone {prom_chunks} B ({:.2} B/point); built in {:.1} s",
        per(prom_total),
        per(prom_chunks),
        started.elapsed().as_secs_f64()
    );
    println!(
        "ratio shoal in use / prometheus blocks: {:.1}x",
        used as f64 / prom_total as f64
    );
}

/// Figure 2: the writer at full speed with rollups, or rollups and retention, running beside
/// it, or neither.
async fn ingest_pairs(pairs: usize) {
    println!(
        "== 2. ingest: 100 devices, batches of 10, 10 s per run; beside it every second: nothing, a rollup pass, or a retention pass (1h; it rolls up first)"
    );
    let mut off = Vec::new();
    let mut rolled = Vec::new();
    let mut both = Vec::new();
    for pair in 0..pairs {
        for mode in [Mode::Off, Mode::Rollups, Mode::Retention] {
            let rate = ingest_run(mode).await;
            println!("round {pair} {mode:?}: {rate:.0} samples/s");
            match mode {
                Mode::Off => off.push(rate),
                Mode::Rollups => rolled.push(rate),
                Mode::Retention => both.push(rate),
            }
        }
    }
    for (name, runs) in [("rollups", &rolled), ("rollups+retention", &both)] {
        let ratios: Vec<f64> = runs.iter().zip(&off).map(|(a, b)| a / b).collect();
        println!(
            "median {name}/off: {:.3} (rounds: {})",
            median(ratios.clone()),
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Rollups,
    Retention,
}

async fn ingest_run(mode: Mode) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _fleet, writer, thread) = open(dir.path());
    // Timestamps from two hours ago: everything is old enough to roll up, half old enough to go.
    let start = now_ms() - 2 * 3_600_000;
    let stop = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(AtomicU64::new(0));
    let background = (mode != Mode::Off).then(|| {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut r = Retention::new(RetentionPolicy {
                max_age: Some(Duration::from_secs(3600)),
                ..Default::default()
            });
            while !stop.load(Ordering::Relaxed) {
                if mode == Mode::Retention {
                    r.pass(&store, now_ms()).expect("retention pass");
                } else {
                    rollup::roll(&store, now_ms()).expect("rollup pass");
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    });
    let mut tasks = Vec::new();
    for d in 0..100u64 {
        let id = format!("dev-{d:03}");
        hello(&writer, &id).await;
        let writer = writer.clone();
        let stop = stop.clone();
        let stored = stored.clone();
        tasks.push(tokio::spawn(async move {
            let mut dev = Device::new(d, start);
            while !stop.load(Ordering::Relaxed) {
                // 10 ms apart, so that two hours pass in about 7 minutes of samples.
                let rows: Vec<Row> = (0..10)
                    .map(|_| {
                        let mut s = dev.next();
                        s.timestamp_ms = start + s.seq as i64 * 10;
                        row(&s)
                    })
                    .collect();
                writer
                    .write(id.clone(), rows, now_ms())
                    .await
                    .expect("write");
                stored.fetch_add(10, Ordering::Relaxed);
            }
        }));
    }
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let n = stored.load(Ordering::Relaxed);
    let rate = n as f64 / began.elapsed().as_secs_f64();
    for t in tasks {
        t.await.expect("task");
    }
    if let Some(b) = background {
        b.join().expect("retention thread");
    }
    drop((writer, store));
    thread.join().expect("writer");
    rate
}

/// Figure 3: seven days of one device, every sample vs the hour rollups.
async fn series_queries() {
    println!("== 3. series: 7 days of one device at 10 s (60,480 samples)");
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, fleet, writer, thread) = open(dir.path());
    hello(&writer, "week").await;
    let now = now_ms();
    let start = now - 7 * 86_400_000;
    let mut dev = Device::new(7, start - INTERVAL_MS);
    let samples: Vec<Sample> = (0..60_480).map(|_| dev.next()).collect();
    for chunk in samples.chunks(2_000) {
        writer
            .write("week".into(), chunk.iter().map(row).collect(), now)
            .await
            .expect("write");
    }
    rollup::roll(&store, now).expect("roll");
    let key = fleet.get("week").expect("device").key;
    let from = start - start.rem_euclid(3_600_000);
    let time = |step: Duration, from: i64| {
        let mut runs = Vec::new();
        let mut buckets = 0;
        let mut source = "";
        for _ in 0..15 {
            let t = Instant::now();
            let (b, s) = store
                .series(
                    key,
                    "cpu_percent",
                    Downsampler::new(from, now, step).expect("down"),
                    from,
                    now,
                )
                .expect("series");
            runs.push(t.elapsed().as_secs_f64() * 1000.0);
            buckets = b.len();
            source = s.name();
        }
        (median(runs), buckets, source)
    };
    // Full resolution: a start off the minute makes every sample be read.
    let (full, n_full, s_full) = time(Duration::from_secs(120), from + 1);
    let (hourly, n_hourly, s_hourly) = time(Duration::from_secs(3600), from);
    println!("every sample: {full:.1} ms median ({n_full} buckets of 2 min, read from {s_full})");
    println!("1-hour step:  {hourly:.2} ms median ({n_hourly} buckets, read from {s_hourly})");
    println!("ratio: {:.0}x", full / hourly);
    drop((writer, store));
    thread.join().expect("writer");
}

/// Figure 4: the latest sample of each of 10,000 devices (what the fleet page shows).
async fn fleet_latest() {
    println!("== 4. latest values of 10,000 devices");
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, fleet, writer, thread) = open(dir.path());
    let now = now_ms();
    for d in 0..10_000u64 {
        let id = format!("dev-{d:05}");
        hello(&writer, &id).await;
        let mut dev = Device::new(d, now - 100 * INTERVAL_MS);
        let rows: Vec<Row> = (0..6).map(|_| row(&dev.next())).collect();
        writer.write(id, rows, now).await.expect("write");
    }
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut points = 0;
        for d in fleet.all() {
            if let Some(s) = store.latest(d.key).expect("latest") {
                points += shoal_proto::metrics::point_count(&s);
            }
        }
        assert!(points > 0);
        runs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "{:.0} ms median for 10,000 devices' latest samples",
        median(runs)
    );
    drop((writer, store));
    thread.join().expect("writer");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (devices, hours, pairs) = (num(0, 10), num(1, 24) as i64, num(2, 3) as usize);
    bytes_per_point(devices, hours).await;
    if pairs == 0 {
        return;
    }
    ingest_pairs(pairs).await;
    series_queries().await;
    fleet_latest().await;
}
