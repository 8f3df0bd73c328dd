//! Crashes and outages: nothing acknowledged is lost, nothing is stored twice.

use std::time::Duration;

use shoal_e2e::{Hub, agent, free_port, spool_status, wait_for_spool, wait_until};

fn assert_exactly(seqs: &[u64], n: u64) {
    let expected: Vec<u64> = (1..=n).collect();
    if seqs != expected.as_slice() {
        let missing: Vec<_> = expected
            .iter()
            .filter(|s| !seqs.contains(s))
            .take(10)
            .collect();
        panic!(
            "stored {} samples, expected 1..={n}; first missing: {missing:?}",
            seqs.len()
        );
    }
}

async fn assert_in_time_order(hub: &Hub, device: &str) {
    let samples = hub.stored_samples(device).await;
    let ts: Vec<i64> = samples
        .iter()
        .map(|s| s["timestamp_ms"].as_i64().expect("timestamp"))
        .collect();
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]),
        "timestamps rise with seq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_and_restarted_while_agent_samples() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(&dir.path().join("hub")).await;
    let mut agent = agent(
        &hub.grpc_url(),
        "crash-hub",
        &dir.path().join("spool"),
        "10ms",
        Some(400),
    );

    wait_until(
        "the first samples to arrive",
        Duration::from_secs(30),
        || async { hub.stored_up_to("crash-hub").await >= 50 },
    )
    .await;
    // Kill the hub mid-stream; the agent keeps sampling into its spool meanwhile.
    hub.crash_and_restart(Duration::from_millis(1500)).await;
    wait_until(
        "more samples after the restart",
        Duration::from_secs(30),
        || async { hub.stored_up_to("crash-hub").await >= 200 },
    )
    .await;
    hub.crash_and_restart(Duration::from_millis(300)).await;

    let status = agent.wait(Duration::from_secs(90)).await;
    assert!(
        status.success(),
        "the agent drains everything and exits 0 (got {status})"
    );
    assert_exactly(&hub.stored_seqs("crash-hub").await, 400);
    assert_in_time_order(&hub, "crash-hub").await;
    let spool = spool_status(&dir.path().join("spool"));
    assert_eq!(spool["pending"], 0);
    assert_eq!(spool["acked_seq"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_keeps_its_spool_and_drains_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let grpc_port = free_port();
    let http_port = free_port();
    spool_with_no_hub(grpc_port, "crash-agent", &spool, 20).await;
    let before = spool_status(&spool);
    let written = before["last_written_seq"].as_u64().unwrap();
    assert!(
        written >= 20,
        "the agent sampled while the hub was away: {before}"
    );
    assert_eq!(
        before["pending"].as_u64().unwrap(),
        written,
        "nothing was lost to SIGKILL: {before}"
    );

    let hub = Hub::start_on(&dir.path().join("hub"), grpc_port, http_port, &[]).await;
    let mut second = agent(&hub.grpc_url(), "crash-agent", &spool, "10ms", Some(25));
    let status = second.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    assert_exactly(&hub.stored_seqs("crash-agent").await, written + 25);
    assert_eq!(spool_status(&spool)["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_taken_while_the_hub_is_down_arrive_later_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let grpc_port = free_port();
    let http_port = free_port();
    let mut agent = agent(
        &format!("http://127.0.0.1:{grpc_port}"),
        "offline-first",
        &dir.path().join("spool"),
        "10ms",
        Some(150),
    );
    // The hub starts once a backlog has built up, big enough that draining it in batches
    // (checked below) is not one sample at a time.
    wait_for_spool(
        &dir.path().join("spool"),
        "a backlog in the spool",
        Duration::from_secs(30),
        |s| s["pending"].as_u64().unwrap() >= 100,
    )
    .await;
    let backlog = spool_status(&dir.path().join("spool"))["pending"]
        .as_u64()
        .unwrap();
    assert!(
        backlog >= 30,
        "samples accumulate in the spool while the hub is unreachable ({backlog})"
    );

    let hub = Hub::start_on(&dir.path().join("hub"), grpc_port, http_port, &[]).await;
    let status = agent.wait(Duration::from_secs(90)).await;
    assert!(status.success(), "{status}");
    assert_exactly(&hub.stored_seqs("offline-first").await, 150);
    assert_in_time_order(&hub, "offline-first").await;
    let batches = hub.metric("shoal_ingest_batches_total").await;
    assert!(
        batches < 150.0,
        "the backlog went in batches, not one by one ({batches} batches)"
    );
}

/// A client that sent under this device's id before it (its hub state lost, or a spoofer) left
/// the hub holding higher seqs than the agent's spool: the agent keeps every spooled sample,
/// renumbered above the hub's, and counts them; nothing waiting is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_samples_survive_a_hub_that_holds_higher_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let grpc_port = free_port();
    let http_port = free_port();
    spool_with_no_hub(grpc_port, "pi-7", &spool, 16).await;
    let spooled = spool_status(&spool)["pending"].as_u64().unwrap();

    let hub = Hub::start_on(&dir.path().join("hub"), grpc_port, http_port, &[]).await;
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 60_000;
    shoal_e2e::ingest(&hub.grpc_url(), "pi-7", 100, move |seq| {
        shoal_e2e::pi_sample(seq, start_ms, 10, 40.0)
    })
    .await
    .unwrap();
    assert_eq!(hub.stored_up_to("pi-7").await, 100);

    let mut second = agent(&hub.grpc_url(), "pi-7", &spool, "10ms", Some(5));
    let status = second.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    let seqs = hub.stored_seqs("pi-7").await;
    assert_eq!(
        seqs.len() as u64,
        100 + spooled + 5,
        "every spooled sample arrived, above the hub's seqs"
    );
    assert_eq!(*seqs.last().unwrap(), 100 + spooled + 5);
    assert_eq!(spool_status(&spool)["pending"], 0);
}

/// Runs an agent for `device` against `grpc_port`, where no hub listens yet, until it has
/// spooled at least `samples`, then SIGKILLs it: a spool full of samples no hub has seen.
async fn spool_with_no_hub(grpc_port: u16, device: &str, spool: &std::path::Path, samples: u64) {
    let mut agent = agent(
        &format!("http://127.0.0.1:{grpc_port}"),
        device,
        spool,
        "10ms",
        None,
    );
    wait_for_spool(
        spool,
        "samples spooled with no hub",
        Duration::from_secs(30),
        |s| s["last_written_seq"].as_u64().unwrap() >= samples,
    )
    .await;
    agent.kill9();
}
