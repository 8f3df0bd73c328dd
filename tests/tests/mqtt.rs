//! MQTT transport against a real Mosquitto: delivery, hub and broker crashes, and
//! `mosquitto_sub` seeing the telemetry topic.

use std::process::Command;
use std::time::Duration;

use shoal_e2e::{
    Hub, Mosquitto, agent_with, free_port, mqtt_messages, scrape_metric, spool_status,
    subscribed_mosquitto_sub, wait_for_spool, wait_until, which,
};

fn assert_exactly(seqs: &[u64], n: u64) {
    let expected: Vec<u64> = (1..=n).collect();
    assert!(
        seqs == expected.as_slice(),
        "stored {} samples, expected exactly 1..={n}",
        seqs.len()
    );
}

async fn hub_on(dir: &std::path::Path, broker: &Mosquitto, grpc: u16, http: u16) -> Hub {
    Hub::start_on(dir, grpc, http, &["--mqtt-broker", &broker.url()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_flows_through_mosquitto_and_mosquitto_sub_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("broker")).await;
    let hub = hub_on(&dir.path().join("hub"), &broker, free_port(), free_port()).await;
    // Subscribed (Mosquitto sent its SUBACK) before the agent publishes anything.
    let mut sub = subscribed_mosquitto_sub(&[
        "-h",
        "127.0.0.1",
        "-p",
        &broker.port.to_string(),
        "-t",
        "shoal/v1/devices/+/telemetry",
        "-C",
        "1",
        "-F",
        "%t %l",
    ])
    .await;

    let mut a = agent_with(
        &broker.url(),
        "mqtt-dev",
        &dir.path().join("spool"),
        "20ms",
        Some(100),
        &[],
    );
    assert!(a.wait(Duration::from_secs(60)).await.success());
    assert_exactly(&hub.stored_seqs("mqtt-dev").await, 100);
    let device = hub.get("/api/v1/devices/mqtt-dev").await;
    assert_eq!(device["status"], "online");
    assert!(
        !device["kernel"].as_str().unwrap().is_empty(),
        "the hello arrived: {device}"
    );

    // The book's plain JSON form through Mosquitto as well.
    let pub_exe = which("mosquitto_pub").expect("mosquitto_pub is not installed");
    let out = Command::new(pub_exe)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-t",
            "sensor/pi-ext",
        ])
        .args(["-m", r#"{"device":"pi-ext","temp":51000,"load":1.5}"#])
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_until("the JSON sample", Duration::from_secs(10), || async {
        hub.stored_up_to("pi-ext").await == 1
    })
    .await;
    assert_eq!(
        hub.stored_samples("pi-ext").await[0]["temperatures"][0]["celsius"],
        51.0
    );

    assert!(sub.wait(Duration::from_secs(10)).await.success());
    let mut seen = String::new();
    std::io::Read::read_to_string(sub.child.stdout.as_mut().unwrap(), &mut seen).unwrap();
    let seen = mqtt_messages(&seen);
    assert!(
        seen.starts_with("shoal/v1/devices/mqtt-dev/telemetry "),
        "mosquitto_sub saw: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_mid_stream_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("broker")).await;
    let (grpc, http) = (free_port(), free_port());
    let mut hub = hub_on(&dir.path().join("hub"), &broker, grpc, http).await;
    let spool = dir.path().join("spool");
    let mut a = agent_with(
        &broker.url(),
        "mqtt-crash",
        &spool,
        "10ms",
        Some(400),
        &["--ack-timeout", "2s"],
    );
    wait_until(
        "samples before the crash",
        Duration::from_secs(30),
        || async { hub.stored_up_to("mqtt-crash").await >= 50 },
    )
    .await;
    hub.proc.kill9();
    // Down until the agent has taken (and published to Mosquitto) samples the dead hub never
    // saw: the restarted one must get them without loss or duplicates.
    let written = spool_status(&spool)["last_written_seq"].as_u64().unwrap();
    wait_for_spool(
        &spool,
        "samples taken while the hub is down",
        Duration::from_secs(30),
        |s| s["last_written_seq"].as_u64().unwrap() >= (written + 20).min(400),
    )
    .await;
    hub = hub_on(&dir.path().join("hub"), &broker, grpc, http).await;
    wait_until(
        "samples after the restart",
        Duration::from_secs(30),
        || async { hub.stored_up_to("mqtt-crash").await >= 200 },
    )
    .await;
    hub.proc.kill9();
    hub = hub_on(&dir.path().join("hub"), &broker, grpc, http).await;

    let status = a.wait(Duration::from_secs(90)).await;
    assert!(status.success(), "the agent drains and exits 0: {status}");
    assert_exactly(&hub.stored_seqs("mqtt-crash").await, 400);
    assert_eq!(spool_status(&spool)["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(&dir.path().join("broker")).await;
    let hub = hub_on(&dir.path().join("hub"), &broker, free_port(), free_port()).await;
    let spool = dir.path().join("spool");
    let mut a = agent_with(
        &broker.url(),
        "mqtt-broker-crash",
        &spool,
        "10ms",
        Some(300),
        &["--ack-timeout", "2s"],
    );
    wait_until(
        "samples before the broker crash",
        Duration::from_secs(30),
        || async { hub.stored_up_to("mqtt-broker-crash").await >= 50 },
    )
    .await;
    // The broker forgets everything (no persistence): the agent's spool and acks carry it.
    broker.crash_and_restart(Duration::from_millis(1000)).await;
    let status = a.wait(Duration::from_secs(90)).await;
    assert!(status.success(), "{status}");
    assert_exactly(&hub.stored_seqs("mqtt-broker-crash").await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_credentials_for_hub_and_agents() {
    let dir = tempfile::tempdir().unwrap();
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let passwords = broker_dir.join("passwd");
    let passwd_exe =
        which("mosquitto_passwd").expect("mosquitto_passwd is not installed (package mosquitto)");
    for (i, (user, pass)) in [("hub", "hub-secret"), ("dev-1", "dev-secret")]
        .into_iter()
        .enumerate()
    {
        let mut cmd = Command::new(&passwd_exe);
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd
            .arg("-b")
            .arg(&passwords)
            .args([user, pass])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&broker_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&passwords, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let conf = format!(
        "allow_anonymous false\npassword_file {}\n",
        passwords.display()
    );
    let broker = Mosquitto::start_with(&broker_dir, free_port(), &conf).await;
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &[
            "--mqtt-broker",
            &broker.url(),
            "--mqtt-username",
            "hub",
            "--mqtt-password",
            "hub-secret",
        ],
    )
    .await;

    let metrics = format!("127.0.0.1:{}", free_port());
    let mut wrong = agent_with(
        &broker.url(),
        "dev-1",
        &dir.path().join("s0"),
        "20ms",
        Some(3),
        &[
            "--mqtt-username",
            "dev-1",
            "--mqtt-password",
            "guess",
            "--metrics-listen",
            &metrics,
        ],
    );
    // Mosquitto answers the CONNECT with a refusal, which the agent counts as a failed
    // connection: wait until it was refused twice (it retried), never having been connected.
    let url = format!("http://{metrics}/metrics");
    wait_until(
        "Mosquitto to refuse the wrong password twice",
        Duration::from_secs(30),
        || async {
            scrape_metric(&url, "shoal_agent_reconnects_total")
                .await
                .is_some_and(|n| n >= 2.0)
        },
    )
    .await;
    assert_eq!(
        scrape_metric(&url, "shoal_agent_hub_connected").await,
        Some(0.0),
        "never connected"
    );
    wrong.kill9();
    assert_eq!(
        hub.stored_up_to("dev-1").await,
        0,
        "Mosquitto refused the wrong password"
    );

    let mut right = agent_with(
        &broker.url(),
        "dev-1",
        &dir.path().join("s1"),
        "20ms",
        Some(25),
        &["--mqtt-username", "dev-1", "--mqtt-password", "dev-secret"],
    );
    assert!(right.wait(Duration::from_secs(60)).await.success());
    assert_exactly(&hub.stored_seqs("dev-1").await, 25);
}
