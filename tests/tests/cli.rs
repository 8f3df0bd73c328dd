//! The operator CLI against a real hub, `shoal up`, and config errors (exit 64).

use std::process::Command;
use std::time::Duration;

use shoal_e2e::shoal_cli as shoal;
use shoal_e2e::{Hub, Proc, agent, bin, free_port, run_bin, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_devices_and_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join("hub")).await;
    let mut a = agent(
        &hub.grpc_url(),
        "cli-dev",
        &dir.path().join("spool"),
        "50ms",
        Some(20),
    );
    assert!(a.wait(Duration::from_secs(60)).await.success());

    let (ok, table, _) = shoal(&hub, &["devices", "list"]);
    assert!(ok);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("DEVICE") && lines[0].contains("STATUS"),
        "{table}"
    );
    assert!(
        // SCORE is "-": no model scores this hub's devices (missing, not zero).
        lines[1].starts_with("cli-dev")
            && lines[1].contains("online")
            && lines[1].contains(" 20 ")
            && lines[1].ends_with('-'),
        "{table}"
    );

    let (ok, json, _) = shoal(&hub, &["devices", "list", "--output", "json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["devices"][0]["device_id"], "cli-dev");
    assert_eq!(v["devices"][0]["status"], "online");
    assert_eq!(v["devices"][0]["stored_up_to_seq"], 20);

    let (ok, show, _) = shoal(&hub, &["devices", "show", "cli-dev"]);
    assert!(ok);
    for field in [
        "status",
        "online",
        "memory",
        "processes",
        "stored up to seq   20",
    ] {
        assert!(show.contains(field), "{field} in {show}");
    }

    let (ok, series, _) = shoal(
        &hub,
        &[
            "telemetry",
            "cli-dev",
            "--metric",
            "memory_used_bytes",
            "--since",
            "5m",
            "--output",
            "json",
        ],
    );
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&series).unwrap();
    let points = v["points"].as_array().unwrap();
    let counted: u64 = points.iter().map(|p| p["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 20, "every sample lands in a bucket: {series}");
    let (ok, text, _) = shoal(
        &hub,
        &[
            "telemetry",
            "cli-dev",
            "--metric",
            "memory_used_bytes",
            "--since",
            "5m",
        ],
    );
    assert!(ok && text.starts_with("TIME"), "{text}");
    assert!(
        text.lines().nth(1).is_some_and(|l| l.contains("iB")),
        "byte metrics print with binary units: {text}"
    );

    // A misspelt name, or a labelled family without its label, is an error naming the fix.
    for (metric, says) in [
        ("memory_usd_bytes", "did you mean memory_used_bytes"),
        ("disk_used_bytes", r#"disk_used_bytes{mount="/"}"#),
    ] {
        let (ok, _, err) = shoal(&hub, &["telemetry", "cli-dev", "--metric", metric]);
        assert!(!ok && err.contains(says), "{metric}: {err}");
        let refused = hub
            .get_status(&format!("/api/v1/devices/cli-dev/series?metric={metric}"))
            .await;
        assert_eq!(refused, 400, "the API refuses {metric} too");
    }

    // Raw samples page with their seqs.
    let page = hub
        .get("/api/v1/devices/cli-dev/samples?after_seq=15&limit=3")
        .await;
    let seqs: Vec<u64> = page["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![16, 17, 18]);
    assert_eq!(page["next_after_seq"], 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let (ok, _, err) = shoal(&hub, &["devices", "show", "nope"]);
    assert!(!ok);
    assert!(err.contains("no device \"nope\""), "{err}");
    let (ok, _, err) = shoal(&hub, &["telemetry", "nope", "--metric", ""]);
    assert!(!ok && err.contains("metric"), "{err}");
    let out = run_bin(
        "shoal",
        &[
            "--hub",
            &format!("http://127.0.0.1:{}", free_port()),
            "devices",
            "list",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the hub"));
    let bad = hub.get("/api/v1/devices/x/samples?limit=0").await;
    assert!(bad["error"].as_str().unwrap().contains("limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_exits_64_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("s");
    let cases: [(&str, Vec<&str>, &str); 4] = [
        (
            "shoal-agent",
            vec![
                "run",
                "--interval",
                "1ms",
                "--device-id",
                "d",
                "--spool-dir",
                spool.to_str().unwrap(),
            ],
            "interval",
        ),
        (
            "shoal-agent",
            vec![
                "run",
                "--hub",
                "mars:1",
                "--device-id",
                "d",
                "--spool-dir",
                spool.to_str().unwrap(),
            ],
            "hub",
        ),
        (
            "shoal-agent",
            vec![
                "run",
                "--device-id",
                "bad id",
                "--spool-dir",
                spool.to_str().unwrap(),
            ],
            "device-id",
        ),
        (
            "shoal",
            vec![
                "serve",
                "--stale-after",
                "10m",
                "--offline-after",
                "1m",
                "--data-dir",
                spool.to_str().unwrap(),
            ],
            "stale-after",
        ),
    ];
    let extra: [(&str, Vec<&str>, &str); 3] = [
        (
            "shoal-agent",
            vec![
                "run",
                "--hub",
                "mqtts://127.0.0.1:1",
                "--device-id",
                "d",
                "--spool-dir",
                spool.to_str().unwrap(),
            ],
            "tls-ca",
        ),
        (
            "shoal",
            vec![
                "serve",
                "--mqtt-tls-cert",
                "/nonexistent.pem",
                "--data-dir",
                spool.to_str().unwrap(),
            ],
            "mqtt-tls-cert",
        ),
        (
            "shoal",
            vec![
                "serve",
                "--mqtt-users",
                "/nonexistent",
                "--data-dir",
                spool.to_str().unwrap(),
            ],
            "mqtt-users",
        ),
    ];
    for (b, args, field) in cases.into_iter().chain(extra) {
        let out = run_bin(b, &args);
        assert_eq!(out.status.code(), Some(64), "{b} {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{b} {args:?}: {err}");
    }
    assert!(!spool.exists(), "a refused config changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_runs_a_hub_and_a_reporting_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http, mqtt) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(bin("shoal"));
    cmd.args([
        "up",
        "--interval",
        "100ms",
        "--grpc-listen",
        &format!("127.0.0.1:{grpc}"),
    ])
    .args(["--http-listen", &format!("127.0.0.1:{http}")])
    .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
    .arg("--data-dir")
    .arg(dir.path())
    .env("SHOAL_CREDENTIALS", dir.path().join("credentials.toml"))
    .stdout(std::process::Stdio::piped());
    let mut up = Proc::spawn("shoal up", cmd);
    let url = format!("http://127.0.0.1:{http}/api/v1/devices");
    let token_file = dir.path().join("hub/admin.token");
    wait_until("the local agent's samples", Duration::from_secs(30), || {
        let url = url.clone();
        let token = std::fs::read_to_string(&token_file).unwrap_or_default();
        async move {
            let Ok(r) = shoal_e2e::authed_client(token.trim())
                .get(&url)
                .send()
                .await
            else {
                return false;
            };
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            v["devices"][0]["stored_up_to_seq"].as_u64().unwrap_or(0) >= 5
                && v["devices"][0]["status"] == "online"
        }
    })
    .await;
    // Closed to anyone without the token (a web page included), open to the operator's CLI
    // with no set-up: `shoal up` saved its admin token for its own URL.
    let anonymous = shoal_e2e::http_get(&url).await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let listed = Command::new(bin("shoal"))
        .args([
            "--hub",
            &format!("http://127.0.0.1:{http}"),
            "devices",
            "list",
        ])
        .env("SHOAL_CREDENTIALS", dir.path().join("credentials.toml"))
        .env_remove("SHOAL_TOKEN")
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("online"));
    let status = up.terminate().await;
    assert!(
        status.success(),
        "shoal up stops cleanly on SIGTERM: {status}"
    );
    let mut printed = String::new();
    std::io::Read::read_to_string(up.child.stdout.as_mut().unwrap(), &mut printed).unwrap();
    assert!(
        printed.contains(&format!("http://127.0.0.1:{http}/api/v1/devices")),
        "URLs printed: {printed}"
    );
    assert!(
        printed.contains(&format!("shoal --hub http://127.0.0.1:{http} devices list")),
        "on non-default ports the printed commands carry --hub: {printed}"
    );
    assert!(printed.contains("admin token in"), "{printed}");
    assert!(
        printed.contains(&format!("dashboard  http://127.0.0.1:{http}/ ")),
        "{printed}"
    );
    assert!(dir.path().join("hub/shoal.redb").exists() && dir.path().join("agent-spool").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_request_is_counted_once_by_route_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    for path in [
        "/api/v1/jobs",
        "/api/v1/runs",
        "/api/v1/devices/nope",
        "/api/v1/devices/other",
        "/no/such/path",
    ] {
        hub.get_status(path).await;
    }
    let counted = |route: &str, status: u16| {
        format!("shoal_http_requests_total{{route=\"{route}\",status=\"{status}\"}}")
    };
    // The hub was polled on /healthz while it started: count one more from here.
    let before = hub.metric(&counted("/healthz", 200)).await;
    hub.get_status("/healthz").await;
    assert_eq!(hub.metric(&counted("/healthz", 200)).await, before + 1.0);
    assert_eq!(hub.metric(&counted("/api/v1/jobs", 200)).await, 1.0);
    assert_eq!(hub.metric(&counted("/api/v1/runs", 200)).await, 1.0);
    // One series per route template, however many ids were asked for.
    assert_eq!(hub.metric(&counted("/api/v1/devices/{id}", 404)).await, 2.0);
    assert_eq!(hub.metric(&counted("unmatched", 404)).await, 1.0);
}
