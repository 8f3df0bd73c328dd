//! Helpers for the end-to-end suites: start the real `shoal` and `shoal-agent` binaries as
//! processes (each in its own process group), kill them with SIGKILL, and read what the hub
//! stored through its REST API.
//!
//! The binaries come from the same target directory as the test executable; the test command
//! (`tests/run`) builds them first.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, which tests/run does)",
        path.display()
    );
    path
}

/// A TCP port free on 127.0.0.1 a moment ago, never handed out twice by this process.
///
/// Taken below the kernel's ephemeral range (32768–60999 by default) on purpose: a hub
/// restarted on its old ports must find them free, and a port from `bind(0)` can meanwhile
/// be handed to another test's `bind(0)` or be the source port of some outgoing connection
/// (an agent retrying a hub that is down).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Spread the test binaries (run one after another) over the range.
    let base = std::process::id().wrapping_mul(97) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < SPAN,
            "no free test port left between {LOW} and {}",
            LOW + SPAN
        );
        let port = u16::try_from(LOW + (base + n) % SPAN).expect("port fits");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An HTTP client (the workspace builds reqwest with rustls but no default crypto provider:
/// every binary installs ring's, and so does this).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// An HTTP client that sends `token` as `Authorization: Bearer` on every request.
pub fn authed_client(token: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("token header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("http client")
}

/// The admin token a hub wrote to its data dir when it first started (`admin.token`).
pub fn admin_token(data_dir: &Path) -> String {
    let path = data_dir.join("admin.token");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the hub writes it on first start)", path.display()))
        .trim()
        .to_string()
}

/// `GET url`, without credentials.
pub async fn http_get(url: &str) -> reqwest::Result<reqwest::Response> {
    http_client().get(url).send().await
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        cmd.process_group(0).stdin(Stdio::null());
        if std::env::var_os("SHOAL_E2E_QUIET").is_some() {
            cmd.stderr(Stdio::null());
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL to the whole process group (servers that start workers), then reap the leader.
    /// Nothing is sent once the leader was reaped: its group id may belong to another by then.
    pub fn kill_group(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        self.kill9();
    }

    /// SIGTERM, then wait for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait(Duration::from_secs(20)).await
    }

    /// Waits for the process to exit on its own.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `shoal serve` process on fixed ports (so it can be restarted on the same ones).
pub struct Hub {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    /// The hub's first admin token (empty for a hub started with --no-auth).
    pub token: String,
}

impl Hub {
    /// Starts a hub on fresh ports and waits until it answers `/healthz`.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_on(data_dir, free_port(), free_port(), &[]).await
    }

    pub async fn start_on(data_dir: &Path, grpc_port: u16, http_port: u16, extra: &[&str]) -> Self {
        Self::start_with_env(data_dir, grpc_port, http_port, extra, &[]).await
    }

    /// Starts on given ports with extra flags and environment variables.
    pub async fn start_with_env(
        data_dir: &Path,
        grpc_port: u16,
        http_port: u16,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        let grpc: SocketAddr = format!("127.0.0.1:{grpc_port}").parse().expect("addr");
        let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().expect("addr");
        let mut cmd = Command::new(bin("shoal"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            .args(if extra.contains(&"--device-auth") {
                &[][..]
            } else {
                // Agents in most suites send without certificates; the device-identity suite
                // (tests/tests/devices.rs) runs the hub as deployed, with them.
                &["--device-auth", "none"][..]
            })
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn("shoal serve", cmd);
        // `shoal serve` prints its endpoints once every port is bound: proof that the process
        // answering `/healthz` below is this one and not some other holder of the port.
        let stdout = proc.child.stdout.take().expect("piped stdout");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .expect("shoal serve printed no endpoints within 20 s")
            .unwrap_or_default();
        if line.is_empty() {
            let status = proc.child.wait().expect("wait");
            panic!(
                "shoal serve exited before listening on {grpc} and {http} ({status}); its stderr says why"
            );
        }
        let mut hub = Self {
            proc,
            grpc,
            http,
            data_dir: data_dir.to_path_buf(),
            token: String::new(),
        };
        let url = format!("{}/healthz", hub.http_url());
        wait_until("the hub's /healthz", Duration::from_secs(20), || {
            let url = url.clone();
            async move { http_get(&url).await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        // Written before the API listens; absent with --no-auth.
        hub.token = std::fs::read_to_string(data_dir.join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        hub
    }

    /// An HTTP client holding the hub's admin token.
    pub fn client(&self) -> reqwest::Client {
        authed_client(&self.token)
    }

    /// SIGKILL, then start again on the same ports and data.
    pub async fn crash_and_restart(&mut self, down_for: Duration) {
        self.proc.kill9();
        tokio::time::sleep(down_for).await;
        let again = Hub::start_on(&self.data_dir, self.grpc.port(), self.http.port(), &[]).await;
        *self = again;
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn get(&self, path: &str) -> Value {
        let resp = self
            .client()
            .get(format!("{}{path}", self.http_url()))
            .send()
            .await
            .expect("hub REST request");
        resp.json().await.expect("JSON body")
    }

    /// The HTTP status the hub answers `path` with.
    pub async fn get_status(&self, path: &str) -> u16 {
        self.client()
            .get(format!("{}{path}", self.http_url()))
            .send()
            .await
            .expect("hub REST request")
            .status()
            .as_u16()
    }

    /// Every seq the hub stored for `device`, in order, read page by page.
    pub async fn stored_seqs(&self, device: &str) -> Vec<u64> {
        self.stored_samples(device)
            .await
            .iter()
            .map(|s| s["seq"].as_u64().expect("seq"))
            .collect()
    }

    pub async fn stored_samples(&self, device: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .get(&format!(
                    "/api/v1/devices/{device}/samples?after_seq={after}&limit=10000"
                ))
                .await;
            let Some(samples) = page["samples"].as_array() else {
                return out;
            };
            out.extend(samples.iter().cloned());
            match page["next_after_seq"].as_u64() {
                Some(n) => after = n,
                None => return out,
            }
        }
    }

    /// Highest seq stored for `device` (0 when unknown).
    pub async fn stored_up_to(&self, device: &str) -> u64 {
        self.get(&format!("/api/v1/devices/{device}")).await["stored_up_to_seq"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The value of one line of `/metrics`, e.g. `shoal_ingest_samples_accepted_total`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .client()
            .get(format!("{}/metrics", self.http_url()))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
            .trim()
            .parse()
            .expect("metric value")
    }
}

/// A `shoal-agent run` process.
pub fn agent(hub: &str, device: &str, spool: &Path, interval: &str, count: Option<u64>) -> Proc {
    agent_with(hub, device, spool, interval, count, &[])
}

/// A `shoal-agent run` process with extra flags.
pub fn agent_with(
    hub: &str,
    device: &str,
    spool: &Path,
    interval: &str,
    count: Option<u64>,
    extra: &[&str],
) -> Proc {
    let mut cmd = Command::new(bin("shoal-agent"));
    cmd.arg("run")
        .arg("--hub")
        .arg(hub)
        .arg("--device-id")
        .arg(device)
        .arg("--interval")
        .arg(interval)
        .arg("--spool-dir")
        .arg(spool)
        .args(extra);
    if let Some(n) = count {
        cmd.arg("--count").arg(n.to_string());
    }
    Proc::spawn("shoal-agent", cmd)
}

/// Runs a binary to completion.
pub fn run_bin(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run binary")
}

/// Runs the `shoal` CLI against `hub`: (success, stdout, stderr).
pub fn shoal_cli(hub: &Hub, args: &[&str]) -> (bool, String, String) {
    shoal_cli_as(hub, &hub.token, args)
}

/// Runs the `shoal` CLI against `hub` with `token` as SHOAL_TOKEN (and no credentials file).
pub fn shoal_cli_as(hub: &Hub, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("shoal"))
        .arg("--hub")
        .arg(hub.http_url())
        .args(args)
        .env("SHOAL_TOKEN", token)
        .env("SHOAL_CREDENTIALS", "/nonexistent/credentials.toml")
        .stdin(Stdio::null())
        .output()
        .expect("run shoal");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `shoal-agent spool status` as JSON.
pub fn spool_status(spool: &Path) -> Value {
    try_spool_status(spool).unwrap_or_else(|e| panic!("spool status failed: {e}"))
}

/// `shoal-agent spool status` as JSON, or what it printed instead.
fn try_spool_status(spool: &Path) -> Result<Value, String> {
    let out = run_bin(
        "shoal-agent",
        &[
            "spool",
            "status",
            "--spool-dir",
            spool.to_str().expect("utf-8 path"),
        ],
    );
    let printed = || {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    if !out.status.success() {
        return Err(printed());
    }
    serde_json::from_slice(&out.stdout).map_err(|_| printed())
}

/// Polls `shoal-agent spool status` (read-only, safe next to a running agent) until `cond`
/// holds for its JSON; returns that status. What a test waits on instead of a fixed sleep
/// while an agent samples with its hub away: samples it has really taken, however loaded the
/// machine.
pub async fn wait_for_spool(
    spool: &Path,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match try_spool_status(spool) {
            Ok(status) if cond(&status) => return status,
            Ok(status) => status.to_string(),
            Err(printed) => printed,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; spool status: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of `series` (a name, or a name with its labels) in the Prometheus text at `url`
/// (e.g. an agent's `--metrics-listen` address + `/metrics`); `None` while nothing answers
/// there or the series is absent.
pub async fn scrape_metric(url: &str, series: &str) -> Option<f64> {
    let text = http_get(url).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Reads `proc`'s piped stdout up to and including the first line that contains `needle`,
/// leaving the rest unread for later; returns what it read. Fails when the output ends first
/// or `timeout` passes. The output must be line-buffered (or flushed) to arrive in time.
pub async fn read_stdout_until(proc: &mut Proc, needle: &str, timeout: Duration) -> String {
    use std::io::Read;
    let mut out = proc.child.stdout.take().expect("piped stdout");
    let wanted = needle.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Byte by byte: whatever follows the line stays in the pipe for the caller.
    std::thread::spawn(move || {
        let (mut text, mut line_start, mut byte) = (Vec::new(), 0, [0u8; 1]);
        let found = loop {
            match out.read(&mut byte) {
                Ok(0) => break false,
                Ok(_) => {
                    text.push(byte[0]);
                    if byte[0] == b'\n' {
                        if String::from_utf8_lossy(&text[line_start..]).contains(&wanted) {
                            break true;
                        }
                        line_start = text.len();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        let _ = tx.send((out, String::from_utf8_lossy(&text).into_owned(), found));
    });
    let (out, text, found) = tokio::time::timeout(timeout, rx)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} printed no line with {needle:?} within {timeout:?}",
                proc.name
            )
        })
        .expect("stdout reader");
    proc.child.stdout = Some(out);
    assert!(
        found,
        "{} ended its output before a line with {needle:?}: {text:?}",
        proc.name
    );
    text
}

/// Starts `mosquitto_sub ARGS` and returns once the broker has acknowledged its
/// subscriptions (its SUBACK), so that whatever is published from then on reaches it: what a
/// test waits on instead of sleeping before it publishes. The client runs with `-d`, line-
/// buffered through `stdbuf -oL`, so its debug lines say when the SUBACK came; they stay in
/// its stdout, and [`mqtt_messages`] drops them from what it printed. Fails when the broker
/// refused a subscription.
pub async fn subscribed_mosquitto_sub(args: &[&str]) -> Proc {
    let exe = which("mosquitto_sub")
        .expect("mosquitto_sub is not installed (tests/run installs mosquitto-clients)");
    let stdbuf = which("stdbuf").expect("stdbuf (GNU coreutils) is not installed");
    let mut cmd = Command::new(stdbuf);
    cmd.arg("-oL")
        .arg(exe)
        .arg("-d")
        .args(args)
        .stdout(Stdio::piped());
    let mut sub = Proc::spawn("mosquitto_sub", cmd);
    // mosquitto_sub -d prints `Subscribed (mid: 1): 0` (the granted QoS of each filter, 128
    // for a refused one) when the SUBACK arrives.
    let seen = read_stdout_until(&mut sub, "Subscribed (mid:", Duration::from_secs(15)).await;
    let granted = seen
        .lines()
        .last()
        .and_then(|l| l.split_once("): "))
        .map(|(_, codes)| codes.to_string())
        .unwrap_or_default();
    assert!(
        !granted.is_empty() && granted.split(", ").all(|c| c.trim() != "128"),
        "the broker refused a subscription of mosquitto_sub {args:?}: {seen}"
    );
    sub
}

/// What a `mosquitto_sub -d` printed, less its debug lines: the messages, one line each.
pub fn mqtt_messages(output: &str) -> String {
    output
        .lines()
        .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed (mid:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A Mosquitto broker on a fixed port (so it can be restarted), config in a temp folder.
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    conf: PathBuf,
}

impl Mosquitto {
    /// Starts `mosquitto` on 127.0.0.1 with anonymous access. Fails (never skips) when the
    /// broker is not installed: `tests/run` installs it.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, free_port(), "allow_anonymous true\n").await
    }

    /// Starts with extra configuration lines.
    pub async fn start_with(dir: &Path, port: u16, extra: &str) -> Self {
        let exe = which("mosquitto")
            .unwrap_or_else(|| panic!("mosquitto is not installed: run tests/run (it installs it) or apt-get install mosquitto"));
        std::fs::create_dir_all(dir).expect("broker dir");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\npersistence false\nset_tcp_nodelay true\n{extra}"),
        )
        .expect("write conf");
        let m = Self {
            proc: Self::spawn(&exe, &conf),
            port,
            conf,
        };
        m.wait_ready().await;
        m
    }

    fn spawn(exe: &Path, conf: &Path) -> Proc {
        let mut cmd = Command::new(exe);
        cmd.arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Proc::spawn("mosquitto", cmd)
    }

    async fn wait_ready(&self) {
        let port = self.port;
        wait_until(
            "mosquitto to listen",
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then start again on the same port.
    pub async fn crash_and_restart(&mut self, down_for: Duration) {
        self.proc.kill9();
        tokio::time::sleep(down_for).await;
        let exe = which("mosquitto").expect("mosquitto");
        self.proc = Self::spawn(&exe, &self.conf);
        self.wait_ready().await;
    }
}

/// Finds a program on PATH (and in /usr/sbin, where Debian puts mosquitto).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A throwaway CA and a server certificate for 127.0.0.1 / localhost, made with the `openssl`
/// command (`tests/run` installs it where missing).
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCerts {
    pub fn make(dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).expect("cert dir");
        // Readable by a broker that dropped root (Mosquitto runs as user `mosquitto`).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir).output().expect(
                "the openssl command is needed to make test certificates: apt-get install openssl",
            );
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=Shoal test CA",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                ][..],
                &ec,
            ]
            .concat(),
        );
        openssl(
            &[
                &[
                    "req",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                ][..],
                &ec,
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("san");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// The aarch64 agent that `cross/build aarch64-unknown-linux-gnu` made (tests/run builds it
/// first), under the same target directory as the test executable.
pub fn aarch64_agent() -> PathBuf {
    let target_dir = target_dir();
    let path = target_dir.join("cross/aarch64-unknown-linux-gnu/release-agent/shoal-agent");
    assert!(
        path.exists(),
        "{} is missing: run `cross/build aarch64-unknown-linux-gnu` (tests/run does)",
        path.display()
    );
    path
}

/// A Debian package that `deploy/debian/build-deb ARCH [PACKAGE]` made (tests/run builds
/// shoal-agent for amd64 and arm64, and shoal for amd64, first).
pub fn deb(package: &str, arch: &str) -> PathBuf {
    let debs = target_dir().join("debian");
    let found = std::fs::read_dir(&debs).ok().and_then(|d| {
        d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix(package)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|rest| rest.ends_with(&format!("_{arch}.deb")))
            })
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {package}_*_{arch}.deb in {}: run `deploy/debian/build-deb {arch} {package}` (tests/run does)",
            debs.display()
        )
    })
}

/// The cargo target directory of the running test (`TARGET/debug/deps/TEST` → `TARGET`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf()
}

/// Validates a Kubernetes manifest file offline against the Kubernetes 1.32 schemas with
/// `kubernetes-validate --strict`: (valid, report). Fails (never skips) when the validator is
/// missing; `tests/run` installs it from PyPI.
pub fn kube_validate(file: &Path) -> (bool, String) {
    let validator = which("kubernetes-validate").expect(
        "kubernetes-validate is not installed (tests/run installs it from PyPI into a venv on PATH)",
    );
    let out = Command::new(validator)
        .args(["--strict", "-k", "1.32.0"])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !report.contains("ERROR"), report)
}

/// A Raspberry Pi-like sample whose SoC temperature follows its load (plus a little noise and
/// `hot` degrees): what the dataset and training suites and `shoal-ml-bench` feed the hub.
pub fn pi_sample(seq: u64, start_ms: i64, step_ms: i64, hot: f64) -> shoal_proto::v1::Sample {
    use shoal_proto::v1::{Cpu, LoadAverage, PiBoard, Sample};
    let cpu = ((seq * 37) % 100) as f64;
    let load = ((seq * 11) % 40) as f64 / 10.0;
    let noise = ((seq * 7919) % 101) as f64 / 100.0 - 0.5;
    Sample {
        seq,
        timestamp_ms: start_ms + seq as i64 * step_ms,
        cpu: Some(Cpu {
            total_percent: cpu,
            ..Default::default()
        }),
        load: Some(LoadAverage {
            one: load,
            five: Some(load / 2.0),
            fifteen: Some(load / 4.0),
        }),
        pi: Some(PiBoard {
            soc_temperature_celsius: 38.0 + 0.25 * cpu + 3.0 * load + noise + hot,
            cpu_frequency_mhz: 1500 + (seq % 3) as u32 * 100,
            ..Default::default()
        }),
        process_count: Some(120),
        uptime_seconds: Some(seq),
        ..Default::default()
    }
}

/// Sends samples `make(1) ..= make(n)` for `device` to the hub at `grpc` (http://…) the way an
/// agent does, in batches of 2,000 made as they go, and waits until the hub acknowledged all.
pub async fn ingest(
    grpc: &str,
    device: &str,
    n: u64,
    make: impl Fn(u64) -> shoal_proto::v1::Sample + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use shoal_proto::v1::ingest_client::IngestClient;
    use shoal_proto::v1::{
        DeviceHello, IngestRequest, TelemetryBatch, ingest_request, ingest_response,
    };
    let mut client = IngestClient::connect(grpc.to_string())
        .await
        .context("connect")?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(IngestRequest {
        msg: Some(ingest_request::Msg::Hello(DeviceHello {
            device_id: device.to_string(),
            arch: "aarch64".into(),
            hardware_model: "Raspberry Pi 4 Model B Rev 1.4".into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut answers = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    answers.message().await?.context("welcome")?;
    let sender = tokio::spawn(async move {
        let mut seq = 1;
        while seq <= n {
            let end = (seq + 2000).min(n + 1);
            let batch = TelemetryBatch {
                samples: (seq..end).map(&make).collect(),
            };
            seq = end;
            if tx
                .send(IngestRequest {
                    msg: Some(ingest_request::Msg::Batch(batch)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
        // Keep the stream open until the acks are read.
        std::future::pending::<()>().await;
    });
    while let Some(answer) = answers.message().await? {
        if let Some(ingest_response::Msg::Ack(a)) = answer.msg
            && a.up_to_seq >= n
        {
            break;
        }
    }
    sender.abort();
    Ok(())
}

/// A kubeconfig for a stub API server at `addr` (plain HTTP, namespace `ml`, bearer token
/// `stub-token`), written to `dir/kubeconfig`.
pub fn stub_kubeconfig(dir: &Path, addr: SocketAddr) -> PathBuf {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n  - name: stub\n    cluster:\n      server: http://{addr}\ncontexts:\n  - name: stub\n    context:\n      cluster: stub\n      user: shoal\n      namespace: ml\ncurrent-context: stub\nusers:\n  - name: shoal\n    user:\n      token: stub-token\n"
        ),
    )
    .expect("write the kubeconfig");
    kubeconfig
}

/// The benchmarks' model: a temperature from the default features, as `shoal-ml train` makes.
/// What `pi_sample` does: temperature = 38 + 0.25·cpu + 3·load1 (+ noise within ±0.5); the
/// intercept is given, so that versions of the model differ.
pub fn pi_model(intercept: f64) -> shoal_ml::train::Model {
    shoal_ml::train::Model {
        target: "temperature_celsius".into(),
        features: vec!["cpu_percent".into(), "load1".into()],
        weights: vec![0.25, 3.0],
        intercept,
        sigma: 0.3,
        threshold: 3.0,
    }
}

pub fn bench_model() -> shoal_ml::train::Model {
    shoal_ml::train::Model {
        target: "temperature_celsius".into(),
        features: shoal_ml::train::DEFAULT_FEATURES.map(String::from).to_vec(),
        weights: vec![0.2, 2.0, 1.0, 0.001, 0.1, 0.05, 0.01],
        intercept: 35.0,
        sigma: 1.5,
        threshold: 4.0,
    }
}

/// Starts `shoal serve` (the binary at `shoal`) on 127.0.0.1 ports the kernel picks, for the
/// benchmark harnesses: the process, its gRPC and HTTP base URLs, and its admin token.
pub fn spawn_hub(shoal: &Path, data_dir: &Path) -> anyhow::Result<(Child, String, String, String)> {
    spawn_hub_with(shoal, data_dir, &[])
}

/// [`spawn_hub`] with `extra` flags.
pub fn spawn_hub_with(
    shoal: &Path,
    data_dir: &Path,
    extra: &[&str],
) -> anyhow::Result<(Child, String, String, String)> {
    use anyhow::Context;
    use std::io::BufRead;
    let mut hub = Command::new(shoal)
        .args([
            "serve",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--device-auth",
            "none",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", shoal.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(hub.stdout.take().context("stdout")?).read_line(&mut line)?;
    let endpoints: Value = serde_json::from_str(&line).context("the hub's endpoints line")?;
    let grpc = format!("http://{}", endpoints["grpc"].as_str().context("grpc")?);
    let http = format!("http://{}", endpoints["http"].as_str().context("http")?);
    // The endpoints are printed once bound; the admin token is written just after.
    let token = wait_for_admin_token(data_dir)?;
    Ok((hub, grpc, http, token))
}

/// The admin token a hub just started in `data_dir` writes there (waits up to 20 s for it).
pub fn wait_for_admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let token_file = data_dir.join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(t) = std::fs::read_to_string(&token_file)
            && !t.trim().is_empty()
        {
            return Ok(t.trim().to_string());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} did not appear within 20 s",
            token_file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `shoal-agent enroll` with what `POST /api/v1/enrollments` answered (`enrollment`), into
/// `identity_dir`, plus `extra` flags.
pub fn enroll_agent(enrollment: &Value, identity_dir: &Path, extra: &[&str]) -> Output {
    let field = |k: &str| {
        enrollment[k]
            .as_str()
            .unwrap_or_else(|| panic!("no {k} in {enrollment}"))
            .to_string()
    };
    let (hub, token, pin) = (field("hub"), field("token"), field("ca_sha256"));
    let mut args = vec![
        "enroll",
        "--hub",
        &hub,
        "--token",
        &token,
        "--ca-sha256",
        &pin,
        "--identity-dir",
        identity_dir.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    run_bin("shoal-agent", &args)
}

/// Runs `tests/python/SCRIPT ARGS…` with the venv's Python (first on PATH under tests/run),
/// `input` as JSON on its stdin; returns the JSON it prints. Fails, naming the script and its
/// stderr, when it cannot run (the venv or a package missing).
pub fn python_json(script: &str, args: &[&str], input: &Value) -> Value {
    use std::io::Write;
    let python = which("python3").expect("python3 is not installed");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut child = Command::new(python)
        .arg(&path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write to the script");
    let out = child.wait_with_output().expect("wait for the script");
    assert!(
        out.status.success(),
        "{script} failed (tests/run installs its packages into the venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script} printed no JSON: {e}"))
}

/// Every file below `dir` (none when it cannot be read).
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_below(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A real `mlflow server` (from the venv `tests/run` installs) on a free port, with a sqlite
/// store and the artifact proxy, in its own process group (killed whole on drop).
pub struct MlflowServer {
    proc: Proc,
    pub port: u16,
    pub dir: PathBuf,
}

impl MlflowServer {
    /// Starts it and waits for `/health`. Fails (never skips) when mlflow is not installed.
    pub async fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port()).await
    }

    pub async fn start_on(dir: &Path, port: u16) -> Self {
        let exe = which("mlflow").expect(
            "mlflow is not installed (tests/run installs it from PyPI into a venv on PATH)",
        );
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let mut cmd = Command::new(exe);
        cmd.args(["server", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .args(["--workers", "1"])
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .stdout(Stdio::null());
        if std::env::var_os("SHOAL_E2E_VERBOSE").is_none() {
            cmd.stderr(Stdio::null());
        }
        let server = Self {
            proc: Proc::spawn("mlflow server", cmd),
            port,
            dir,
        };
        let url = format!("{}/health", server.url());
        wait_until("mlflow server's /health", Duration::from_secs(90), || {
            let url = url.clone();
            async move { http_get(&url).await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET /api/2.0/mlflow/PATH?QUERY` as JSON.
    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        http_client()
            .get(format!("{}/api/2.0/mlflow/{path}", self.url()))
            .query(query)
            .send()
            .await
            .expect("mlflow request")
            .json()
            .await
            .expect("mlflow JSON")
    }

    /// `POST /api/2.0/mlflow/PATH` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        http_client()
            .post(format!("{}/api/2.0/mlflow/{path}", self.url()))
            .json(&body)
            .send()
            .await
            .expect("mlflow request")
            .json()
            .await
            .expect("mlflow JSON")
    }

    /// SIGKILL to the server and its workers.
    pub fn kill(&mut self) {
        self.proc.kill_group();
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real Garage S3 server (single node, installed by `tests/run` with `cargo install garage`)
/// with one bucket and one key, in its own process group (killed whole on drop).
pub struct Garage {
    proc: Proc,
    pub s3_port: u16,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    config: PathBuf,
}

impl Garage {
    pub const REGION: &'static str = "garage";

    /// Starts it, lays out the node, imports a key and creates `bucket`. Fails (never skips)
    /// when garage is not installed.
    pub async fn start(dir: &Path, bucket: &str) -> Self {
        let exe = which("garage").expect(
            "garage is not installed (tests/run installs it with cargo install into its cache)",
        );
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let (s3_port, rpc_port) = (free_port(), free_port());
        let secret_bytes: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) % 256))
            .collect();
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\nrpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret_bytes}\"\n\n[s3_api]\ns3_region = \"{region}\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\nroot_domain = \".s3.garage.localhost\"\n",
                d = dir.display(),
                region = Self::REGION,
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut cmd = Command::new(&exe);
        cmd.arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let garage = Self {
            proc: Proc::spawn("garage server", cmd),
            s3_port,
            bucket: bucket.to_string(),
            key_id: "GK5b0a1c0ffee0123456789abc".into(),
            secret: "5ec2e7".repeat(10) + "abcd",
            config,
        };
        let mut node = String::new();
        wait_until("garage to answer", Duration::from_secs(30), || {
            let out = garage.cli(&["node", "id", "-q"]);
            let ok = out.status.success();
            if ok {
                node = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            async move { ok }
        })
        .await;
        let node_id = node.split('@').next().unwrap_or_default().to_string();
        // `node id` reads the key on disk; `status` needs the daemon's RPC port to answer.
        wait_until("garage's RPC port", Duration::from_secs(30), || {
            let ok = garage.cli(&["status"]).status.success();
            async move { ok }
        })
        .await;
        for args in [
            vec!["layout", "assign", "-z", "dc1", "-c", "1G", &node_id],
            vec!["layout", "apply", "--version", "1"],
            vec![
                "key",
                "import",
                "--yes",
                "-n",
                "shoal-test",
                &garage.key_id,
                &garage.secret,
            ],
            vec!["bucket", "create", bucket],
            vec![
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                bucket,
                "--key",
                "shoal-test",
            ],
        ] {
            let out = garage.cli(&args);
            assert!(
                out.status.success(),
                "garage {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        garage
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(which("garage").expect("garage"))
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run garage")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The AWS_* environment an S3 client needs for this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", Self::REGION.to_string()),
        ]
    }

    /// Writes `file` as object `key` with curl's SigV4 signing.
    pub fn curl_put(&self, key: &str, file: &Path) {
        self.curl("PUT", key, &[std::ffi::OsStr::new("-T"), file.as_os_str()]);
    }

    /// Reads an object with curl's SigV4 signing: a client Shoal did not write.
    pub fn curl_get(&self, key: &str) -> Vec<u8> {
        self.curl("GET", key, &[])
    }

    /// curl on object `key`, signed; its output.
    fn curl(&self, what: &str, key: &str, extra: &[&std::ffi::OsStr]) -> Vec<u8> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            ])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", Self::REGION))
            .arg("--user")
            .arg(format!("{}:{}", self.key_id, self.secret))
            .args(extra)
            .arg(format!("{}/{}/{key}", self.endpoint(), self.bucket))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {what} {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.proc.kill_group();
    }
}

/// anvil's first funded account (its test mnemonic's), the hub's chain key in tests.
pub const ANVIL_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// A local Ethereum chain: anvil (npm `@foundry-rs/anvil`; `tests/run` installs it) on a fixed
/// port, a block a second, its state kept in a file so that it can stop and start again with
/// the chain it had.
pub struct Anvil {
    pub proc: Proc,
    pub port: u16,
    pub chain_id: u64,
    state: PathBuf,
}

impl Anvil {
    /// Starts anvil serving `chain_id`. Fails (never skips) when it is not installed.
    pub async fn start(dir: &Path, chain_id: u64) -> Self {
        std::fs::create_dir_all(dir).expect("anvil dir");
        let (port, state) = (free_port(), dir.join("state.json"));
        let a = Self {
            proc: Self::spawn(port, chain_id, &state),
            port,
            chain_id,
            state,
        };
        a.wait_ready().await;
        a
    }

    /// The anvil binary. npm's `anvil` is a Node wrapper around the binary in the platform's
    /// package beside it (`@foundry-rs/anvil-linux-amd64/bin/anvil`); that binary is run
    /// directly, so that stopping it stops the chain and not only the wrapper.
    fn binary() -> PathBuf {
        let found = which("anvil").unwrap_or_else(|| {
            panic!("anvil is not installed: run tests/run (it installs npm @foundry-rs/anvil)")
        });
        let real = std::fs::canonicalize(&found).unwrap_or_else(|_| found.clone());
        real.ancestors()
            .find(|d| d.file_name().is_some_and(|n| n == "@foundry-rs"))
            .and_then(|scope| std::fs::read_dir(scope).ok())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("anvil-"))
            .map(|e| e.path().join("bin").join("anvil"))
            .find(|p| p.is_file())
            .unwrap_or(found)
    }

    fn spawn(port: u16, chain_id: u64, state: &Path) -> Proc {
        let mut cmd = Command::new(Self::binary());
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--chain-id", &chain_id.to_string(), "--block-time", "1"])
            .arg("--state")
            .arg(state)
            .arg("--silent")
            .stdout(Stdio::null());
        Proc::spawn(&format!("anvil:{port}"), cmd)
    }

    async fn wait_ready(&self) {
        let url = self.url();
        wait_until("anvil to answer", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                http_client()
                    .post(&url)
                    .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGTERM: it writes its state).
    pub async fn stop(&mut self) {
        self.proc.terminate().await;
    }

    /// Starts it again on the same port, from the state it wrote.
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(self.port, self.chain_id, &self.state);
        self.wait_ready().await;
    }
}

/// A Kafka broker: nisshi (crates.io, tansu's successor; `tests/run` installs it) on a fixed
/// port, its log kept in SQLite in `dir` so that it can be killed and started again with the
/// topics it had.
pub struct Kafka {
    pub proc: Proc,
    pub port: u16,
    dir: PathBuf,
}

impl Kafka {
    /// Starts a broker. Fails (never skips) when nisshi is not installed.
    pub async fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("broker dir");
        let port = free_port();
        let t = Self {
            proc: Self::spawn(dir, port),
            port,
            dir: dir.to_path_buf(),
        };
        t.wait_ready().await;
        t
    }

    fn spawn(dir: &Path, port: u16) -> Proc {
        let bin = which("nisshi").unwrap_or_else(|| {
            panic!("nisshi is not installed: run tests/run (it builds nisshi 0.8.1 into its cache)")
        });
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        // The SQLite path is relative to the working directory.
        cmd.current_dir(dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://kafka.db"])
            .stdout(Stdio::null());
        if std::env::var_os("SHOAL_E2E_QUIET").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        Proc::spawn(&format!("nisshi:{port}"), cmd)
    }

    async fn wait_ready(&self) {
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until(
            "the Kafka broker to listen",
            Duration::from_secs(20),
            || {
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(addr).await.is_ok() }
            },
        )
        .await;
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the broker stops mid-stream.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts it again on the same port with the same log.
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(&self.dir, self.port);
        self.wait_ready().await;
    }

    /// Creates `topic` with `partitions`, through kafka-python (an independent client).
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        python_json(
            "kafka_client.py",
            &[],
            &serde_json::json!({"op": "create", "brokers": self.brokers(), "topic": topic, "partitions": partitions}),
        );
    }

    /// Every message of `topic`, read back by kafka-python (see tests/python/kafka_client.py).
    pub fn read(&self, topic: &str) -> Vec<Value> {
        let out = python_json(
            "kafka_client.py",
            &[],
            &serde_json::json!({"op": "read", "brokers": self.brokers(), "topic": topic, "idle_ms": 4000}),
        );
        out["messages"].as_array().cloned().unwrap_or_default()
    }
}

/// The OpenSearch REST API: osmem-server (PyPI, an in-memory server; `tests/run` installs it),
/// on a free port. Not a cluster: see docs/data-platform.md for what was checked against it.
pub struct Osmem {
    pub proc: Proc,
    pub port: u16,
}

impl Osmem {
    /// Starts one. Fails (never skips) when osmem-server is not installed.
    pub async fn start() -> Self {
        let python = which("python3").expect("python3 is not installed");
        let out = Command::new(python)
            .args([
                "-c",
                "import os, osmem_server; print(os.path.join(os.path.dirname(osmem_server.__file__), 'bin', 'osmem-server'))",
            ])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "osmem-server is not installed: run tests/run (it installs it from PyPI)"
        );
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["-addr", &format!("127.0.0.1:{port}"), "-no-stdin-watch"])
            .stdout(Stdio::null());
        let s = Self {
            proc: Proc::spawn(&format!("osmem-server:{port}"), cmd),
            port,
        };
        let url = s.url();
        wait_until("osmem-server to answer", Duration::from_secs(20), || {
            let url = url.clone();
            async move { http_get(&url).await.is_ok() }
        })
        .await;
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every document of the indices matching `pattern`, their count and mappings, and one of
    /// `sample_of`'s documents whole, read back by opensearch-py (see tests/python/opensearch_client.py).
    pub fn dump(&self, pattern: &str, sample_of: &str) -> Value {
        python_json(
            "opensearch_client.py",
            &[],
            &serde_json::json!({"op": "dump", "url": self.url(), "index": pattern, "sample_of": sample_of}),
        )
    }

    /// Creates an index with `mappings` through opensearch-py.
    pub fn create_index(&self, index: &str, mappings: Value) {
        python_json(
            "opensearch_client.py",
            &[],
            &serde_json::json!({"op": "create_index", "url": self.url(), "index": index, "mappings": mappings}),
        );
    }
}

/// What [`FaultProxy`] does to the next request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 with `Retry-After: SECONDS`, nothing forwarded.
    TooMany(u64),
    /// 503, nothing forwarded.
    Unavailable,
    /// 413 (the request is larger than the server takes), nothing forwarded.
    TooLarge,
    /// 200 with a body that is not JSON, nothing forwarded.
    Garbage,
    /// Forwarded (the server acts on it), then the answer is cut off halfway and the
    /// connection closed.
    CloseMidResponse,
    /// Forwarded after a pause.
    Slow(Duration),
}

/// Faults waiting for requests, each for paths starting with its prefix.
type FaultQueue = std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(String, Fault)>>>;

/// An HTTP/1.1 proxy between the hub and a server that injects faults: a queue of faults for
/// the next requests, and a switch that refuses every connection (the server "down").
pub struct FaultProxy {
    pub port: u16,
    faults: FaultQueue,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests seen, faults included.
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FaultProxy {
    pub async fn start(upstream: String) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let faults = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let down = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (f, d, r) = (faults.clone(), down.clone(), requests.clone());
        tokio::spawn(async move {
            let http = http_client();
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(conn);
                    continue;
                }
                let (f, d, r, http, upstream) = (
                    f.clone(),
                    d.clone(),
                    r.clone(),
                    http.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    let _ = proxy_conn(conn, &upstream, &http, &f, &d, &r).await;
                });
            }
        });
        Self {
            port,
            faults,
            down,
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Queues faults for the next requests whose path starts with `path`, in order.
    pub fn inject(&self, path: &str, faults: &[Fault]) {
        self.faults
            .lock()
            .expect("faults")
            .extend(faults.iter().map(|f| (path.to_string(), f.clone())));
    }

    /// Faults not yet used.
    pub fn pending(&self) -> usize {
        self.faults.lock().expect("faults").len()
    }

    /// Refuses (closes) every connection while `down`, open ones included.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

async fn proxy_conn(
    mut conn: tokio::net::TcpStream,
    upstream: &str,
    http: &reqwest::Client,
    faults: &std::sync::Mutex<std::collections::VecDeque<(String, Fault)>>,
    down: &std::sync::atomic::AtomicBool,
    requests: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    loop {
        // One request: the head, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 65536];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 65536];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        if down.load(Ordering::SeqCst) {
            return Ok(());
        }
        requests.fetch_add(1, Ordering::SeqCst);
        let mut first = head.lines().next().unwrap_or("").split(' ');
        let (method, path) = (first.next().unwrap_or("GET"), first.next().unwrap_or("/"));
        let content_type = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        });
        let fault = {
            let mut q = faults.lock().expect("faults");
            q.iter()
                .position(|(prefix, _)| path.starts_with(prefix.as_str()))
                .and_then(|i| q.remove(i))
                .map(|(_, f)| f)
        };
        let reply = |status: &str, extra: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
                body.len()
            )
        };
        let forward = || async {
            let mut req = http.request(
                method.parse().unwrap_or(reqwest::Method::GET),
                format!("http://{upstream}{path}"),
            );
            if let Some(ct) = &content_type {
                req = req.header("content-type", ct);
            }
            let resp = req.body(body.clone()).send().await.ok()?;
            let status = resp.status();
            let text = resp.text().await.ok()?;
            Some(reply(
                &format!(
                    "{} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                ),
                "",
                &text,
            ))
        };
        let out = match fault {
            Some(Fault::TooMany(s)) => reply(
                "429 Too Many Requests",
                &format!("retry-after: {s}\r\n"),
                r#"{"error":{"type":"es_rejected_execution_exception","reason":"rejected"},"status":429}"#,
            ),
            Some(Fault::Unavailable) => reply(
                "503 Service Unavailable",
                "",
                r#"{"error":"unavailable","status":503}"#,
            ),
            Some(Fault::TooLarge) => reply(
                "413 Payload Too Large",
                "",
                r#"{"error":"request too large","status":413}"#,
            ),
            Some(Fault::Garbage) => {
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 21\r\n\r\n<html>oops</html>\r\n\r\n"
                    .to_string()
            }
            Some(Fault::CloseMidResponse) => {
                let Some(full) = forward().await else {
                    return Ok(());
                };
                conn.write_all(&full.as_bytes()[..full.len() / 2]).await?;
                return Ok(());
            }
            Some(Fault::Slow(d)) => {
                tokio::time::sleep(d).await;
                match forward().await {
                    Some(o) => o,
                    None => return Ok(()),
                }
            }
            None => match forward().await {
                Some(o) => o,
                None => return Ok(()),
            },
        };
        conn.write_all(out.as_bytes()).await?;
    }
}
