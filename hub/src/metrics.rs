//! The hub's Prometheus metrics, rendered in the text exposition format at `/metrics`, and a
//! rate limiter so that a misbehaving device is logged once a minute, not once a message.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a sample was refused for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleReject {
    FutureTimestamp,
    MissingTimestamp,
    BadSeq,
}

impl SampleReject {
    const ALL: [SampleReject; 3] = [Self::FutureTimestamp, Self::MissingTimestamp, Self::BadSeq];
    pub fn label(self) -> &'static str {
        match self {
            Self::FutureTimestamp => "future_timestamp",
            Self::MissingTimestamp => "missing_timestamp",
            Self::BadSeq => "bad_seq",
        }
    }
}

/// Why a whole stream (or message) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamReject {
    InvalidDeviceId,
    NoHello,
    Oversized,
    Malformed,
    /// An MQTT client publishing or subscribing outside its own device's topics.
    ForeignTopic,
    /// An MQTT client with a wrong or missing user name or password.
    BadCredentials,
    /// An authenticated device connecting under another client id than its own.
    ForeignClientId,
}

impl StreamReject {
    const ALL: [StreamReject; 7] = [
        Self::InvalidDeviceId,
        Self::NoHello,
        Self::Oversized,
        Self::Malformed,
        Self::ForeignTopic,
        Self::BadCredentials,
        Self::ForeignClientId,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Self::InvalidDeviceId => "invalid_device_id",
            Self::NoHello => "no_hello",
            Self::Oversized => "oversized_message",
            Self::Malformed => "malformed_message",
            Self::ForeignTopic => "foreign_topic",
            Self::BadCredentials => "bad_credentials",
            Self::ForeignClientId => "foreign_client_id",
        }
    }
}

/// Why the embedded MQTT broker dropped a message meant for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MqttDrop {
    /// A QoS 0 message for a subscriber whose queue was full.
    QueueFullQos0,
    /// A QoS 1 message for a clean-session subscriber cut for being too slow.
    SlowSubscriber,
    /// The oldest QoS 1 message kept for a persistent session whose queue was full.
    SessionQueueFull,
}

impl MqttDrop {
    const ALL: [MqttDrop; 3] = [
        Self::QueueFullQos0,
        Self::SlowSubscriber,
        Self::SessionQueueFull,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Self::QueueFullQos0 => "queue_full_qos0",
            Self::SlowSubscriber => "slow_subscriber_qos1",
            Self::SessionQueueFull => "session_queue_full",
        }
    }
}

const COMMIT_BUCKETS: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

#[derive(Debug, Default)]
pub struct Metrics {
    pub samples_accepted: Counter,
    pub samples_duplicate: Counter,
    pub points_accepted: Counter,
    pub batches: Counter,
    pub commits: Counter,
    pub commit_ops: Counter,
    pub commit_failures: Counter,
    /// Commits refused before they were tried: `[store full, store failed]`.
    pub store_refusals: [Counter; 2],
    /// Times the store was closed and reopened after a failed commit.
    pub store_reopens: Counter,
    commit_micros_sum: Counter,
    commit_buckets: [Counter; COMMIT_BUCKETS.len()],
    pub grpc_connections: Counter,
    pub grpc_connection_errors: Counter,
    pub streams_active: AtomicI64,
    samples_rejected: [Counter; 3],
    streams_rejected: [Counter; 7],
    mqtt_dropped: [Counter; 3],
    /// Embedded-broker subscribers disconnected because a QoS 1 message found their queue full.
    pub mqtt_slow_disconnects: Counter,
    /// Requests by (route template, status).
    http_requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Requests the access gate refused, by reason.
    http_denied: Mutex<BTreeMap<&'static str, u64>>,
    /// Device requests (enrollment, renewal, ingest) refused for their identity, by reason.
    device_denied: Mutex<BTreeMap<&'static str, u64>>,
    /// TLS handshakes on the gRPC port that failed (no TLS, a certificate from another CA, ...).
    pub grpc_tls_failures: Counter,
}

impl Metrics {
    pub fn reject_sample(&self, why: SampleReject) {
        self.samples_rejected[why as usize].inc();
    }

    pub fn reject_stream(&self, why: StreamReject) {
        self.streams_rejected[why as usize].inc();
    }

    pub fn samples_rejected(&self, why: SampleReject) -> u64 {
        self.samples_rejected[why as usize].get()
    }

    pub fn streams_rejected(&self, why: StreamReject) -> u64 {
        self.streams_rejected[why as usize].get()
    }

    pub fn drop_mqtt(&self, why: MqttDrop, n: u64) {
        self.mqtt_dropped[why as usize].add(n);
    }

