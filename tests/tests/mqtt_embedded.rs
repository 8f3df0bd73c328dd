//! The hub's embedded MQTT broker: delivery, the book's JSON form, crashes, credentials, the
//! own-topic rule and bad payloads — checked with Mosquitto's own clients.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use shoal_e2e::{
    Hub, Proc, agent_with, free_port, mqtt_messages, shoal_cli, spool_status,
    subscribed_mosquitto_sub, wait_for_spool, wait_until, which,
};

async fn hub_with_broker(dir: &Path, mqtt: u16, extra: &[&str]) -> Hub {
    let port = mqtt.to_string();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--mqtt-listen", addr.as_str()];
    args.extend_from_slice(extra);
    Hub::start_on(dir, free_port(), free_port(), &args).await
}

fn pub_(port: u16, args: &[&str]) -> Output {
    let exe = which("mosquitto_pub")
        .expect("mosquitto_pub is not installed (tests/run installs mosquitto-clients)");
    Command::new(exe)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mosquitto_pub")
}

/// A `mosquitto_sub` for `count` messages on `topic`, returned once the broker acknowledged
/// its subscription (so nothing published afterwards can miss it).
async fn sub(port: u16, topic: &str, count: u32, auth: &[&str]) -> Proc {
    let (port, count) = (port.to_string(), count.to_string());
    let args = [
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            topic,
            "-C",
            &count,
            "-F",
            "%t",
        ][..],
        auth,
    ]
    .concat();
    subscribed_mosquitto_sub(&args).await
}

