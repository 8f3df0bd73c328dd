//! `shoal-load`: the ingest load harness. Simulates N devices, each with its own connection
//! (a gRPC stream, or MQTT through the hub's embedded broker or Mosquitto), sending batches and
//! waiting for each acknowledgement (an ack means durably stored), and prints accepted
//! samples/s, metric points/s, ack latency percentiles, how connecting went, and the hub's
//! memory and CPU.
//!
//!   cargo build --release --bins
//!   target/release/shoal-load --devices 1000 --duration 20s
//!   target/release/shoal-load --devices 10000 --batch 1 --pause 10s --duration 30s
//!
//! Without `--hub` it starts `shoal serve` (the binary next to itself) on a fresh data folder
//! and port, so the figures include a real hub process writing a real store.
//!
//! Devices connect as the agent does: a failed attempt is retried with the agent's backoff
//! (100 ms doubling to 30 s, jittered) until `--connect-deadline`; a device that has not
//! connected by then is reported as failed (how many, and the first error) and the run goes on.
//! The run ends on time, and the exit code says whether every device delivered: 0 when each
//! had its batches acked and the hub still held everything acked, 1 otherwise.
//!
//! By default every device connects at once (a storm); `--ramp` spreads the connects out.
//! `--busy N` connects N devices first and keeps them sending while the rest storm in, and
//! reports their ack latency before and during the storm; they run on a thread of their own, so
//! that what is measured is the hub's delay, not this program's own connects.
//! `--reconnect-storm` kills the hub (SIGKILL) a third into the run and starts it again on the
//! same ports and store: the report says how long until every device was delivering again and
//! whether any acked sample was lost. After the run every device reconnects at once and checks
//! that the hub holds every sample it acked.
//!
//! With `--score` the started hub gets a model deployed before the load starts and scores
//! every sample it stores (the closed loop); the report adds the samples scored per second,
//! the scoring lag when the load stops and how long the scorer takes to catch up.
//!
//! With `--tls` the hub runs as deployed (`--device-auth cert`): every simulated device is
//! enrolled first (a one-time token through the REST API, a key and CSR of its own, the gRPC
//! `Enroll` call) and streams over TLS with its own client certificate.

// The report on stdout is this program's output.
#![allow(clippy::print_stdout)]

mod fleet;
mod hub;
mod link;
mod procs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use prost::Message;
use shoal_proto::v1::{
    Cpu, Disk, LoadAverage, Memory, NetInterface, Sample, TelemetryBatch, Temperature,
};
use tokio::sync::{Notify, watch};

use fleet::{Ctx, DeviceLog, Plan};
use link::{Link, Target};

