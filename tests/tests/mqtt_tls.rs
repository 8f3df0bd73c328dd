//! MQTT over TLS, to the embedded broker and to a real Mosquitto.

use std::process::{Command, Stdio};
use std::time::Duration;

use shoal_e2e::{
    Hub, Mosquitto, TestCerts, agent_with, free_port, scrape_metric, wait_until, which,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::make(&dir.path().join("certs"));
    let other = TestCerts::make(&dir.path().join("other-ca"));
    let mqtt = free_port();
    let addr = format!("127.0.0.1:{mqtt}");
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &[
            "--mqtt-listen",
            &addr,
            "--mqtt-tls-cert",
            certs.cert.to_str().unwrap(),
            "--mqtt-tls-key",
            certs.key.to_str().unwrap(),
        ],
    )
    .await;
    let url = format!("mqtts://{addr}");

    let mut a = agent_with(
        &url,
        "tls-dev",
        &dir.path().join("s1"),
        "20ms",
        Some(30),
        &["--tls-ca", certs.ca.to_str().unwrap()],
    );
    assert!(a.wait(Duration::from_secs(60)).await.success());
    assert_eq!(
        hub.stored_seqs("tls-dev").await,
        (1..=30).collect::<Vec<_>>()
    );

    // Mosquitto's client over TLS, with the book's JSON.
    let pub_exe = which("mosquitto_pub").expect("mosquitto_pub is not installed");
    let json = r#"{"device":"tls-json","temp":40000,"load":0.1}"#;
    let out = Command::new(&pub_exe)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.to_string(),
            "--cafile",
            certs.ca.to_str().unwrap(),
            "-q",
            "1",
        ])
        .args(["-t", "sensor/tls-json", "-m", json])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the JSON sample over TLS",
        Duration::from_secs(10),
        || async { hub.stored_up_to("tls-json").await == 1 },
    )
    .await;

    // Plain MQTT to the TLS port, and an agent that does not trust the broker: nothing gets in.
    let out = Command::new(&pub_exe)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.to_string(),
            "-q",
            "1",
            "-t",
            "sensor/plain",
            "-m",
            r#"{"device":"plain","temp":1}"#,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "plain MQTT is refused on a TLS listener"
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut distrust = agent_with(
        &url,
        "tls-wrong-ca",
        &dir.path().join("s2"),
        "20ms",
        Some(3),
        &[
            "--tls-ca",
            other.ca.to_str().unwrap(),
            "--metrics-listen",
            &metrics,
        ],
    );
    // Its TLS handshakes fail (it does not trust the hub's certificate), each counted as a
    // failed connection: wait until it tried twice, never having been connected.
    let agent_metrics = format!("http://{metrics}/metrics");
    wait_until(
        "the agent to fail its TLS handshake twice",
        Duration::from_secs(30),
        || async {
            scrape_metric(&agent_metrics, "shoal_agent_reconnects_total")
                .await
                .is_some_and(|n| n >= 2.0)
        },
    )
    .await;
    assert_eq!(
        scrape_metric(&agent_metrics, "shoal_agent_hub_connected").await,
        Some(0.0),
        "never connected"
    );
    distrust.kill9();
    assert!(hub.get("/api/v1/devices/tls-wrong-ca").await["error"].is_string());
    assert!(hub.get("/api/v1/devices/plain").await["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::make(&dir.path().join("certs"));
    let conf = format!(
        "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n",
        certs.ca.display(),
        certs.cert.display(),
        certs.key.display()
    );
    let broker = Mosquitto::start_with(&dir.path().join("broker"), free_port(), &conf).await;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let ca = certs.ca.to_str().unwrap();
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--mqtt-broker", &url, "--mqtt-tls-ca", ca],
    )
    .await;
    let mut a = agent_with(
        &url,
        "mosq-tls",
        &dir.path().join("spool"),
        "20ms",
        Some(40),
        &["--tls-ca", ca],
    );
    assert!(a.wait(Duration::from_secs(60)).await.success());
    assert_eq!(
        hub.stored_seqs("mosq-tls").await,
        (1..=40).collect::<Vec<_>>()
    );
}
