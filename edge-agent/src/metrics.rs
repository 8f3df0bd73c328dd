//! The agent's own metrics in the Prometheus text format (0.0.4), for node-exporter-style
//! scraping: `shoal-agent run --metrics-listen 127.0.0.1:9560`, then `GET /metrics`.
//!
//! Off by default, and then it costs nothing: no listener, no task, no allocation; the counters
//! it reads ([`crate::Stats`]) are plain atomics the agent keeps anyway.
//!
//! The responder is a few lines of HTTP/1.1 over a tokio `TcpListener` (one connection at a
//! time, `Connection: close`): a scraper is all it serves, and it keeps the agent small.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `shoal_agent_info{version,device_id,transport}` | gauge | always 1 |
//! | `shoal_agent_samples_collected_total` | counter | samples taken and written to the spool |
//! | `shoal_agent_samples_sent_total` | counter | samples sent to the hub (a resend counts again) |
//! | `shoal_agent_samples_acked_total` | counter | samples the hub acknowledged as stored |
//! | `shoal_agent_samples_rejected_total` | counter | samples the hub refused for good (dropped) |
//! | `shoal_agent_samples_renumbered_total` | counter | spooled samples kept under new seqs because the hub already held theirs |
//! | `shoal_agent_spool_samples` | gauge | samples in the spool waiting for the hub's ack |
//! | `shoal_agent_spool_bytes` | gauge | the spool's size on disk |
//! | `shoal_agent_spool_dropped_total` | counter | samples dropped by the spool's size bound (kept across restarts) |
//! | `shoal_agent_hub_connected` | gauge | 1 while a stream to the hub (or the broker) is up |
//! | `shoal_agent_reconnects_total` | counter | failed or lost connections to the hub |
//! | `shoal_agent_errors_total{kind}` | counter | errors by kind: connect, stream, ack_timeout, protocol, spool |
//! | `shoal_agent_last_error_timestamp_seconds` | gauge | Unix time of the last error (absent until one) |
//! | `shoal_agent_last_error_info{kind,message}` | gauge | 1, labelled with the last error (absent until one) |
//!
//! Counters start at 0 with each run, except `shoal_agent_spool_dropped_total`, which the spool
//! keeps on disk.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::spool::{Spool, SpoolStatus};
use crate::{ErrorKind, Stats};

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// A client gets this long to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest error message put in a label.
const MAX_MESSAGE: usize = 300;

/// Parses `--metrics-listen`: a loopback address and port, e.g. `127.0.0.1:9560` or
/// `[::1]:9560`. The endpoint has no authentication, so any other address is refused: a
/// scraper on another machine reaches it through something that authenticates (an SSH tunnel,
/// a local Prometheus agent).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.trim().parse().map_err(|_| {
        format!("{s:?} is not an address like 127.0.0.1:9560 (IP:PORT on loopback)")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{s:?} is not a loopback address: the metrics endpoint has no authentication, so \
             it listens on 127.0.0.1 or [::1] only"
        ));
    }
    Ok(addr)
}

/// What the agent is, for `shoal_agent_info`.
pub struct Info {
    pub device_id: String,
    pub transport: &'static str,
}

