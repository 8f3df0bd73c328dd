//! The agent's own Prometheus metrics (`shoal-agent run --metrics-listen ADDR`): scraped while
//! it reports to a real hub, while the hub is down, and refused when the address is bad.

use std::time::Duration;

use shoal_e2e::{Hub, agent_with, free_port, http_get, run_bin, wait_until};

/// The body of `GET http://addr/metrics`, or `None` while nothing answers there.
async fn scrape(addr: &str) -> Option<String> {
    let resp = http_get(&format!("http://{addr}/metrics")).await.ok()?;
    assert!(
        resp.status().is_success(),
        "GET /metrics: {}",
        resp.status()
    );
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    Some(resp.text().await.expect("metrics body"))
}

/// The value of the series `series` (a name, or a name with its labels) in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse().expect("metric value"))
    })
}

/// Scrapes until `series` reaches `at_least`; returns the last scrape.
async fn wait_for_metric(addr: &str, series: &str, at_least: f64) -> String {
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(text) = scrape(addr).await {
            if value(&text, series).is_some_and(|v| v >= at_least) {
                return text;
            }
            last = text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {series} >= {at_least}; last scrape:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_counter_follows_what_the_hub_stored() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub")).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let _agent = agent_with(
        &hub.grpc_url(),
        "metrics-ok",
        &dir.path().join("spool"),
        "50ms",
        None,
        &["--metrics-listen", &addr],
    );

    let text = wait_for_metric(&addr, "shoal_agent_samples_acked_total", 20.0).await;
    let acked = value(&text, "shoal_agent_samples_acked_total").unwrap();
    let collected = value(&text, "shoal_agent_samples_collected_total").unwrap();
    assert!(collected >= acked, "{collected} collected, {acked} acked");
    assert!(value(&text, "shoal_agent_samples_sent_total").unwrap() >= acked);
    assert_eq!(value(&text, "shoal_agent_hub_connected"), Some(1.0));
    assert_eq!(value(&text, "shoal_agent_spool_dropped_total"), Some(0.0));
    assert_eq!(
        value(&text, "shoal_agent_errors_total{kind=\"protocol\"}"),
        Some(0.0)
    );
    assert!(
        text.contains("device_id=\"metrics-ok\",transport=\"grpc\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE shoal_agent_samples_acked_total counter\n"));
    assert!(text.contains("# TYPE shoal_agent_spool_samples gauge\n"));
    // What the agent counts as acknowledged, the hub has stored.
    assert!(hub.stored_up_to("metrics-ok").await as f64 >= acked);

    // Anything but /metrics is not found.
    let resp = http_get(&format!("http://{addr}/nope")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_hub_down_the_spool_gauge_grows_then_drains() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc_port, http_port) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{}", free_port());
    let _agent = agent_with(
        &format!("http://127.0.0.1:{grpc_port}"),
        "metrics-down",
        &dir.path().join("spool"),
        "50ms",
        None,
        &["--metrics-listen", &addr],
    );

    // Nothing listens on the hub's port: samples wait in the spool, connects fail.
    let text = wait_for_metric(&addr, "shoal_agent_spool_samples", 10.0).await;
    assert_eq!(value(&text, "shoal_agent_samples_acked_total"), Some(0.0));
    assert_eq!(value(&text, "shoal_agent_hub_connected"), Some(0.0));
    let text = wait_for_metric(&addr, "shoal_agent_errors_total{kind=\"connect\"}", 1.0).await;
    assert!(value(&text, "shoal_agent_last_error_timestamp_seconds").unwrap() > 1.7e9);
    assert!(
        text.contains(
            "shoal_agent_last_error_info{kind=\"connect\",message=\"cannot connect to hub"
        ),
        "{text}"
    );
    let later = wait_for_metric(
        &addr,
        "shoal_agent_spool_samples",
        value(&text, "shoal_agent_spool_samples").unwrap() + 5.0,
    )
    .await;
    assert!(value(&later, "shoal_agent_spool_bytes").unwrap() > 0.0);

    // The hub comes up: the backlog drains and is counted as acknowledged.
    let hub = Hub::start_on(&dir.path().join("hub"), grpc_port, http_port, &[]).await;
    wait_until("the spool to drain", Duration::from_secs(60), || async {
        scrape(&addr).await.is_some_and(|t| {
            value(&t, "shoal_agent_spool_samples") == Some(0.0)
                && value(&t, "shoal_agent_samples_acked_total").unwrap_or(0.0) >= 15.0
        })
    })
    .await;
    assert!(hub.stored_up_to("metrics-down").await >= 15);
}

#[test]
fn a_bad_metrics_listen_exits_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let out = run_bin(
        "shoal-agent",
        &[
            "run",
            "--device-id",
            "bad-metrics",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--metrics-listen",
            "not-an-addr",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("metrics-listen"), "{stderr}");
    assert!(stderr.contains("not-an-addr"), "{stderr}");

    // No authentication there, so loopback only: an exposed address is refused before start.
    let out = run_bin(
        "shoal-agent",
        &[
            "run",
            "--device-id",
            "bad-metrics",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--metrics-listen",
            "0.0.0.0:9560",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(!spool.exists(), "a refused start changes nothing");

    // The same from the environment and from the config file.
    let out = std::process::Command::new(shoal_e2e::bin("shoal-agent"))
        .args(["check-config", "--device-id", "bad-metrics"])
        .env("SHOAL_METRICS_LISTEN", "127.0.0.1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics-listen"));
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "metrics_listen = \"localhost:99999\"\n").unwrap();
    let out = run_bin(
        "shoal-agent",
        &["check-config", "--config", config.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics-listen"));

    // A good address passes and shows in the checked config; without one it is off.
    std::fs::write(&config, "metrics_listen = \"127.0.0.1:9560\"\n").unwrap();
    let out = run_bin(
        "shoal-agent",
        &[
            "check-config",
            "--device-id",
            "good",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("metrics_listen = \"127.0.0.1:9560\""));
    let out = run_bin("shoal-agent", &["check-config", "--device-id", "good"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("metrics_listen"));
}

#[test]
fn a_taken_metrics_port_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_bin(
        "shoal-agent",
        &[
            "run",
            "--hub",
            "http://127.0.0.1:1",
            "--device-id",
            "taken",
            "--spool-dir",
            dir.path().join("spool").to_str().unwrap(),
            "--metrics-listen",
            &addr,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("--metrics-listen {addr}")),
        "{stderr}"
    );
}
