//! The hub (and broker) this program starts, restarts and stops, and enrolling devices with it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Args, Broker, Transport};

pub struct StartedHub {
    pub data_dir: PathBuf,
    pub child: Child,
    pub broker: Option<Child>,
    /// Where devices report (gRPC URL or mqtt://) and the REST URL.
    pub target: String,
    pub http: String,
    /// `shoal serve`'s arguments but its listen addresses, to start it again the same way.
    args: Vec<String>,
    listen: Listen,
    _dir: Option<tempfile::TempDir>,
}

/// The addresses the hub listens on.
struct Listen {
    grpc: String,
    http: String,
    mqtt: Option<String>,
}

impl StartedHub {
    /// Kills the hub (SIGKILL, as a crash) and starts it again on the same ports and store.
    pub fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        let (child, _) = spawn(&self.args, &self.listen)?;
        self.child = child;
        Ok(())
    }
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

/// Starts `shoal serve` and reads the addresses it printed.
fn spawn(args: &[String], listen: &Listen) -> anyhow::Result<(Child, serde_json::Value)> {
    let exe = std::env::current_exe()?;
    let shoal = exe.with_file_name("shoal");
    if !shoal.exists() {
        bail!(
            "{} is missing: run `cargo build --release --bins` first",
            shoal.display()
        );
    }
    let mut cmd = Command::new(&shoal);
    cmd.arg("serve")
        .args(["--grpc-listen", &listen.grpc, "--http-listen", &listen.http]);
    if let Some(m) = &listen.mqtt {
        cmd.args(["--mqtt-listen", m]);
    }
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("start shoal serve")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("hub stdout")?).read_line(&mut line)?;
    let endpoints = serde_json::from_str(&line)
        .with_context(|| format!("the hub's endpoints line: {line:?}"))?;
    Ok((child, endpoints))
}

/// Starts `shoal serve` (and Mosquitto, with --broker mosquitto) on free ports.
pub fn start_hub(args: &Args) -> anyhow::Result<StartedHub> {
    let tmp = tempfile::tempdir()?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("hub"));
    let mut serve_args: Vec<String> = vec![
        "--device-auth".into(),
        if args.tls { "cert" } else { "none" }.into(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    serve_args.extend(args.hub_args.iter().cloned());
    let mut broker = None;
    let mut broker_url = None;
    let mut listen = Listen {
        grpc: "127.0.0.1:0".into(),
        http: "127.0.0.1:0".into(),
        mqtt: None,
    };
    if args.transport == Transport::Mqtt {
        match args.broker {
            Broker::Embedded => listen.mqtt = Some("127.0.0.1:0".into()),
            Broker::Mosquitto => {
                let (url, child) = start_mosquitto(tmp.path())?;
                serve_args.extend(["--mqtt-broker".into(), url.clone()]);
                broker = Some(child);
                broker_url = Some(url);
            }
        }
    }
    let (child, endpoints) = spawn(&serve_args, &listen)?;
    let at = |k: &str| {
        endpoints[k]
            .as_str()
            .map(str::to_string)
            .context(k.to_string())
    };
    // A restart takes the same ports.
    listen.grpc = at("grpc")?;
    listen.http = at("http")?;
    if listen.mqtt.is_some() {
        listen.mqtt = Some(at("mqtt")?);
    }
    let target = match (args.transport, broker_url) {
        (Transport::Grpc, _) => format!(
            "{}://{}",
            if args.tls { "https" } else { "http" },
            listen.grpc
        ),
        (Transport::Mqtt, Some(url)) => url,
        (Transport::Mqtt, None) => format!("mqtt://{}", at("mqtt")?),
    };
    if args.broker == Broker::Mosquitto {
        // Let the hub subscribe before devices publish.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(StartedHub {
        data_dir: dir,
        child,
        broker,
        target,
        http: format!("http://{}", listen.http),
        args: serve_args,
        listen,
        _dir: Some(tmp),
    })
}

/// A Mosquitto alone (no hub), for the broker's own cost with the same clients.
pub fn start_broker_alone() -> anyhow::Result<(String, Child, tempfile::TempDir)> {
    let tmp = tempfile::tempdir()?;
    let (url, child) = start_mosquitto(tmp.path())?;
    Ok((url, child, tmp))
}

/// With --tls: enrolls every device with the hub (REST for the token, gRPC `Enroll` for the
/// certificate), 16 at a time; returns each device's TLS settings.
pub async fn enroll_devices(
    http: &str,
    grpc: &str,
    data_dir: &Path,
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

/// Starts Mosquitto on a free port, sized for a fleet (see docs/mqtt.md); returns its URL.
fn start_mosquitto(dir: &Path) -> anyhow::Result<(String, Child)> {
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