/// Load harness for the hub's ingest: simulated devices over gRPC or MQTT.
#[derive(Parser)]
struct Args {
    /// Simulated devices, each with its own connection.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// How long to send once every device has connected (or given up).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// Pause between a device's batches (0 = send the next batch as soon as the last is acked).
    /// Devices spread their first batches over one pause.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pause: Duration,
    /// Spread the devices' first connects evenly over this long (0 = all at once: a storm).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    ramp: Duration,
    /// A device still not connected this long after it began trying is reported as failed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    connect_deadline: Duration,
    /// Connect this many more devices first and keep them sending while the --devices storm
    /// in; their ack latency before and during the storm is reported.
    #[arg(long, default_value_t = 0)]
    busy: usize,
    /// Kill the started hub (SIGKILL) a third into the run and start it again on the same
    /// ports and store; reports the time until every device delivers again and any acked
    /// sample lost.
    #[arg(long)]
    reconnect_storm: bool,
    /// How devices report: grpc, or mqtt (through --broker).
    #[arg(long, value_enum, default_value = "grpc")]
    transport: Transport,
    /// With --transport mqtt and no --hub: the hub's embedded broker, or a Mosquitto started for
    /// the run (the hub subscribing to it).
    #[arg(long, value_enum, default_value = "embedded")]
    broker: Broker,
    /// With --transport mqtt: no hub, only a Mosquitto started for the run (or the broker at
    /// --hub); devices connect and publish (QoS 1, acked by the broker). The broker's own cost
    /// with the same clients, to compare with.
    #[arg(long)]
    broker_only: bool,
    /// An already running hub's gRPC URL (or broker's mqtt:// URL); without it a hub is started.
    #[arg(long)]
    hub: Option<String>,
    /// The process id of the hub (or broker) at --hub, to report its memory and CPU.
    #[arg(long)]
    hub_pid: Option<u32>,
    /// Write one encoded batch (the payload devices send) to this file and exit; for measuring
    /// a broker's own ceiling with mosquitto_pub (tests/bench/mqtt-ceiling).
    #[arg(long)]
    dump_batch: Option<PathBuf>,
    /// Data folder for the started hub [default: a temporary folder].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Devices enroll and stream over TLS with their own certificates (gRPC, a started hub).
    #[arg(long)]
    tls: bool,
    /// Deploy a temperature model to the started hub first, so it scores what it stores.
    #[arg(long)]
    score: bool,
    /// The first device first sends samples a minute apart over this long before now (e.g.
    /// 7d), so that its charts have a history to draw.
    #[arg(long, value_parser = humantime::parse_duration)]
    history: Option<Duration>,
    /// Another flag for the started hub, e.g. --hub-arg=--sink=kafka://127.0.0.1:9092
    /// (repeatable). With sinks, their lag is sampled every 100 ms during the run and, after
    /// it, the time until they have caught up is measured.
    #[arg(long = "hub-arg", value_name = "ARG", allow_hyphen_values = true)]
    hub_args: Vec<String>,
    /// A shell command run when the load stops, before waiting for the sinks (e.g. starting a
    /// Kafka broker that was down during the run, to measure catching up).
    #[arg(long, value_name = "COMMAND")]
    then: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Grpc,
    Mqtt,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Broker {
    Embedded,
    Mosquitto,
}

/// A server-shaped sample: 8 cores, 3 disks, 2 interfaces, 4 sensors (37 metric points).
fn template() -> Sample {
    Sample {
        seq: 0,
        timestamp_ms: 0,
        cpu: Some(Cpu {
            total_percent: 37.5,
            core_percent: vec![12.0, 55.0, 31.0, 44.0, 20.0, 70.0, 35.0, 33.0],
        }),
        load: Some(LoadAverage {
            one: 1.2,
            five: Some(0.9),
            fifteen: Some(0.7),
        }),
        memory: Some(Memory {
            total_bytes: 16 << 30,
            used_bytes: 9 << 30,
            available_bytes: 7 << 30,
            swap_total_bytes: 2 << 30,
            swap_used_bytes: 1 << 20,
        }),
        disks: ["/", "/var", "/data"]
            .iter()
            .map(|m| Disk {
                mount_point: m.to_string(),
                device: "/dev/nvme0n1p2".into(),
                filesystem: "ext4".into(),
                total_bytes: 512 << 30,
                used_bytes: 200 << 30,
            })
            .collect(),
        networks: ["eth0", "wlan0"]
            .iter()
            .map(|n| NetInterface {
                name: n.to_string(),
                rx_bytes: 123_456_789,
                tx_bytes: 98_765_432,
                rx_bytes_per_second: 12_345.0,
                tx_bytes_per_second: 6_789.0,
            })
            .collect(),
        uptime_seconds: Some(86_400),
        temperatures: ["cpu_thermal", "nvme", "acpitz", "gpu"]
            .iter()
            .map(|s| Temperature {
                sensor: s.to_string(),
                celsius: 48.5,
            })
            .collect(),
        process_count: Some(231),
        gpus: vec![],
        pi: None,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Bad combinations of flags, before anything starts.
fn check(args: &Args) -> anyhow::Result<()> {
    if args.devices == 0 || args.batch == 0 {
        bail!("--devices and --batch must be at least 1");
    }
    if args.duration < args.pause {
        bail!("--duration must be at least --pause, so that every device sends in the run");
    }
    if args.tls && (args.hub.is_some() || args.transport != Transport::Grpc) {
        bail!("--tls runs against a hub it starts itself, over gRPC");
    }
    if args.reconnect_storm
        && (args.hub.is_some()
            || args.broker_only
            || args.broker == Broker::Mosquitto && args.transport == Transport::Mqtt)
    {
        bail!(
            "--reconnect-storm restarts a hub this program starts (no --hub), devices on gRPC or its embedded broker"
        );
    }
    if args.broker_only && (args.transport != Transport::Mqtt || args.score || args.tls) {
        bail!("--broker-only is for --transport mqtt, without --score or --tls");
    }
    Ok(())
}

/// Every connected device is a descriptor here too: take the whole hard limit.
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current < now.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        );
    }
}