/// Writes every metric in the text format.
pub fn render(out: &mut String, info: &Info, stats: &Stats, spool: &SpoolStatus) {
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        );
    };
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        );
    };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

    out.push_str("# HELP shoal_agent_info The agent's version, device id and transport; always 1.\n# TYPE shoal_agent_info gauge\n");
    let _ = writeln!(
        out,
        "shoal_agent_info{{version=\"{}\",device_id=\"{}\",transport=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        Escaped(&info.device_id),
        info.transport
    );
    counter(
        out,
        "shoal_agent_samples_collected_total",
        "Samples taken and written to the spool since the agent started.",
        load(&stats.samples_taken),
    );
    counter(
        out,
        "shoal_agent_samples_sent_total",
        "Samples sent to the hub (a resend counts again).",
        load(&stats.samples_sent),
    );
    counter(
        out,
        "shoal_agent_samples_acked_total",
        "Samples the hub acknowledged as stored.",
        load(&stats.samples_acked),
    );
    counter(
        out,
        "shoal_agent_samples_rejected_total",
        "Samples the hub refused for good; they are dropped.",
        load(&stats.samples_rejected),
    );
    counter(
        out,
        "shoal_agent_samples_renumbered_total",
        "Spooled samples kept under new seqs because the hub held their seqs already.",
        load(&stats.samples_renumbered),
    );
    gauge(
        out,
        "shoal_agent_spool_samples",
        "Samples in the spool waiting for the hub's acknowledgement.",
        spool.pending,
    );
    gauge(
        out,
        "shoal_agent_spool_bytes",
        "Size of the spool on disk.",
        spool.bytes,
    );
    counter(
        out,
        "shoal_agent_spool_dropped_total",
        "Samples the hub never acknowledged that the spool's size bound dropped (kept across restarts).",
        spool.dropped_total,
    );
    gauge(
        out,
        "shoal_agent_hub_connected",
        "1 while a stream to the hub (or its MQTT broker) is up.",
        u64::from(stats.connected.load(Ordering::Relaxed)),
    );
    counter(
        out,
        "shoal_agent_reconnects_total",
        "Connections to the hub that failed or were lost.",
        load(&stats.reconnects),
    );
    out.push_str("# HELP shoal_agent_errors_total Errors by kind (connect, stream, ack_timeout, protocol, spool).\n# TYPE shoal_agent_errors_total counter\n");
    for kind in ErrorKind::ALL {
        let _ = writeln!(
            out,
            "shoal_agent_errors_total{{kind=\"{}\"}} {}",
            kind.as_str(),
            stats.errors[kind as usize].load(Ordering::Relaxed)
        );
    }
    let last = stats.last_error.lock().expect("last error lock");
    // Both absent until an error happens: no error has no time, and 0 would read as 1970.
    if let Some(e) = last.as_ref() {
        gauge(
            out,
            "shoal_agent_last_error_timestamp_seconds",
            "Unix time of the last error.",
            e.unix_seconds,
        );
        out.push_str("# HELP shoal_agent_last_error_info The last error, as labels; always 1.\n# TYPE shoal_agent_last_error_info gauge\n");
        let _ = writeln!(
            out,
            "shoal_agent_last_error_info{{kind=\"{}\",message=\"{}\"}} 1",
            e.kind.as_str(),
            Escaped(&e.message)
        );
    }
}

/// A label value with `\`, `"` and newlines escaped, cut to [`MAX_MESSAGE`] characters.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars().take(MAX_MESSAGE) {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The bound metrics listener; [`Self::serve`] answers scrapes until shutdown.
pub struct Server {
    listener: TcpListener,
    info: Info,
    stats: Arc<Stats>,
    spool: Arc<Mutex<Spool>>,
}

