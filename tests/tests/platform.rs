//! The data platform against real engines: a Kafka broker (nisshi) read back by kafka-python,
//! the OpenSearch REST API (osmem-server) read back by opensearch-py, faults injected by a proxy
//! between the hub and the server, and hubs in a Kafka consumer group.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_e2e::*;

/// Samples each agent sends.
const N: u64 = 120;

async fn sinks(hub: &Hub) -> Vec<Value> {
    hub.get("/api/v1/sinks").await["sinks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn sink(hub: &Hub, name: &str) -> Value {
    sinks(hub)
        .await
        .into_iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no sink {name}"))
}

/// Waits until sink `name`'s last error says `needle`.
async fn wait_sink_error(hub: &Hub, name: &str, needle: &str) {
    wait_until(
        &format!("{name}'s error: {needle}"),
        Duration::from_secs(30),
        || async {
            sink(hub, name).await["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(needle))
        },
    )
    .await;
}

/// The hub's `/metrics` text.
async fn metrics_text(hub: &Hub) -> String {
    http_get(&format!("{}/metrics", hub.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until every agent's samples are stored and every sink has delivered them.
async fn wait_delivered(hub: &Hub, devices: &[String], n: u64, timeout: Duration) {
    for d in devices {
        wait_until(&format!("{d}'s {n} samples stored"), timeout, || async {
            hub.stored_up_to(d).await >= n
        })
        .await;
    }
    wait_until("every sink caught up", timeout, || async {
        let s = sinks(hub).await;
        !s.is_empty() && s.iter().all(|s| s["lag_entries"] == 0)
    })
    .await;
}

/// One agent per device (a sample every 25 ms, `n` of them, label site=north).
fn agents(hub: &Hub, dir: &std::path::Path, devices: &[String], n: u64) -> Vec<Proc> {
    devices
        .iter()
        .map(|d| {
            agent_with(
                &hub.grpc_url(),
                d,
                &dir.join(format!("spool-{d}")),
                "25ms",
                Some(n),
                &["--label", "site=north"],
            )
        })
        .collect()
}

fn hub_flags(extra: &[String]) -> Vec<&str> {
    let mut flags = vec!["--no-auth"];
    flags.extend(extra.iter().map(String::as_str));
    flags
}

fn by_device(messages: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in messages {
        let seq = m["seq"]
            .as_u64()
            .or_else(|| m["json"]["sample"]["seq"].as_u64());
        if let Some(seq) = seq {
            out.entry(m["key"].as_str().unwrap().to_string())
                .or_default()
                .push(seq);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_sink_delivers_every_sample_once_in_order_through_broker_and_hub_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let mut kafka = Kafka::start(&dir.path().join("kafka")).await;
    let brokers = kafka.brokers();
    let extra = vec![
        "--sink".to_string(),
        format!("kafka://{brokers}/shoal.telemetry.v1?max_backoff=1s"),
        "--sink".to_string(),
        format!("kafka://{brokers}/shoal.telemetry.json?format=json&name=json&max_backoff=1s"),
    ];
    let (grpc, http) = (free_port(), free_port());
    let data = dir.path().join("hub");
    let mut hub = Hub::start_on(&data, grpc, http, &hub_flags(&extra)).await;
    let devices: Vec<String> = (1..=3).map(|i| format!("dev-{i}")).collect();
    let _agents = agents(&hub, dir.path(), &devices, N);

    // The topics do not exist yet: the sinks say so, and keep everything for later.
    wait_sink_error(&hub, "kafka", "\"shoal.telemetry.v1\" does not exist").await;
    let (ok, text, _) = shoal_cli(&hub, &["sinks", "status"]);
    assert!(
        ok && text.contains("does not exist") && text.contains("retrying"),
        "{text}"
    );
    assert!(
        hub.stored_up_to("dev-1").await > 0,
        "ingest goes on without the sink"
    );
    kafka.create_topic("shoal.telemetry.v1", 3);
    kafka.create_topic("shoal.telemetry.json", 2);
    wait_until("deliveries to start", Duration::from_secs(30), || async {
        sink(&hub, "kafka").await["delivered_total"]
            .as_u64()
            .unwrap_or(0)
            > 20
    })
    .await;

    // The broker dies mid-stream and comes back with its log.
    kafka.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kafka.restart().await;
    // Then the hub dies mid-stream (SIGKILL) and comes back on the same store.
    let before = sink(&hub, "kafka").await["delivered_total"]
        .as_u64()
        .unwrap();
    wait_until(
        "deliveries after the broker's restart",
        Duration::from_secs(60),
        || async {
            sink(&hub, "kafka").await["delivered_total"]
                .as_u64()
                .unwrap()
                > before
        },
    )
    .await;
    hub.proc.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    hub = Hub::start_on(&data, grpc, http, &hub_flags(&extra)).await;

    wait_delivered(&hub, &devices, N, Duration::from_secs(120)).await;
    let status = sinks(&hub).await;
    for s in &status {
        assert_eq!(s["state"], "caught-up", "{s}");
        assert_eq!(s["lag_seconds"], 0.0, "{s}");
    }

    // Read back by an independent client: every sample once, in order per device, each
    // device in the partition Kafka's own partitioner gives its key.
    let messages = kafka.read("shoal.telemetry.v1");
    assert!(messages.iter().all(|m| m["partition_ok"] == true));
    let hubs: BTreeSet<&str> = messages
        .iter()
        .map(|m| m["headers"]["shoal.hub"].as_str().unwrap())
        .collect();
    assert_eq!(hubs.len(), 1, "one hub id across the restart");
    let seqs = by_device(&messages);
    let want: Vec<u64> = (1..=N).collect();
    for d in &devices {
        assert_eq!(seqs.get(d), Some(&want), "{d}: every sample once, in order");
    }
    // Outbox offsets rise within every partition (nothing reordered, nothing repeated).
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for m in &messages {
        let p = m["partition"].as_u64().unwrap();
        let o: u64 = m["headers"]["shoal.offset"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            last.get(&p).is_none_or(|&prev| o > prev),
            "partition {p}: {o} after {last:?}"
        );
        last.insert(p, o);
    }
    let hellos = messages
        .iter()
        .filter(|m| m["headers"]["shoal.kind"] == "event")
        .count();
    assert!(
        hellos >= devices.len(),
        "the devices' hellos are events too"
    );

    // The JSON encoding carries the same samples, and the events by kind.
    let json_messages = kafka.read("shoal.telemetry.json");
    let seqs = by_device(&json_messages);
    for d in &devices {
        assert_eq!(seqs.get(d), Some(&want), "{d} (JSON)");
    }
    let sample = json_messages
        .iter()
        .find(|m| m["json"]["kind"] == "sample")
        .unwrap();
    assert_eq!(sample["json"]["device_id"], sample["key"]);
    assert!(sample["json"]["sample"]["timestamp_ms"].as_i64().unwrap() > 0);
    let hello = json_messages
        .iter()
        .find(|m| m["json"]["event"] == "hello")
        .expect("a hello event");
    assert_eq!(hello["json"]["hello"]["labels"]["site"], "north");

    let metrics = metrics_text(&hub).await;
    assert!(
        metrics.contains("shoal_sink_lag_entries{sink=\"kafka\",kind=\"kafka\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elasticsearch_sink_indexes_every_sample_once_through_faults() {
    let dir = tempfile::tempdir().unwrap();
    let es = Osmem::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", es.port)).await;
    // Forty days ago: an index whose cpu_percent takes no numbers, so that month's documents
    // are refused for good (mapper_parsing_exception).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let old_start = now_ms - 40 * 86_400_000;
    let old_index = format!("sensor-{}", shoal_hub_month(old_start + 86_400_000));
    es.create_index(
        &old_index,
        json!({"properties": {"cpu_percent": {"type": "boolean"}}}),
    );
    // The first request (installing the template) fails, and then every kind of fault in
    // turn meets the first bulk requests.
    proxy.inject("/_index_template", &[Fault::Unavailable]);
    proxy.inject(
        "/_bulk",
        &[
            Fault::TooMany(1),
            Fault::TooLarge,
            Fault::Garbage,
            Fault::CloseMidResponse,
            Fault::Slow(Duration::from_secs(3)),
            Fault::Unavailable,
        ],
    );
    let extra = vec![
        "--sink".to_string(),
        format!(
            "elasticsearch+http://{}?timeout=2s&max_backoff=1s&batch=100",
            proxy.url()
        ),
    ];
    // The hub cannot write its dead-letter file at first (a file where its folder goes, as on
    // a full or read-only disk): the batch with refused documents fails and waits.
    std::fs::create_dir_all(dir.path().join("hub")).unwrap();
    std::fs::write(dir.path().join("hub/sinks"), "in the way").unwrap();
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &hub_flags(&extra),
    )
    .await;
    let mut devices: Vec<String> = (1..=2).map(|i| format!("pi-{i}")).collect();
    let _agents = agents(&hub, dir.path(), &devices, N);
    ingest(&hub.grpc_url(), "old-1", 10, move |seq| {
        pi_sample(seq, old_start, 60_000, 0.0)
    })
    .await
    .unwrap();
    wait_until("the faults used", Duration::from_secs(60), || async {
        proxy.pending() == 0
    })
    .await;
    wait_sink_error(&hub, "elasticsearch", "cannot write the dead-letter file").await;
    assert!(
        sink(&hub, "elasticsearch").await["lag_entries"]
            .as_u64()
            .unwrap()
            > 0
    );
    std::fs::remove_file(dir.path().join("hub/sinks")).unwrap();
    wait_delivered(&hub, &devices, N, Duration::from_secs(120)).await;
    // The server unreachable: what is stored meanwhile waits in the store.
    proxy.set_down(true);
    ingest(&hub.grpc_url(), "late-1", N, move |seq| {
        pi_sample(seq, now_ms, 10, 0.0)
    })
    .await
    .unwrap();
    wait_until("the sink to notice", Duration::from_secs(30), || async {
        sink(&hub, "elasticsearch").await["state"] == "retrying"
    })
    .await;
    assert!(
        sink(&hub, "elasticsearch").await["lag_entries"]
            .as_u64()
            .unwrap()
            > 0
    );
    proxy.set_down(false);
    devices.push("late-1".into());

    wait_delivered(&hub, &devices, N, Duration::from_secs(120)).await;
    let status = sink(&hub, "elasticsearch").await;
    assert_eq!(status["dead_letters_total"], 10, "{status}");
    assert!(status["errors_total"].as_u64().unwrap() >= 5, "{status}");
    assert!(
        status["already_present_total"].as_u64().unwrap() >= 1,
        "the batch whose answer was cut off was sent again and found there: {status}"
    );

    // Read back by an independent client: every sample exactly once.
    let dump = es.dump("sensor-*", "pi-1");
    let docs = dump["docs"].as_array().unwrap();
    let ids: BTreeSet<&str> = docs.iter().map(|d| d["_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), docs.len(), "no duplicates");
    assert_eq!(dump["count"].as_u64().unwrap(), 3 * N);
    let mut seqs: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for d in docs {
        seqs.entry(d["device_id"].as_str().unwrap())
            .or_default()
            .push(d["seq"].as_u64().unwrap());
    }
    for d in &devices {
        let mut got = seqs.remove(d.as_str()).unwrap_or_default();
        got.sort();
        assert_eq!(got, (1..=N).collect::<Vec<_>>(), "{d}");
        assert!(ids.contains(format!("{d}-1").as_str()));
    }
    assert!(seqs.is_empty(), "only the agents' samples: {seqs:?}");
    // Mappings as declared by the template, in this month's index.
    let (index, mapping) = dump["mappings"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| **k != old_index)
        .unwrap();
    assert!(index.starts_with("sensor-20"), "{index}");
    let props = &mapping["properties"];
    assert_eq!(props["@timestamp"]["type"], "date");
    assert_eq!(props["device_id"]["type"], "keyword");
    assert_eq!(props["cpu_percent"]["type"], "double");
    assert_eq!(props["memory_used_bytes"]["type"], "long");
    assert_eq!(props["labels"]["properties"]["site"]["type"], "keyword");
    assert_eq!(dump["sample"]["labels"]["site"], "north");

    // The refused documents are in the dead-letter file, with the server's reason.
    let dead =
        std::fs::read_to_string(dir.path().join("hub/sinks/elasticsearch.dead-letter.jsonl"))
            .unwrap();
    let dead: Vec<Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 10);
    assert!(dead.iter().all(|d| d["index"] == old_index.as_str()
        && d["error"]["type"] == "mapper_parsing_exception"
        && d["document"]["device_id"] == "old-1"));
    let (ok, text, _) = shoal_cli(&hub, &["sinks", "status"]);
    assert!(ok && text.contains("dead letters in"), "{text}");
}

/// `YYYY-MM` of a Unix time in ms (UTC), computed independently of the hub.
fn shoal_hub_month(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hubs_in_a_consumer_group_split_the_topic_and_take_over_from_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = Kafka::start(&dir.path().join("kafka")).await;
    let brokers = kafka.brokers();
    kafka.create_topic("shoal.telemetry.v1", 4);
    let es = Osmem::start().await;
    // The edge hub takes the agents and writes the topic.
    let edge_flags = vec![
        "--sink".to_string(),
        format!("kafka://{brokers}?max_backoff=1s"),
    ];
    let edge = Hub::start_on(
        &dir.path().join("edge"),
        free_port(),
        free_port(),
        &hub_flags(&edge_flags),
    )
    .await;
    // Two hubs in one consumer group read it, and index into the same Elasticsearch.
    let group_flags = vec![
        "--ingest-from".to_string(),
        format!("kafka://{brokers}?group=central"),
        "--sink".to_string(),
        format!("elasticsearch+http://127.0.0.1:{}?max_backoff=1s", es.port),
    ];
    let (a_grpc, a_http) = (free_port(), free_port());
    let mut a = Hub::start_on(
        &dir.path().join("a"),
        a_grpc,
        a_http,
        &hub_flags(&group_flags),
    )
    .await;
    let b = Hub::start_on(
        &dir.path().join("b"),
        free_port(),
        free_port(),
        &hub_flags(&group_flags),
    )
    .await;
    let devices: Vec<String> = (1..=6).map(|i| format!("dev-{i}")).collect();
    // 10 s of samples: the devices are still sending when a member dies.
    let n = 400;
    let _agents = agents(&edge, dir.path(), &devices, n);
    // Both members get a share of the devices.
    let count = |h: &Hub| {
        let url = format!("{}/api/v1/devices", h.http_url());
        async move {
            let v: Value = http_get(&url).await.unwrap().json().await.unwrap();
            v["devices"].as_array().map_or(0, |d| d.len())
        }
    };
    wait_until(
        "both group members ingesting",
        Duration::from_secs(60),
        || async { count(&a).await > 0 && count(&b).await > 0 },
    )
    .await;
    // One member dies (SIGKILL, uncommitted offsets and all); the other takes its partitions.
    a.proc.kill9();
    wait_delivered(&edge, &devices, n, Duration::from_secs(120)).await;
    wait_until(
        "the survivor has every device",
        Duration::from_secs(90),
        || async { count(&b).await == devices.len() },
    )
    .await;
    for d in &devices {
        wait_until(
            &format!("{d}'s last samples on the survivor"),
            Duration::from_secs(60),
            || async { b.stored_up_to(d).await >= n },
        )
        .await;
    }
    // The dead hub comes back with its disk: what it had stored but not yet forwarded goes
    // out now (its offsets were committed once its store had them).
    a = Hub::start_on(
        &dir.path().join("a"),
        a_grpc,
        a_http,
        &hub_flags(&group_flags),
    )
    .await;
    for h in [&a, &b] {
        wait_until(
            "the group's sinks caught up",
            Duration::from_secs(60),
            || async { sinks(h).await.iter().all(|s| s["lag_entries"] == 0) },
        )
        .await;
    }
    // Downstream, every sample exactly once.
    let dump = es.dump("sensor-*", "dev-1");
    let docs = dump["docs"].as_array().unwrap();
    let ids: BTreeSet<&str> = docs.iter().map(|d| d["_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), docs.len());
    assert_eq!(ids.len() as u64, devices.len() as u64 * n, "nothing lost");
    let metrics = metrics_text(&b).await;
    assert!(
        metrics.contains("shoal_kafka_ingest_commits_total"),
        "{metrics}"
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_come_from_flags_or_a_config_file_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let data = data.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--sink", "redis://h:1"],
            "invalid sink: unknown sink scheme \"redis\"",
        ),
        (vec!["--sink", "kafka://h/t"], "\"h\" is not HOST:PORT"),
        (
            vec!["--sink", "kafka://h:1/t", "--ingest-from", "kafka://h:1/t"],
            "every sample would come back to it",
        ),
        (
            vec!["--ingest-from", "kafka://h:1/t?partition=3"],
            "invalid ingest-from",
        ),
    ] {
        let mut all = vec!["serve", "--no-auth", "--data-dir", data];
        all.extend(args);
        let out = run_bin("shoal", &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{all:?}: {stderr}");
        assert!(stderr.contains(says), "{all:?}: {stderr}");
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "sinks = [\"kafka://h:1\"]\n").unwrap();
    let out = run_bin("shoal", &["serve", "--config", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("unknown setting \"sinks\""), "{stderr}");

    // The same settings from a file; a flag on the command line adds a sink of its own.
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "no-auth = true\nsink = [\"kafka://127.0.0.1:1/fleet?name=lake&max_backoff=1s\"]\n",
    )
    .unwrap();
    let es = Osmem::start().await;
    let extra = [
        "--config".to_string(),
        config.to_str().unwrap().to_string(),
        "--sink".to_string(),
        format!("elasticsearch+http://127.0.0.1:{}", es.port),
    ];
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &extra.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let names: Vec<String> = sinks(&hub)
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["lake", "elasticsearch"]);
    // A broker nobody listens on: named in the status, retried, ingest unaffected.
    ingest(&hub.grpc_url(), "d1", 50, |seq| {
        pi_sample(seq, 1_700_000_000_000, 1_000, 0.0)
    })
    .await
    .unwrap();
    wait_sink_error(&hub, "lake", "127.0.0.1:1").await;
    let lake = sink(&hub, "lake").await;
    assert_eq!(lake["state"], "retrying");
    assert_eq!(
        lake["lag_entries"], 51,
        "the hello and 50 samples wait: {lake}"
    );
    assert!(lake["lag_seconds"].as_f64().unwrap() > 0.0);
    wait_until(
        "the other sink unaffected",
        Duration::from_secs(30),
        || async { sink(&hub, "elasticsearch").await["lag_entries"] == 0 },
    )
    .await;
}