/// What the run is measured against: the processes whose memory and CPU it reports.
struct Watched {
    hub: Option<procs::Watch>,
    broker: Option<procs::Watch>,
}

/// The moments of the run, ms from its start.
#[derive(Default)]
struct Timeline {
    /// The busy devices had all connected; the storm began.
    storm_ms: Option<u32>,
    busy_settled_ms: Option<u32>,
    /// Every device had connected or given up: the steady state begins.
    settled_ms: u32,
    /// The hub was killed, and started again.
    killed_ms: Option<u32>,
    restarted_ms: Option<u32>,
    stop_ms: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    check(&args)?;
    if let Some(path) = &args.dump_batch {
        let samples = (1..=args.batch as u64)
            .map(|seq| Sample {
                seq,
                timestamp_ms: now_ms(),
                ..template()
            })
            .collect();
        std::fs::write(path, TelemetryBatch { samples }.encode_to_vec())?;
        return Ok(ExitCode::SUCCESS);
    }
    raise_open_files();
    let mut alone = None;
    let mut started = None;
    let url = match (&args.hub, args.broker_only) {
        (Some(h), _) => h.clone(),
        (None, true) => {
            let (url, child, dir) = hub::start_broker_alone()?;
            let u = url.clone();
            alone = Some((child, dir));
            u
        }
        (None, false) => {
            let s = hub::start_hub(&args)?;
            let u = s.target.clone();
            started = Some(s);
            u
        }
    };
    let result = run(
        &args,
        &url,
        started.as_mut(),
        alone.as_ref().map(|(c, _)| c.id()),
    )
    .await;
    if let Some((mut child, _)) = alone {
        let _ = std::process::Command::new("kill")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
    }
    drop(started);
    result
}