async fn output_of(p: &mut Proc) -> String {
    assert!(
        p.wait(Duration::from_secs(15)).await.success(),
        "{} failed",
        p.name
    );
    let mut s = String::new();
    std::io::Read::read_to_string(p.child.stdout.as_mut().unwrap(), &mut s).unwrap();
    mqtt_messages(&s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_json_scripts_and_observers_share_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mqtt = free_port();
    let hub = hub_with_broker(&dir.path().join("hub"), mqtt, &[]).await;
    let mut watcher = sub(mqtt, "shoal/v1/devices/+/telemetry", 1, &[]).await;

    let mut a = agent_with(
        &format!("mqtt://127.0.0.1:{mqtt}"),
        "emb-dev",
        &dir.path().join("spool"),
        "20ms",
        Some(80),
        &[],
    );
    assert!(a.wait(Duration::from_secs(60)).await.success());
    assert_eq!(
        hub.stored_seqs("emb-dev").await,
        (1..=80).collect::<Vec<_>>()
    );
    assert_eq!(
        output_of(&mut watcher).await.trim(),
        "shoal/v1/devices/emb-dev/telemetry"
    );

    // The book's smon script, unchanged.
    for (temp, load) in [(48312, "0.42"), (49000, "0.50"), (47500, "0.38")] {
        let msg = format!("{{\"device\":\"pi-json\",\"temp\":{temp},\"load\":{load}}}");
        let out = pub_(mqtt, &["-i", "pi-json", "-t", "sensor/pi-json", "-m", &msg]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_until("the JSON samples", Duration::from_secs(10), || async {
        hub.stored_up_to("pi-json").await == 3
    })
    .await;
    let samples = hub.stored_samples("pi-json").await;
    assert_eq!(samples[0]["temperatures"][0]["celsius"], 48.312);
    assert_eq!(samples[2]["load"]["one"], 0.38);
    // What the book's form does not carry stays absent end to end: not stored as 0, no points.
    assert!(samples[2]["load"]["five"].is_null(), "{}", samples[2]);
    assert!(samples[2]["uptime_seconds"].is_null(), "{}", samples[2]);
    assert!(samples[2]["process_count"].is_null(), "{}", samples[2]);
    for (metric, points) in [
        ("load1", 3),
        ("load5", 0),
        ("uptime_seconds", 0),
        ("process_count", 0),
    ] {
        let series = hub
            .get(&format!(
                "/api/v1/devices/pi-json/series?metric={metric}&from=1h"
            ))
            .await;
        let counted: u64 = series["points"]
            .as_array()
            .map_or(0, |p| p.iter().filter_map(|b| b["count"].as_u64()).sum());
        assert_eq!(counted, points, "{metric}: {series}");
    }
    let device = hub.get("/api/v1/devices/pi-json").await;
    assert_eq!(device["labels"]["source"], "mqtt-json");
    // The operator's view shows what the book's form lacks as missing, not as zero.
    let (ok, shown, err) = shoal_cli(&hub, &["devices", "show", "pi-json"]);
    assert!(ok, "{err}");
    let row = |name: &str| {
        shown
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {name} row in:\n{shown}"))
    };
    assert_eq!(row("cpu"), "-", "{shown}");
    assert_eq!(row("memory"), "-", "{shown}");
    assert_eq!(row("load"), "0.38 - -", "{shown}");
    assert_eq!(row("processes"), "-", "{shown}");
    assert!(!shown.contains("0.0 B"), "{shown}");

    // JSON that names another device than its topic, and JSON that is not a sample.
    pub_(
        mqtt,
        &[
            "-t",
            "sensor/pi-json",
            "-m",
            r#"{"device":"pi-other","temp":1}"#,
        ],
    );
    pub_(mqtt, &["-t", "sensor/pi-json", "-m", "temp=48"]);
    wait_until("both refusals counted", Duration::from_secs(10), || async {
        hub.metric("shoal_ingest_streams_rejected_total{reason=\"foreign_topic\"}")
            .await
            == 1.0
            && hub
                .metric("shoal_ingest_streams_rejected_total{reason=\"malformed_message\"}")
                .await
                == 1.0
    })
    .await;
    assert_eq!(hub.stored_up_to("pi-json").await, 3);
    assert!(
        hub.get("/api/v1/devices/pi-other").await["error"].is_string(),
        "pi-other was never registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_with_embedded_broker_killed_twice_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http, mqtt) = (free_port(), free_port(), free_port());
    let addr = format!("127.0.0.1:{mqtt}");
    let args = ["--mqtt-listen", addr.as_str()];
    let mut hub = Hub::start_on(&dir.path().join("hub"), grpc, http, &args).await;
    let spool = dir.path().join("spool");
    let mut a = agent_with(
        &format!("mqtt://{addr}"),
        "emb-crash",
        &spool,
        "10ms",
        Some(300),
        &["--ack-timeout", "2s"],
    );
    for threshold in [50, 150] {
        wait_until(
            "samples before the crash",
            Duration::from_secs(30),
            || async { hub.stored_up_to("emb-crash").await >= threshold },
        )
        .await;
        hub.proc.kill9();
        // Down (broker and all) until the agent has taken samples that only its spool holds.
        let written = spool_status(&spool)["last_written_seq"].as_u64().unwrap();
        wait_for_spool(
            &spool,
            "samples taken while the hub is down",
            Duration::from_secs(30),
            |s| s["last_written_seq"].as_u64().unwrap() >= (written + 20).min(300),
        )
        .await;
        hub = Hub::start_on(&dir.path().join("hub"), grpc, http, &args).await;
    }
    assert!(a.wait(Duration::from_secs(90)).await.success());
    assert_eq!(
        hub.stored_seqs("emb-crash").await,
        (1..=300).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_the_own_topic_rule() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        "# devices\ndev-a:pa\ndev-b:pb\nwatcher:pw:observer\n",
    )
    .unwrap();
    let mqtt = free_port();
    let hub = hub_with_broker(
        &dir.path().join("hub"),
        mqtt,
        &["--mqtt-users", users.to_str().unwrap()],
    )
    .await;
    let url = format!("mqtt://127.0.0.1:{mqtt}");

    // Wrong password and no credentials are refused at CONNECT.
    let out = pub_(
        mqtt,
        &[
            "-u",
            "dev-a",
            "-P",
            "nope",
            "-t",
            "shoal/v1/devices/dev-a/telemetry",
            "-m",
            "x",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad user name or password"),
        "{out:?}"
    );
    let out = pub_(mqtt, &["-t", "shoal/v1/devices/dev-a/telemetry", "-m", "x"]);
    assert!(!out.status.success());
    assert_eq!(
        hub.metric("shoal_ingest_streams_rejected_total{reason=\"bad_credentials\"}")
            .await,
        2.0
    );
    let mut wrong = agent_with(
        &url,
        "dev-a",
        &dir.path().join("s0"),
        "20ms",
        Some(3),
        &["--mqtt-username", "dev-a", "--mqtt-password", "nope"],
    );
    // The hub counts each refusal before it answers the CONNECT: wait until it refused the
    // agent twice (it retried).
    wait_until(
        "the hub to refuse the agent's wrong password twice",
        Duration::from_secs(30),
        || async {
            hub.metric("shoal_ingest_streams_rejected_total{reason=\"bad_credentials\"}")
                .await
                >= 4.0
        },
    )
    .await;
    wrong.kill9();
    assert_eq!(
        hub.stored_up_to("dev-a").await,
        0,
        "nothing from a refused agent"
    );

    // dev-a's credentials do not open dev-b's client id (and with it dev-b's session).
    let out = pub_(
        mqtt,
        &[
            "-u",
            "dev-a",
            "-P",
            "pa",
            "-i",
            "dev-b",
            "-t",
            "shoal/v1/devices/dev-a/telemetry",
            "-m",
            "x",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not authorised"),
        "{out:?}"
    );
    assert_eq!(
        hub.metric("shoal_ingest_streams_rejected_total{reason=\"foreign_client_id\"}")
            .await,
        1.0
    );

    // An observer sees telemetry; dev-a may not publish as dev-b, nor send garbage or giants.
    let mut watcher = sub(
        mqtt,
        "shoal/v1/devices/+/telemetry",
        1,
        &["-u", "watcher", "-P", "pw"],
    )
    .await;
    let as_a = ["-u", "dev-a", "-P", "pa", "-i", "dev-a"];
    let out = pub_(
        mqtt,
        &[
            &as_a[..],
            &["-t", "shoal/v1/devices/dev-b/telemetry", "-m", "x"],
        ]
        .concat(),
    );
    assert!(out.status.success());
    let out = pub_(
        mqtt,
        &[
            &as_a[..],
            &[
                "-t",
                "shoal/v1/devices/dev-a/telemetry",
                "-m",
                "\u{1}garbage",
            ],
        ]
        .concat(),
    );
    assert!(out.status.success());
    let giant = dir.path().join("giant");
    std::fs::write(&giant, vec![b'x'; 5 * 1024 * 1024]).unwrap();
    let out = pub_(
        mqtt,
        &[
            &as_a[..],
            &[
                "-t",
                "shoal/v1/devices/dev-a/telemetry",
                "-f",
                giant.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(out.status.success());
    wait_until("each refusal counted", Duration::from_secs(10), || async {
        hub.metric("shoal_ingest_streams_rejected_total{reason=\"foreign_topic\"}")
            .await
            == 1.0
            && hub
                .metric("shoal_ingest_streams_rejected_total{reason=\"malformed_message\"}")
                .await
                == 1.0
            && hub
                .metric("shoal_ingest_streams_rejected_total{reason=\"oversized_message\"}")
                .await
                == 1.0
    })
    .await;
    assert!(
        hub.get("/api/v1/devices/dev-b").await["error"].is_string(),
        "dev-b was never registered"
    );

    // The hub keeps serving: dev-a with its own credentials gets through.
    let mut a = agent_with(
        &url,
        "dev-a",
        &dir.path().join("s1"),
        "20ms",
        Some(20),
        &["--mqtt-username", "dev-a", "--mqtt-password", "pa"],
    );
    assert!(a.wait(Duration::from_secs(60)).await.success());
    assert_eq!(hub.stored_seqs("dev-a").await, (1..=20).collect::<Vec<_>>());
    assert_eq!(
        output_of(&mut watcher).await.trim(),
        "shoal/v1/devices/dev-a/telemetry"
    );
}