impl Server {
    /// Binds `addr` (so that a taken port fails the start, not the first scrape).
    pub async fn bind(
        addr: SocketAddr,
        info: Info,
        stats: Arc<Stats>,
        spool: Arc<Mutex<Spool>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the metrics listener is not on a loopback address: whoever reaches it can read the agent's counters and last error");
        }
        tracing::info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
        Ok(Self {
            listener,
            info,
            stats,
            spool,
        })
    }

    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let conn = tokio::select! {
                _ = shutdown.changed() => return,
                conn = self.listener.accept() => conn,
            };
            match conn {
                // One client at a time, each bounded in time: a scraper needs no more.
                Ok((stream, _)) => {
                    let _ = tokio::time::timeout(IO_TIMEOUT, self.answer(stream)).await;
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn answer(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_REQUEST {
                return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]);
        let mut parts = head.lines().next().unwrap_or_default().split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or_default();
        let head_only = method == "HEAD";
        match (method, path) {
            ("GET" | "HEAD", "/metrics") => {
                let mut body = String::with_capacity(4096);
                let spool = self.spool.lock().expect("spool lock").status();
                render(&mut body, &self.info, &self.stats, &spool);
                let body = if head_only { "" } else { body.as_str() };
                respond(&mut stream, "200 OK", CONTENT_TYPE, body).await
            }
            ("GET" | "HEAD", "/") => {
                let body = "shoal-agent: metrics at /metrics\n";
                respond(
                    &mut stream,
                    "200 OK",
                    "text/plain; charset=utf-8",
                    if head_only { "" } else { body },
                )
                .await
            }
            ("GET" | "HEAD", _) => {
                respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await
            }
            _ => {
                respond(
                    &mut stream,
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET\n",
                )
                .await
            }
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        let _ = write!(head, "Content-Type: {content_type}\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> SpoolStatus {
        SpoolStatus {
            acked_seq: 7,
            last_written_seq: 10,
            pending: 3,
            bytes: 600,
            segments: 1,
            dropped_total: 2,
        }
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let stats = Stats::default();
        stats.samples_taken.store(10, Ordering::Relaxed);
        stats.samples_acked.store(7, Ordering::Relaxed);
        let info = Info {
            device_id: "dev-1".into(),
            transport: "grpc",
        };
        let mut out = String::new();
        render(&mut out, &info, &stats, &status());
        for line in [
            "shoal_agent_info{version=\"",
            "shoal_agent_samples_collected_total 10\n",
            "shoal_agent_samples_acked_total 7\n",
            "shoal_agent_spool_samples 3\n",
            "shoal_agent_spool_bytes 600\n",
            "shoal_agent_spool_dropped_total 2\n",
            "shoal_agent_errors_total{kind=\"connect\"} 0\n",
            "# TYPE shoal_agent_spool_samples gauge\n",
            "# TYPE shoal_agent_samples_acked_total counter\n",
        ] {
            assert!(out.contains(line), "no {line:?} in\n{out}");
        }
        assert!(
            !out.contains("last_error"),
            "no error yet, so no time of one"
        );
        // Every sample line belongs to a family announced by a TYPE line.
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(
                out.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }

    #[test]
    fn the_last_error_is_escaped_into_a_label() {
        let stats = Stats {
            keep_last_error: true,
            ..Default::default()
        };
        stats.record_error(ErrorKind::Connect, &"refused \"x\"\\\nagain");
        let mut out = String::new();
        let info = Info {
            device_id: "d".into(),
            transport: "mqtt",
        };
        render(&mut out, &info, &stats, &status());
        assert!(out.contains("shoal_agent_errors_total{kind=\"connect\"} 1\n"));
        assert!(
            out.contains(
                "shoal_agent_last_error_info{kind=\"connect\",message=\"refused \\\"x\\\"\\\\\\nagain\"} 1\n"
            ),
            "{out}"
        );
        assert!(!out.contains("shoal_agent_last_error_timestamp_seconds 0\n"));
        assert!(out.contains("shoal_agent_last_error_timestamp_seconds "));
    }

    #[test]
    fn without_keep_last_error_only_counters_move() {
        let stats = Stats::default();
        stats.record_error(ErrorKind::Spool, &"disk full");
        assert_eq!(
            stats.errors[ErrorKind::Spool as usize].load(Ordering::Relaxed),
            1
        );
        let last = stats.last_error.lock().unwrap();
        assert!(last.as_ref().is_some_and(|e| e.message.is_empty()));
    }

    #[test]
    fn listen_addresses() {
        assert!(parse_listen("127.0.0.1:9560").is_ok());
        assert!(parse_listen("[::1]:9560").is_ok());
        assert!(parse_listen("not-an-addr").is_err());
        assert!(parse_listen("127.0.0.1").is_err());
        let exposed = parse_listen("0.0.0.0:9560").unwrap_err();
        assert!(exposed.contains("not a loopback address"), "{exposed}");
        assert!(parse_listen("192.168.1.7:9560").is_err());
    }

    #[tokio::test]
    async fn answers_a_scrape_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(
            dir.path(),
            crate::spool::SpoolLimits::with_max_bytes(1 << 20),
        )
        .unwrap();
        let stats = Arc::new(Stats::default());
        stats.samples_acked.store(5, Ordering::Relaxed);
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            Info {
                device_id: "d".into(),
                transport: "grpc",
            },
            stats,
            Arc::new(Mutex::new(spool)),
        )
        .await
        .unwrap();
        let addr = server.listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(server.serve(rx));
        let get = |req: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE));
        assert!(ok.contains("\nshoal_agent_samples_acked_total 5\n"), "{ok}");
        let missing = get("GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let _ = tx.send(true);
        task.await.unwrap();
    }
}
