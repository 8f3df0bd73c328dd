//! A fleet of real agents against one hub that crashes: every agent reconnects within its
//! backoff cap, and every sample it spooled arrives exactly once.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_e2e::{Hub, Proc, bin, wait_until};

/// As many agents as this two-core machine runs beside the hub and the suite.
const AGENTS: usize = 200;
/// Samples each agent takes, one a second.
const COUNT: u64 = 20;
/// The agent's reconnect backoff cap.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Every device's stored-up-to seq, from one listing.
async fn stored(hub: &Hub) -> BTreeMap<String, u64> {
    hub.get("/api/v1/devices").await["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().expect("id").to_string(),
                d["stored_up_to_seq"].as_u64().expect("seq"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_agents_reconnect_after_the_hub_is_killed_and_lose_nothing() {
    // Each agent is a descriptor or three here (its pipes) and a connection at the hub.
    shoal_hub::net::OpenFiles::raise().expect("raise the open-files limit");
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(&dir.path().join("hub")).await;
    let ids: Vec<String> = (0..AGENTS).map(|i| format!("fleet-{i:03}")).collect();
    let mut agents: Vec<Proc> = ids
        .iter()
        .map(|id| {
            let mut cmd = Command::new(bin("shoal-agent"));
            cmd.arg("run")
                .args(["--hub", &hub.grpc_url(), "--device-id", id])
                .args(["--interval", "1s", "--count", &COUNT.to_string()])
                .arg("--spool-dir")
                .arg(dir.path().join("spools").join(id))
                .stderr(Stdio::null())
                .stdout(Stdio::null());
            Proc::spawn("shoal-agent", cmd)
        })
        .collect();

    wait_until(
        "every agent to have samples stored",
        Duration::from_secs(60),
        || async {
            let s = stored(&hub).await;
            s.len() == AGENTS && s.values().all(|&seq| seq >= 2)
        },
    )
    .await;
    let before = stored(&hub).await;
    assert!(
        before.values().all(|&seq| seq < COUNT),
        "the hub is killed while agents are still sampling: {before:?}"
    );
    // SIGKILL: the agents keep sampling into their spools while it is down.
    hub.crash_and_restart(Duration::from_secs(2)).await;
    let restarted = Instant::now();
    wait_until(
        "every agent to deliver again after the restart",
        BACKOFF_CAP + Duration::from_secs(15),
        || async {
            let now = stored(&hub).await;
            before
                .iter()
                .all(|(id, &seq)| now.get(id).is_some_and(|&n| n > seq))
        },
    )
    .await;
    let back = restarted.elapsed();
    assert!(
        back < BACKOFF_CAP,
        "every agent reconnected within its backoff cap ({back:?})"
    );

    for (id, agent) in ids.iter().zip(agents.iter_mut()) {
        let status = agent.wait(Duration::from_secs(90)).await;
        assert!(
            status.success(),
            "{id} drains its spool and exits 0 (got {status})"
        );
    }
    let expected: Vec<u64> = (1..=COUNT).collect();
    for id in &ids {
        let seqs = hub.stored_seqs(id).await;
        assert_eq!(
            seqs, expected,
            "{id}: every spooled sample stored once, no gap, no duplicate"
        );
    }
    eprintln!(
        "{AGENTS} agents: every one delivering again {:.1} s after the restart",
        back.as_secs_f64()
    );
}

/// SIGTERM stops the hub while an agent streams on (HTTP/2's GOAWAY does not end a stream
/// already open, so the hub closes the connection after its drain deadline), and nothing the
/// agent sent is lost or stored twice across the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_told_to_stop_stops_while_an_agent_streams_on() {
    // 20 s of samples: the agent still streams when the drain deadline (5 s) passes.
    const SAMPLES: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (shoal_e2e::free_port(), shoal_e2e::free_port());
    let mut hub = Hub::start_on(&dir.path().join("hub"), grpc, http, &[]).await;
    let mut agent = shoal_e2e::agent_with(
        &hub.grpc_url(),
        "streaming-on",
        &dir.path().join("spool"),
        "50ms",
        Some(SAMPLES),
        &[],
    );
    wait_until(
        "samples before the stop",
        Duration::from_secs(30),
        || async { hub.stored_up_to("streaming-on").await >= 5 },
    )
    .await;
    let asked = Instant::now();
    let status = hub.proc.terminate().await;
    assert!(status.success(), "the hub stopped with {status}");
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "the hub took {:?} to stop",
        asked.elapsed()
    );
    let hub = Hub::start_on(&dir.path().join("hub"), grpc, http, &[]).await;
    agent.wait(Duration::from_secs(120)).await;
    let d = hub.get("/api/v1/devices/streaming-on").await;
    assert_eq!(d["stored_up_to_seq"], SAMPLES, "{d}");
    assert_eq!(d["stored"]["samples"], SAMPLES, "{d}");
    assert_eq!(d["stored"]["missing"], 0, "{d}");
}