async fn run(
    args: &Args,
    url: &str,
    mut started: Option<&mut hub::StartedHub>,
    alone_pid: Option<u32>,
) -> anyhow::Result<ExitCode> {
    let http = started.as_ref().map(|s| s.http.clone());
    if args.score {
        match &started {
            Some(s) => deploy_model(&s.http, &s.data_dir).await?,
            None => bail!("--score needs a hub this program starts (no --hub)"),
        }
    }
    let run_id = now_ms();
    let total = args.busy + args.devices;
    let ids: Vec<String> = (0..total)
        .map(|i| format!("load-{run_id}-{i:05}"))
        .collect();
    let tls: Vec<Option<Arc<rustls::ClientConfig>>> = match &started {
        Some(s) if args.tls => {
            let began = Instant::now();
            let configs = hub::enroll_devices(&s.http, url, &s.data_dir, &ids).await?;
            eprintln!(
                "shoal-load: enrolled {} devices in {:.1}s",
                ids.len(),
                began.elapsed().as_secs_f64()
            );
            configs.into_iter().map(Some).collect()
        }
        _ => vec![None; ids.len()],
    };
    let points = shoal_proto::metrics::point_count(&template());
    eprintln!(
        "shoal-load: {} devices{}, {} samples/batch, {points} points/sample, {} against {url}",
        args.devices,
        if args.busy > 0 {
            format!(" (+{} busy first)", args.busy)
        } else {
            String::new()
        },
        args.batch,
        humantime::format_duration(args.duration)
    );
    // Sinks first read back what their engine has (Kafka) or install a template
    // (Elasticsearch): the load starts once they are ready, so the lag measured is the
    // steady state's.
    let with_sinks = args.hub_args.iter().any(|a| a.starts_with("--sink"));
    if let (Some(s), true) = (&started, with_sinks) {
        let token = shoal_e2e::wait_for_admin_token(&s.data_dir)?;
        let began = Instant::now();
        while sinks_status(&s.http, &token)
            .await?
            .iter()
            .any(|s| s["state"] == "starting" || s["state"] == "retrying")
        {
            if began.elapsed() > Duration::from_secs(60) {
                bail!("the hub's sinks were not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let t0 = Instant::now();
    let watched = Watched {
        hub: started
            .as_ref()
            .map(|s| s.child.id())
            .or(args.hub_pid)
            .or(alone_pid)
            .map(|pid| procs::Watch::start(pid, t0)),
        broker: started
            .as_ref()
            .and_then(|s| s.broker.as_ref())
            .map(|b| procs::Watch::start(b.id(), t0)),
    };
    // A reading before any device connects: the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        t0,
        stop: stop_rx,
        settled: AtomicUsize::new(0),
        settled_changed: Notify::new(),
    });
    let target = Target {
        transport: args.transport,
        url: url.to_string(),
        broker_only: args.broker_only,
    };
    let plan = |i: usize, start_at: Duration, of: (usize, usize)| Plan {
        target: target.clone(),
        id: ids[i].clone(),
        batch: args.batch,
        pause: args.pause,
        start_at,
        offset: args.pause.mul_f64(of.0 as f64 / of.1 as f64),
        deadline: args.connect_deadline,
        tls: tls[i].clone(),
        template: template(),
        history: args.history.filter(|_| i == 0),
    };
    let mut line = Timeline::default();
    let mut tasks = Vec::with_capacity(total);
    let since_t0 = |ms: u32| Duration::from_millis(u64::from(ms));
    // The busy devices get a runtime (and thread) of their own: in a fleet they are other
    // machines, so the storm's connects on this side must not queue ahead of their acks.
    let busy_runtime = (args.busy > 0)
        .then(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("busy-devices")
                .enable_all()
                .build()
        })
        .transpose()?;
    for i in 0..args.busy {
        let device = fleet::device(plan(i, since_t0(ctx.ms()), (i, args.busy)), ctx.clone());
        tasks.push(match &busy_runtime {
            Some(rt) => rt.spawn(device),
            None => tokio::spawn(device),
        });
    }
    if args.busy > 0 {
        ctx.wait_settled(args.busy).await;
        line.busy_settled_ms = Some(ctx.ms());
        // Their steady state first, to compare with.
        tokio::time::sleep(args.pause.mul_f32(2.0).max(Duration::from_secs(3))).await;
    }
    let storm_ms = ctx.ms();
    line.storm_ms = (args.busy > 0).then_some(storm_ms);
    for j in 0..args.devices {
        let at = since_t0(storm_ms) + args.ramp.mul_f64(j as f64 / args.devices as f64);
        tasks.push(tokio::spawn(fleet::device(
            plan(args.busy + j, at, (j, args.devices)),
            ctx.clone(),
        )));
    }
    ctx.wait_settled(total).await;
    line.settled_ms = ctx.ms();
    let stop_flag = Arc::new(AtomicBool::new(false));
    let sink_watch = match (&started, with_sinks) {
        (Some(s), true) => {
            let token = shoal_e2e::wait_for_admin_token(&s.data_dir)?;
            Some((
                s.http.clone(),
                token.clone(),
                tokio::spawn(watch_sinks(s.http.clone(), token, stop_flag.clone())),
            ))
        }
        _ => None,
    };
    if args.reconnect_storm {
        let hub = started
            .as_mut()
            .context("--reconnect-storm needs a started hub")?;
        tokio::time::sleep(args.duration / 3).await;
        line.killed_ms = Some(ctx.ms());
        hub.crash_and_restart()?;
        line.restarted_ms = Some(ctx.ms());
        if let Some(w) = &watched.hub {
            w.pid.store(hub.child.id(), Ordering::Relaxed);
        }
        tokio::time::sleep(args.duration - args.duration / 3).await;
    } else {
        tokio::time::sleep(args.duration).await;
    }
    line.stop_ms = ctx.ms();
    let _ = stop_tx.send(true);
    stop_flag.store(true, Ordering::Relaxed);
    let mut logs = Vec::with_capacity(total);
    for t in tasks {
        logs.push(t.await?);
    }
    if let Some(rt) = busy_runtime {
        rt.shutdown_background();
    }
    let mut ok = report(args, &logs, &line, &watched);

    if let Some(cmd) = &args.then {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()?;
        if !status.success() {
            bail!("--then {cmd:?} failed: {status}");
        }
    }
    if let Some((http, token, watch)) = sink_watch {
        let mut lags = watch.await?;
        lags.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            lags.get(((lags.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        println!(
            "sink lag             p50 {:.3} s, p99 {:.3} s, max {:.3} s ({} readings)",
            pct(0.5),
            pct(0.99),
            pct(1.0),
            lags.len()
        );
        let (backlog, took) = wait_sinks(&http, &token).await?;
        println!(
            "sink catch-up        {backlog} entries behind at the end, caught up in {:.2} s = {:.0} entries/s",
            took.as_secs_f64(),
            backlog as f64 / took.as_secs_f64().max(1e-9)
        );
    }
    if !args.broker_only {
        ok &= verify(&target, &ids, &tls, &logs).await;
    }
    if let Some(http) = http {
        if !args.reconnect_storm {
            let stored = metric(&http, "shoal_ingest_samples_accepted_total").await?;
            let acked: u64 = logs
                .iter()
                .map(|l| l.acks.iter().map(|a| u64::from(a.samples)).sum::<u64>())
                .sum();
            let resent: u64 = logs.iter().map(|l| l.already_stored).sum();
            println!(
                "hub stored samples   {stored} (acked {acked}, of which {resent} the hub already had)"
            );
        }
        if args.score {
            report_scoring(&http, args.duration).await?;
        }
    }
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("result               NOT every device delivered");
        Ok(ExitCode::FAILURE)
    }
}

/// After the run every device that delivered reconnects at once (a fleet after a hub restart)
/// and checks that the hub holds everything it acked. Prints how long the reconnect took;
/// false when a device could not reconnect or the hub is missing an acked sample.
async fn verify(
    target: &Target,
    ids: &[String],
    tls: &[Option<Arc<rustls::ClientConfig>>],
    logs: &[DeviceLog],
) -> bool {
    let began = Instant::now();
    let mut tasks = Vec::new();
    for ((id, tls), log) in ids.iter().zip(tls).zip(logs) {
        if log.failed.is_some() || log.acks.is_empty() {
            continue;
        }
        let (target, id, tls, acked) = (target.clone(), id.clone(), tls.clone(), log.last_acked);
        tasks.push(tokio::spawn(async move {
            let (_never, mut stop) = watch::channel(false);
            let (link, how) =
                link::connect_retrying(&target, &id, &tls, Duration::from_secs(60), &mut stop)
                    .await;
            let took = began.elapsed();
            match link {
                Some((link, stored)) => Ok((link, stored, acked, took)),
                None => Err(how.first_error.unwrap_or_default()),
            }
        }));
    }
    let (mut short, mut failed, mut first_error) = (0u64, 0usize, None);
    let mut links: Vec<Link> = Vec::with_capacity(tasks.len());
    let mut took = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(Ok((link, stored, acked, t))) => {
                short += acked.saturating_sub(stored);
                links.push(link);
                took.push(t.as_micros() as u32);
            }
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let all = began.elapsed();
    drop(links);
    took.sort_unstable();
    println!(
        "reconnect all        {} devices at once, all welcomed in {:.2} s (p50 {:.0} ms, p99 {:.0} ms){}",
        took.len(),
        all.as_secs_f64(),
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        if failed > 0 {
            format!("; {failed} could not: {}", first_error.unwrap_or_default())
        } else {
            String::new()
        }
    );
    println!(
        "acked, not stored    {short} samples (the hub's seqs against each device's last ack)"
    );
    failed == 0 && short == 0
}

/// Latency percentiles (ms) of the acks that `keep` selects, as "p50 / p99 / max (n)".
fn latencies(logs: &[&DeviceLog], keep: impl Fn(&fleet::AckRec) -> bool) -> (Vec<u32>, u64) {
    let mut lat = Vec::new();
    let mut samples = 0u64;
    for l in logs {
        for a in l.acks.iter().filter(|a| keep(a)) {
            lat.push(a.latency_us);
            samples += u64::from(a.samples);
        }
    }
    lat.sort_unstable();
    (lat, samples)
}

fn summary(lat: &[u32]) -> String {
    if lat.is_empty() {
        return "none".into();
    }
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} acks)",
        percentile(lat, 0.5),
        percentile(lat, 0.99),
        percentile(lat, 1.0),
        lat.len()
    )
}