    pub fn mqtt_dropped(&self, why: MqttDrop) -> u64 {
        self.mqtt_dropped[why as usize].get()
    }

    /// Counts one answered HTTP request.
    pub fn observe_http(&self, route: &str, status: u16) {
        let mut counts = self.http_requests.lock().expect("http counters");
        *counts.entry((route.to_string(), status)).or_default() += 1;
    }

    /// Counts a request the access gate refused (`missing_token`, `invalid_token`, `role`, ...).
    pub fn deny_http(&self, reason: &'static str) {
        *self
            .http_denied
            .lock()
            .expect("http counters")
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts a device request refused for its identity (`no_certificate`, `wrong_device`, ...).
    pub fn deny_device(&self, reason: &'static str) {
        *self
            .device_denied
            .lock()
            .expect("device counters")
            .entry(reason)
            .or_default() += 1;
    }

    /// Requests answered on `route` with `status` so far.
    pub fn http_requests(&self, route: &str, status: u16) -> u64 {
        let counts = self.http_requests.lock().expect("http counters");
        counts
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    pub fn observe_commit(&self, took: Duration, ops: usize) {
        self.commits.inc();
        self.commit_ops.add(ops as u64);
        self.commit_micros_sum.add(took.as_micros() as u64);
        let secs = took.as_secs_f64();
        if let Some(i) = COMMIT_BUCKETS.iter().position(|b| secs <= *b) {
            self.commit_buckets[i].inc();
        }
    }

    /// The text exposition format. `devices` is the count per status label.
    pub fn render(&self, devices: &[(&str, usize)]) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "shoal_ingest_samples_accepted_total",
            "Samples newly stored.",
            self.samples_accepted.get(),
        );
        counter(
            "shoal_ingest_samples_duplicate_total",
            "Samples received again and not stored twice.",
            self.samples_duplicate.get(),
        );
        counter(
            "shoal_ingest_points_accepted_total",
            "Metric points in newly stored samples.",
            self.points_accepted.get(),
        );
        counter(
            "shoal_ingest_batches_total",
            "Telemetry batches acknowledged.",
            self.batches.get(),
        );
        counter(
            "shoal_store_commit_failures_total",
            "Store commits that failed (nothing acknowledged).",
            self.commit_failures.get(),
        );
        counter(
            "shoal_store_reopens_total",
            "Times the store was closed and reopened after a failed commit.",
            self.store_reopens.get(),
        );
        counter(
            "shoal_store_commit_ops_total",
            "Hellos and batches applied by store commits.",
            self.commit_ops.get(),
        );
        counter(
            "shoal_grpc_connections_total",
            "TCP connections accepted on the gRPC port.",
            self.grpc_connections.get(),
        );
        counter(
            "shoal_grpc_connection_errors_total",
            "gRPC-port connections that ended in a protocol error (garbage bytes, broken HTTP/2).",
            self.grpc_connection_errors.get(),
        );
        counter(
            "shoal_mqtt_slow_disconnects_total",
            "Embedded MQTT broker subscribers disconnected because their queue was full.",
            self.mqtt_slow_disconnects.get(),
        );

        let _ = writeln!(
            out,
            "# HELP shoal_store_refused_commits_total Store commits refused before they were tried (nothing acknowledged), by reason.\n# TYPE shoal_store_refused_commits_total counter"
        );
        for (reason, c) in ["full", "failed"].iter().zip(&self.store_refusals) {
            let _ = writeln!(
                out,
                "shoal_store_refused_commits_total{{reason=\"{reason}\"}} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP shoal_ingest_samples_rejected_total Samples refused for good, by reason."
        );
        let _ = writeln!(out, "# TYPE shoal_ingest_samples_rejected_total counter");
        for why in SampleReject::ALL {
            let _ = writeln!(
                out,
                "shoal_ingest_samples_rejected_total{{reason=\"{}\"}} {}",
                why.label(),
                self.samples_rejected(why)
            );
        }
        let _ = writeln!(
            out,
            "# HELP shoal_ingest_streams_rejected_total Ingest streams or messages refused, by reason."
        );
        let _ = writeln!(out, "# TYPE shoal_ingest_streams_rejected_total counter");
        for why in StreamReject::ALL {
            let _ = writeln!(
                out,
                "shoal_ingest_streams_rejected_total{{reason=\"{}\"}} {}",
                why.label(),
                self.streams_rejected(why)
            );
        }

        let _ = writeln!(
            out,
            "# HELP shoal_mqtt_dropped_total Messages the embedded MQTT broker dropped for a subscriber, by reason."
        );
        let _ = writeln!(out, "# TYPE shoal_mqtt_dropped_total counter");
        for why in MqttDrop::ALL {
            let _ = writeln!(
                out,
                "shoal_mqtt_dropped_total{{reason=\"{}\"}} {}",
                why.label(),
                self.mqtt_dropped(why)
            );
        }

        let _ = writeln!(
            out,
            "# HELP shoal_ingest_streams_active Ingest streams open now."
        );
        let _ = writeln!(out, "# TYPE shoal_ingest_streams_active gauge");
        let _ = writeln!(
            out,
            "shoal_ingest_streams_active {}",
            self.streams_active.load(Ordering::Relaxed)
        );

        let _ = writeln!(
            out,
            "# HELP shoal_store_commit_seconds Time to apply and fsync one group commit."
        );
        let _ = writeln!(out, "# TYPE shoal_store_commit_seconds histogram");
        let mut cumulative = 0;
        for (b, c) in COMMIT_BUCKETS.iter().zip(&self.commit_buckets) {
            cumulative += c.get();
            let _ = writeln!(
                out,
                "shoal_store_commit_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let commits = self.commits.get();
        let _ = writeln!(
            out,
            "shoal_store_commit_seconds_bucket{{le=\"+Inf\"}} {commits}"
        );
        let _ = writeln!(
            out,
            "shoal_store_commit_seconds_sum {}",
            self.commit_micros_sum.get() as f64 / 1e6
        );
        let _ = writeln!(out, "shoal_store_commit_seconds_count {commits}");

        let _ = writeln!(
            out,
            "# HELP shoal_http_requests_total HTTP requests answered, by route template and status."
        );
        let _ = writeln!(out, "# TYPE shoal_http_requests_total counter");
        for ((route, status), n) in self.http_requests.lock().expect("http counters").iter() {
            let _ = writeln!(
                out,
                "shoal_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }

        let _ = writeln!(
            out,
            "# HELP shoal_http_denied_total HTTP requests refused by the access gate, by reason."
        );
        let _ = writeln!(out, "# TYPE shoal_http_denied_total counter");
        for (reason, n) in self.http_denied.lock().expect("http counters").iter() {
            let _ = writeln!(out, "shoal_http_denied_total{{reason=\"{reason}\"}} {n}");
        }

        let _ = writeln!(
            out,
            "# HELP shoal_device_denied_total Device requests (enrollment, renewal, ingest) refused for their identity, by reason."
        );
        let _ = writeln!(out, "# TYPE shoal_device_denied_total counter");
        for (reason, n) in self.device_denied.lock().expect("device counters").iter() {
            let _ = writeln!(out, "shoal_device_denied_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP shoal_grpc_tls_failures_total TLS handshakes on the gRPC port that failed."
        );
        let _ = writeln!(out, "# TYPE shoal_grpc_tls_failures_total counter");
        let _ = writeln!(
            out,
            "shoal_grpc_tls_failures_total {}",
            self.grpc_tls_failures.get()
        );

        let _ = writeln!(out, "# HELP shoal_devices Known devices by status.");
        let _ = writeln!(out, "# TYPE shoal_devices gauge");
        for (status, n) in devices {
            let _ = writeln!(out, "shoal_devices{{status=\"{status}\"}} {n}");
        }
        out
    }
}

/// Lets a message through once per `period` per key.
pub struct LogLimiter {
    period: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl LogLimiter {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// True when a message for `key` may be logged now.
    pub fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().expect("limiter lock");
        if last.len() > 10_000 {
            let period = self.period;
            last.retain(|_, t| now.duration_since(*t) < period);
        }
        match last.get(key) {
            Some(t) if now.duration_since(*t) < self.period => false,
            _ => {
                last.insert(key.to_string(), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.samples_accepted.add(5);
        m.reject_sample(SampleReject::FutureTimestamp);
        m.reject_stream(StreamReject::Oversized);
        m.observe_commit(Duration::from_millis(3), 2);
        let text = m.render(&[("online", 2)]);
        assert!(text.contains("shoal_ingest_samples_accepted_total 5"));
        assert!(
            text.contains("shoal_ingest_samples_rejected_total{reason=\"future_timestamp\"} 1")
        );
        assert!(
            text.contains("shoal_ingest_streams_rejected_total{reason=\"oversized_message\"} 1")
        );
        assert!(text.contains("shoal_store_commit_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("shoal_store_commit_seconds_count 1"));
        assert!(text.contains("shoal_devices{status=\"online\"} 2"));
    }

    #[test]
    fn limiter_allows_once_per_period() {
        let l = LogLimiter::new(Duration::from_secs(60));
        assert!(l.allow("dev-1"));
        assert!(!l.allow("dev-1"));
        assert!(l.allow("dev-2"));
    }
}
