//! `shoal-load`: the ingest load harness. Simulates N devices, each with its own gRPC connection
//! and stream, sending batches and waiting for each acknowledgement (an ack means durably
//! stored), and prints accepted samples/s, metric points/s and ack latency percentiles.
//!
//!   cargo build --release --bins
//!   target/release/shoal-load --devices 1000 --duration 20s
//!
//! Without `--hub` it starts `shoal serve` (the binary next to itself) on a fresh data folder
//! and port, so the figures include a real hub process writing a real store.
//!
//! With `--score` the started hub gets a model deployed before the load starts and scores
//! every sample it stores (the closed loop); the report adds the samples scored per second,
//! the scoring lag when the load stops and how long the scorer takes to catch up.
//!
//! With `--tls` the hub runs as deployed (`--device-auth cert`): every simulated device is
//! enrolled first (a one-time token through the REST API, a key and CSR of its own, the gRPC
//! `Enroll` call) and streams over TLS with its own client certificate. After the run, every
//! device reconnects at once (a hub restart, as the fleet sees it): the time until the last one
//! has its TLS handshake done and the hub's welcome back is printed.

// The report on stdout is this program's output.
#![allow(clippy::print_stdout)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shoal_proto::v1::ingest_client::IngestClient;
use shoal_proto::v1::{
    Ack, Cpu, DeviceHello, Disk, IngestRequest, IngestResponse, LoadAverage, Memory, NetInterface,
    Sample, TelemetryBatch, Temperature, ingest_request, ingest_response,
};
use tokio::sync::{Barrier, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Load harness for the hub's gRPC ingest.
#[derive(Parser)]
struct Args {
    /// Simulated devices, each with its own connection.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// How long to send.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// Pause between a device's batches (0 = send the next batch as soon as the last is acked).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pause: Duration,
    /// How devices report: grpc, or mqtt (through --broker).
    #[arg(long, value_enum, default_value = "grpc")]
    transport: Transport,
    /// With --transport mqtt and no --hub: the hub's embedded broker, or a Mosquitto started for
    /// the run (the hub subscribing to it).
    #[arg(long, value_enum, default_value = "embedded")]
    broker: Broker,
    /// An already running hub's gRPC URL (or broker's mqtt:// URL); without it a hub is started.
    #[arg(long)]
    hub: Option<String>,
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

struct DeviceResult {
    samples: u64,
    latencies_us: Vec<u32>,
}

/// One simulated device's connection: send a batch, wait for the hub's ack.
enum Link {
    Grpc {
        tx: mpsc::Sender<IngestRequest>,
        answers: tonic::Streaming<IngestResponse>,
    },
    Mqtt {
        client: AsyncClient,
        topic: String,
        acks: mpsc::UnboundedReceiver<ingest_response::Msg>,
    },
}

impl Link {
    async fn connect(
        transport: Transport,
        hub: &str,
        id: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        let hello = DeviceHello {
            device_id: id.to_string(),
            ..Default::default()
        };
        match transport {
            Transport::Grpc => {
                let mut client = match tls {
                    Some(tls) => IngestClient::new(
                        shoal_agent::identity::channel(hub, tls)
                            .await
                            .context("connect")?,
                    ),
                    None => IngestClient::connect(hub.to_string())
                        .await
                        .context("connect")?,
                };
                let (tx, rx) = mpsc::channel(2);
                tx.send(IngestRequest {
                    msg: Some(ingest_request::Msg::Hello(hello)),
                })
                .await?;
                let mut answers = client.stream(ReceiverStream::new(rx)).await?.into_inner();
                answers.message().await?.context("welcome")?;
                Ok(Link::Grpc { tx, answers })
            }
            Transport::Mqtt => {
                let addr = shoal_agent_mqtt_addr(hub)?;
                let mut opts = MqttOptions::new(id, addr.0, addr.1);
                opts.set_keep_alive(Duration::from_secs(60));
                opts.set_max_packet_size(16 << 20, 16 << 20);
                let (client, mut events) = AsyncClient::new(opts, 16);
                let mut net = events.network_options();
                net.set_tcp_nodelay(true);
                events.set_network_options(net);
                let acks_topic = format!("shoal/v1/devices/{id}/acks");
                client
                    .subscribe(acks_topic.clone(), QoS::AtLeastOnce)
                    .await?;
                client
                    .publish(
                        format!("shoal/v1/devices/{id}/hello"),
                        QoS::AtLeastOnce,
                        false,
                        hello.encode_to_vec(),
                    )
                    .await?;
                let (ack_tx, mut acks) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == acks_topic => {
                                if let Ok(IngestResponse { msg: Some(m) }) =
                                    IngestResponse::decode(p.payload.as_ref())
                                    && ack_tx.send(m).is_err()
                                {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) if ack_tx.is_closed() => return,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                });
                // Connected and registered once the hub has answered the hello.
                match tokio::time::timeout(Duration::from_secs(60), acks.recv()).await {
                    Ok(Some(ingest_response::Msg::Welcome(_))) => {}
                    _ => bail!("no welcome from the hub over MQTT"),
                }
                Ok(Link::Mqtt {
                    client,
                    topic: format!("shoal/v1/devices/{id}/telemetry"),
                    acks,
                })
            }
        }
    }

    async fn send(&mut self, samples: Vec<Sample>) -> anyhow::Result<Ack> {
        match self {
            Link::Grpc { tx, answers } => {
                tx.send(IngestRequest {
                    msg: Some(ingest_request::Msg::Batch(TelemetryBatch { samples })),
                })
                .await?;
                let ack = answers.message().await?.context("stream ended")?;
                let Some(ingest_response::Msg::Ack(ack)) = ack.msg else {
                    bail!("expected an ack")
                };
                Ok(ack)
            }
            Link::Mqtt {
                client,
                topic,
                acks,
            } => {
                let payload = TelemetryBatch { samples }.encode_to_vec();
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await?;
                match tokio::time::timeout(Duration::from_secs(30), acks.recv()).await {
                    Ok(Some(ingest_response::Msg::Ack(ack))) => Ok(ack),
                    Ok(Some(_)) => bail!("expected an ack"),
                    Ok(None) => bail!("MQTT connection ended"),
                    Err(_) => bail!("no ack within 30s"),
                }
            }
        }
    }
}

/// `mqtt://HOST:PORT` → (host, port).
fn shoal_agent_mqtt_addr(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .context("an MQTT hub URL starts with mqtt://")?;
    let (host, port) = rest.rsplit_once(':').context("mqtt://HOST:PORT")?;
    Ok((host.to_string(), port.parse()?))
}

/// What one simulated device does.
struct Plan {
    transport: Transport,
    hub: String,
    id: String,
    batch: usize,
    pause: Duration,
    /// Delay before the first batch, so devices do not send in lockstep.
    offset: Duration,
    /// The device's own certificate (with --tls).
    tls: Option<Arc<rustls::ClientConfig>>,
}

async fn device(
    plan: Plan,
    start: Arc<Barrier>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<DeviceResult> {
    let Plan {
        transport,
        hub,
        id,
        batch,
        pause,
        offset,
        tls,
    } = plan;
    let mut link = Link::connect(transport, &hub, &id, tls).await?;
    let tmpl = template();
    let mut seq = 0u64;
    let mut result = DeviceResult {
        samples: 0,
        latencies_us: Vec::with_capacity(4096),
    };
    start.wait().await;
    // Real fleets are not synchronised: spread the devices' first batches over one pause.
    tokio::time::sleep(offset).await;
    while !stop.load(Ordering::Relaxed) {
        let ts = now_ms();
        let samples: Vec<Sample> = (0..batch)
            .map(|_| {
                seq += 1;
                Sample {
                    seq,
                    timestamp_ms: ts,
                    ..tmpl.clone()
                }
            })
            .collect();
        let sent = Instant::now();
        let ack = link.send(samples).await?;
        if ack.up_to_seq != seq || ack.accepted as usize != batch {
            bail!("ack {ack:?} does not cover the batch up to {seq}");
        }
        result
            .latencies_us
            .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        result.samples += batch as u64;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(result)
}

/// Prints the run's figures.
fn report(args: &Args, samples: u64, secs: f64, lat: &mut [u32]) {
    lat.sort_unstable();
    let points = shoal_proto::metrics::point_count(&template());
    let rate = samples as f64 / secs;
    println!("devices              {}", args.devices);
    println!("batch size           {}", args.batch);
    println!("acked samples        {samples} in {secs:.1}s");
    println!("samples/s            {rate:.0}");
    println!("metric points/s      {:.0}", rate * points as f64);
    println!("ack latency p50      {:.2} ms", percentile(lat, 0.50));
    println!("ack latency p99      {:.2} ms", percentile(lat, 0.99));
    println!("ack latency max      {:.2} ms", percentile(lat, 1.0));
    println!(
        "transport            {}",
        match (args.transport, args.tls) {
            (Transport::Grpc, true) => "gRPC over TLS, a client certificate per device",
            (Transport::Grpc, false) => "gRPC, plaintext",
            (Transport::Mqtt, _) => "MQTT",
        }
    );
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

struct StartedHub {
    data_dir: PathBuf,
    child: std::process::Child,
    broker: Option<std::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for StartedHub {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.broker.as_mut()) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

/// With --tls: enrolls every device with the hub (REST for the token, gRPC `Enroll` for the
/// certificate), 16 at a time; returns each device's TLS settings.
async fn enroll_devices(
    http: &str,
    grpc: &str,
    data_dir: &std::path::Path,
    ids: &[String],
) -> anyhow::Result<Vec<Arc<rustls::ClientConfig>>> {
    let admin = shoal_e2e::wait_for_admin_token(data_dir)?;
    let client = shoal_e2e::authed_client(&admin);
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let (client, gate) = (client.clone(), gate.clone());
        let (http, grpc, id) = (http.to_string(), grpc.to_string(), id.clone());
        tasks.spawn(async move {
            let _slot = gate.acquire().await?;
            let made: serde_json::Value = client
                .post(format!("{http}/api/v1/enrollments"))
                .json(&serde_json::json!({ "device_id": id, "ttl": "1h" }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let token = made["token"].as_str().context("token")?;
            let pin = made["ca_sha256"].as_str().context("ca_sha256")?.to_string();
            let trust = shoal_agent::identity::Trust::Fingerprint(pin);
            let (key, issued) =
                shoal_agent::identity::request_certificate(&grpc, token, &trust).await?;
            let identity = shoal_agent::identity::Identity::in_memory(key, issued);
            anyhow::Ok((i, identity.tls_config(None)?))
        });
    }
    let mut configs = vec![None; ids.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, tls) = done??;
        configs[i] = Some(tls);
    }
    Ok(configs
        .into_iter()
        .map(|c| c.expect("every device enrolled"))
        .collect())
}

/// Every device connects at once (a fleet after a hub restart): the time until the last has
/// its stream open and the hub's welcome back.
async fn reconnect_storm(
    hub: &str,
    ids: &[String],
    tls: &[Option<Arc<rustls::ClientConfig>>],
) -> anyhow::Result<Duration> {
    let start = Arc::new(Barrier::new(ids.len() + 1));
    let mut tasks = Vec::with_capacity(ids.len());
    for (id, tls) in ids.iter().zip(tls) {
        let (hub, id, tls, start) = (hub.to_string(), id.clone(), tls.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            Link::connect(Transport::Grpc, &hub, &id, tls).await
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let mut links = Vec::with_capacity(tasks.len());
    for t in tasks {
        links.push(t.await?.context("a device could not reconnect")?);
    }
    let took = began.elapsed();
    drop(links);
    Ok(took)
}

/// Starts Mosquitto on a free port, sized for a fleet (see docs/mqtt.md); returns its URL.
fn start_mosquitto(dir: &std::path::Path) -> anyhow::Result<(String, std::process::Child)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 1000\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
        ),
    )?;
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("mosquitto is not installed (apt-get install mosquitto)")?;
    let child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((format!("mqtt://127.0.0.1:{port}"), child));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("mosquitto did not start")
}

/// Starts `shoal serve`; returns the URL devices report to, the REST URL and the processes.
fn start_hub(args: &Args) -> anyhow::Result<(String, String, StartedHub)> {
    let exe = std::env::current_exe()?;
    let shoal = exe.with_file_name("shoal");
    if !shoal.exists() {
        bail!(
            "{} is missing: run `cargo build --release --bins` first",
            shoal.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("hub"));
    let mut cmd = Command::new(&shoal);
    cmd.args([
        "serve",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--device-auth",
        if args.tls { "cert" } else { "none" },
        "--data-dir",
    ])
    .arg(&dir)
    .args(&args.hub_args);
    let mut broker = None;
    let mut broker_url = None;
    if args.transport == Transport::Mqtt {
        match args.broker {
            Broker::Embedded => {
                cmd.args(["--mqtt-listen", "127.0.0.1:0"]);
            }
            Broker::Mosquitto => {
                let (url, child) = start_mosquitto(tmp.path())?;
                cmd.args(["--mqtt-broker", &url]);
                broker = Some(child);
                broker_url = Some(url);
            }
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("start shoal serve")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("hub stdout")?).read_line(&mut line)?;
    let endpoints: serde_json::Value = serde_json::from_str(&line).context("hub endpoints line")?;
    let http = format!("http://{}", endpoints["http"].as_str().context("http")?);
    let target = match (args.transport, broker_url) {
        (Transport::Grpc, _) => format!(
            "{}://{}",
            if args.tls { "https" } else { "http" },
            endpoints["grpc"].as_str().context("grpc")?
        ),
        (Transport::Mqtt, Some(url)) => url,
        (Transport::Mqtt, None) => {
            format!("mqtt://{}", endpoints["mqtt"].as_str().context("mqtt")?)
        }
    };
    if args.broker == Broker::Mosquitto {
        // Let the hub subscribe before devices publish.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok((
        target,
        http,
        StartedHub {
            data_dir: dir,
            child,
            broker,
            _dir: Some(tmp),
        },
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.devices == 0 || args.batch == 0 {
        bail!("--devices and --batch must be at least 1");
    }
    if let Some(path) = &args.dump_batch {
        let samples = (1..=args.batch as u64)
            .map(|seq| Sample {
                seq,
                timestamp_ms: now_ms(),
                ..template()
            })
            .collect();
        std::fs::write(path, TelemetryBatch { samples }.encode_to_vec())?;
        return Ok(());
    }
    if args.tls && (args.hub.is_some() || args.transport != Transport::Grpc) {
        bail!("--tls runs against a hub it starts itself, over gRPC");
    }
    let (hub, http, started) = match &args.hub {
        Some(h) => (h.clone(), None, None),
        None => {
            let (g, h, s) = start_hub(&args)?;
            (g, Some(h), Some(s))
        }
    };
    if args.score {
        match (&started, &http) {
            (Some(s), Some(http)) => deploy_model(http, &s.data_dir).await?,
            _ => bail!("--score needs a hub this program starts (no --hub)"),
        }
    }
    let run_id = now_ms();
    let ids: Vec<String> = (0..args.devices)
        .map(|i| format!("load-{run_id}-{i:05}"))
        .collect();
    let tls: Vec<Option<Arc<rustls::ClientConfig>>> = match (&started, &http) {
        (Some(s), Some(http)) if args.tls => {
            let began = Instant::now();
            let configs = enroll_devices(http, &hub, &s.data_dir, &ids).await?;
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
        "shoal-load: {} devices, {} samples/batch, {points} points/sample, {} against {hub}",
        args.devices,
        args.batch,
        humantime::format_duration(args.duration)
    );
    // Sinks first read back what their engine has (Kafka) or install a template
    // (Elasticsearch): the load starts once they are ready, so the lag measured is the
    // steady state's.
    if let (Some(s), Some(http)) = (&started, &http)
        && args.hub_args.iter().any(|a| a.starts_with("--sink"))
    {
        let token = shoal_e2e::wait_for_admin_token(&s.data_dir)?;
        let began = Instant::now();
        while sinks_status(http, &token)
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
    let start = Arc::new(Barrier::new(args.devices + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..args.devices)
        .map(|i| {
            let plan = Plan {
                transport: args.transport,
                hub: hub.clone(),
                id: ids[i].clone(),
                batch: args.batch,
                pause: args.pause,
                offset: args.pause.mul_f64(i as f64 / args.devices as f64),
                tls: tls[i].clone(),
            };
            tokio::spawn(device(plan, start.clone(), stop.clone()))
        })
        .collect();
    start.wait().await;
    let began = Instant::now();
    let sink_watch = match (&started, &http) {
        (Some(s), Some(http)) if args.hub_args.iter().any(|a| a.starts_with("--sink")) => {
            let token = shoal_e2e::wait_for_admin_token(&s.data_dir)?;
            Some((
                http.clone(),
                token.clone(),
                tokio::spawn(watch_sinks(http.clone(), token, stop.clone())),
            ))
        }
        _ => None,
    };
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = 0u64;
    let mut lat = Vec::new();
    for t in tasks {
        let r = t.await?.context("a simulated device failed")?;
        samples += r.samples;
        lat.extend(r.latencies_us);
    }
    report(&args, samples, began.elapsed().as_secs_f64(), &mut lat);
    if let Some(cmd) = &args.then {
        let status = Command::new("sh").arg("-c").arg(cmd).status()?;
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
    if args.transport == Transport::Grpc {
        let took = reconnect_storm(&hub, &ids, &tls).await?;
        println!(
            "reconnect storm      {} devices reconnected and welcomed in {:.2}s",
            ids.len(),
            took.as_secs_f64()
        );
    }
    if let Some(http) = http {
        let stored = metric(&http, "shoal_ingest_samples_accepted_total").await?;
        println!("hub stored samples   {stored} (acked {samples})");
        if args.score {
            report_scoring(&http, args.duration).await?;
        }
    }
    Ok(())
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