/// Prints the run's figures; true when every device delivered.
fn report(args: &Args, logs: &[DeviceLog], line: &Timeline, watched: &Watched) -> bool {
    let all: Vec<&DeviceLog> = logs.iter().collect();
    let storm: Vec<&DeviceLog> = logs[args.busy..].iter().collect();
    let busy: Vec<&DeviceLog> = logs[..args.busy].iter().collect();
    let failed: Vec<&DeviceLog> = logs.iter().filter(|l| l.failed.is_some()).collect();
    let delivered = logs.iter().filter(|l| l.delivered()).count();
    let connected = logs.iter().filter(|l| l.connect_ms.is_some()).count();
    let points = shoal_proto::metrics::point_count(&template());

    println!(
        "devices              {} ({delivered} delivered, {} failed)",
        logs.len(),
        failed.len()
    );
    if let Some(first) = failed.first() {
        println!(
            "first failure        {}",
            first.failed.as_deref().unwrap_or_default()
        );
    }
    let mut connect: Vec<u32> = storm.iter().filter_map(|l| l.connect_ms).collect();
    connect.sort_unstable();
    let attempts: Vec<u32> = storm.iter().map(|l| l.attempts).collect();
    let ramp = if args.ramp.is_zero() {
        "all at once".to_string()
    } else {
        format!("ramped over {}", humantime::format_duration(args.ramp))
    };
    let storm_start = line.storm_ms.unwrap_or(0);
    println!(
        "connect              {} devices {ramp}: p50 {} ms, p99 {} ms, max {} ms; all settled {:.2} s after the first began; attempts max {}",
        storm.len(),
        connect.get(connect.len() / 2).copied().unwrap_or(0),
        connect
            .get(((connect.len().max(1) - 1) as f64 * 0.99).round() as usize)
            .copied()
            .unwrap_or(0),
        connect.last().copied().unwrap_or(0),
        f64::from(line.settled_ms.saturating_sub(storm_start)) / 1000.0,
        attempts.iter().max().copied().unwrap_or(0),
    );
    // The steady state: every device settled, and outside a hub restart.
    let outage_end = line.killed_ms.map(|k| recovered(logs, k));
    let steady = |a: &fleet::AckRec| {
        a.sent_ms >= line.settled_ms
            && a.sent_ms < line.stop_ms
            && match (line.killed_ms, outage_end) {
                (Some(k), Some(e)) => a.sent_ms < k || a.sent_ms > e,
                _ => true,
            }
    };
    let (lat, samples) = latencies(&all, steady);
    let secs = f64::from(line.stop_ms - line.settled_ms) / 1000.0;
    let rate = samples as f64 / secs;
    println!("batch size           {}", args.batch);
    println!("acked samples        {samples} in {secs:.1}s (steady state)");
    println!("samples/s            {rate:.0}");
    println!("metric points/s      {:.0}", rate * points as f64);
    println!("ack latency p50      {:.2} ms", percentile(&lat, 0.50));
    println!("ack latency p99      {:.2} ms", percentile(&lat, 0.99));
    println!("ack latency max      {:.2} ms", percentile(&lat, 1.0));
    let (while_connecting, _) = latencies(&all, |a| a.sent_ms < line.settled_ms);
    if !while_connecting.is_empty() {
        println!("ack while connecting {}", summary(&while_connecting));
    }
    if let (Some(busy_at), Some(storm_at)) = (line.busy_settled_ms, line.storm_ms) {
        let (before, _) = latencies(&busy, |a| a.sent_ms > busy_at && a.sent_ms < storm_at);
        let (during, _) = latencies(&busy, |a| {
            a.sent_ms >= storm_at && a.sent_ms <= line.settled_ms.max(storm_at + 1000)
        });
        println!(
            "busy devices' acks   before the storm: {}",
            summary(&before)
        );
        println!(
            "                     during the storm: {}",
            summary(&during)
        );
    }
    let mut ok = delivered == logs.len();
    if let (Some(killed), Some(end)) = (line.killed_ms, outage_end) {
        let lost: u64 = logs.iter().map(|l| l.lost).sum();
        let resent: u64 = logs.iter().map(|l| l.already_stored).sum();
        let mut back: Vec<u32> = logs
            .iter()
            .filter_map(|l| {
                l.acks
                    .iter()
                    .find(|a| a.sent_ms >= killed)
                    .map(|a| a.sent_ms + a.latency_us / 1000 - killed)
            })
            .collect();
        back.sort_unstable();
        println!(
            "hub restart          killed at {:.1} s, serving again after {:.2} s; every device delivering again {:.2} s after the kill (per device p50 {:.2} s, p99 {:.2} s)",
            f64::from(killed) / 1000.0,
            f64::from(line.restarted_ms.unwrap_or(killed) - killed) / 1000.0,
            f64::from(end - killed) / 1000.0,
            f64::from(back.get(back.len() / 2).copied().unwrap_or(0)) / 1000.0,
            f64::from(
                back.get(((back.len().max(1) - 1) as f64 * 0.99).round() as usize)
                    .copied()
                    .unwrap_or(0)
            ) / 1000.0,
        );
        println!(
            "                     acked samples lost: {lost}; resent samples the hub already had (stored once): {resent}"
        );
        ok &= lost == 0 && back.len() == connected;
    }
    if let Some(w) = &watched.hub {
        print_process(
            if args.broker_only { "broker" } else { "hub" },
            w,
            line,
            connected,
        );
    }
    if let Some(w) = &watched.broker {
        print_process("broker", w, line, connected);
    }
    println!(
        "transport            {}",
        match (args.transport, args.tls, args.broker_only, args.broker) {
            (Transport::Grpc, true, _, _) => "gRPC over TLS, a client certificate per device",
            (Transport::Grpc, false, _, _) => "gRPC, plaintext",
            (Transport::Mqtt, _, true, _) =>
                "MQTT to the broker alone (QoS 1, acked by the broker)",
            (Transport::Mqtt, _, false, Broker::Embedded) => "MQTT, the hub's embedded broker",
            (Transport::Mqtt, _, false, Broker::Mosquitto) => "MQTT through Mosquitto",
        }
    );
    ok
}

/// When every device that was connected at `killed` had an ack again (ms from the start).
fn recovered(logs: &[DeviceLog], killed: u32) -> u32 {
    logs.iter()
        .filter(|l| l.connect_ms.is_some())
        .filter_map(|l| {
            l.acks
                .iter()
                .find(|a| a.sent_ms >= killed)
                .map(|a| a.sent_ms + a.latency_us / 1000)
        })
        .max()
        .unwrap_or(killed)
}

/// Memory and CPU of a watched process: before the devices, at the end, per device.
fn print_process(name: &str, w: &procs::Watch, line: &Timeline, connected: usize) {
    let base = w.readings().first().map_or(0, |r| r.rss_kib);
    let end = w.rss_at(line.stop_ms).unwrap_or(0);
    let per = if connected > 0 {
        end.saturating_sub(base) as f64 / connected as f64
    } else {
        0.0
    };
    println!(
        "{name} RSS{:pad$}before devices {:.1} MiB, at the end {:.1} MiB, peak {:.1} MiB: {per:.1} KiB per connected device",
        "",
        base as f64 / 1024.0,
        end as f64 / 1024.0,
        w.peak_rss() as f64 / 1024.0,
        pad = 17 - name.len()
    );
    match w.cpu_between(line.settled_ms, line.stop_ms) {
        Some(cpu) => println!(
            "{name} CPU{:pad$}{:.0} % of one core in the steady state",
            "",
            cpu * 100.0,
            pad = 17 - name.len()
        ),
        None => println!("{name} CPU{:pad$}no readings", "", pad = 17 - name.len()),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

/// The sinks' status (every sink), with the admin token.
async fn sinks_status(http: &str, token: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let v: serde_json::Value = shoal_e2e::authed_client(token)
        .get(format!("{http}/api/v1/sinks"))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["sinks"].as_array().cloned().unwrap_or_default())
}

/// Samples the largest sink lag (seconds) every 100 ms until `stop`.
async fn watch_sinks(http: String, token: String, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(sinks) = sinks_status(&http, &token).await {
            let lag = sinks
                .iter()
                .filter_map(|s| s["lag_seconds"].as_f64())
                .fold(0.0, f64::max);
            out.push(lag);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out
}

/// Waits until every sink has delivered everything; returns the backlog at the start and how
/// long it took.
async fn wait_sinks(http: &str, token: &str) -> anyhow::Result<(u64, Duration)> {
    let began = Instant::now();
    let backlog = sinks_status(http, token)
        .await?
        .iter()
        .filter_map(|s| s["lag_entries"].as_u64())
        .max()
        .unwrap_or(0);
    loop {
        let sinks = sinks_status(http, token).await?;
        if sinks.iter().all(|s| s["lag_entries"] == 0) {
            return Ok((backlog, began.elapsed()));
        }
        if began.elapsed() > Duration::from_secs(1800) {
            bail!("the sinks did not catch up within 30 minutes: {sinks:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One value of the hub's /metrics (open by default).
async fn metric(http: &str, series: &str) -> anyhow::Result<f64> {
    shoal_e2e::scrape_metric(&format!("{http}/metrics"), series)
        .await
        .with_context(|| format!("no {series} in /metrics"))
}

/// Deploys a temperature model (from the samples' own columns) as `shoal-anomaly`.
async fn deploy_model(http: &str, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let dir = data_dir.join("bench-model");
    std::fs::create_dir_all(&dir)?;
    let model = shoal_e2e::bench_model();
    std::fs::write(dir.join("model.onnx"), shoal_ml::onnx::export(&model, &[]))?;
    let admin = shoal_e2e::wait_for_admin_token(data_dir)?;
    let r = shoal_e2e::authed_client(&admin)
        .post(format!("{http}/api/v1/models/deployments"))
        .json(&serde_json::json!({ "model": "shoal-anomaly", "version": "1", "source": dir }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("deploying the model: {}", r.text().await?);
    }
    Ok(())
}

/// Samples scored during the run, the lag when it stopped, and the time to catch up.
async fn report_scoring(http: &str, duration: Duration) -> anyhow::Result<()> {
    let scored = metric(http, "shoal_scoring_samples_total").await?;
    let lag = metric(http, "shoal_scoring_lag_samples").await?;
    let stopped = Instant::now();
    let mut caught_up = None;
    while stopped.elapsed() < Duration::from_secs(120) {
        if metric(http, "shoal_scoring_lag_samples").await? == 0.0 {
            caught_up = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = metric(http, "shoal_scoring_samples_total").await?;
    println!(
        "scored samples/s     {:.0} during the load ({scored} scored, lag {lag} when it stopped)",
        scored / duration.as_secs_f64()
    );
    match caught_up {
        Some(t) => println!(
            "scoring caught up    in {:.1}s after the load ({total} scored in all)",
            t.as_secs_f64()
        ),
        None => println!("scoring caught up    not within 120 s ({total} scored)"),
    }
    Ok(())
}
