//! The Kubernetes manifests under deploy/kubernetes render with `kubectl kustomize` and pass
//! the Kubernetes 1.32 schemas offline (`kubernetes-validate --strict`).

use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_e2e::which;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn render(dir: &str) -> String {
    let kubectl =
        which("kubectl").expect("kubectl is not installed (tests/run installs kubernetes-client)");
    let out = Command::new(kubectl)
        .args(["kustomize"])
        .arg(repo().join(dir))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn validate(file: &Path) -> (bool, String) {
    shoal_e2e::kube_validate(file)
}

/// Renders `dir` and asserts it passes the schemas.
fn render_validated(dir: &str) -> String {
    let yaml = render(dir);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let (ok, report) = validate(&file);
    assert!(ok, "{dir} fails the Kubernetes schemas:\n{report}");
    yaml
}

/// Renders the base or an overlay of it, validates it and checks the base's kinds are there.
fn render_and_validate(dir: &str) -> String {
    let yaml = render_validated(dir);
    for kind in [
        "Namespace",
        "StatefulSet",
        "Service",
        "Ingress",
        "DaemonSet",
    ] {
        assert!(
            yaml.contains(&format!("kind: {kind}\n")),
            "{dir} renders a {kind}"
        );
    }
    yaml
}

#[test]
fn base_renders_and_validates() {
    let yaml = render_and_validate("deploy/kubernetes/base");
    assert!(yaml.contains("--mqtt-listen=0.0.0.0:1883"));
    assert!(
        yaml.contains("fieldPath: spec.nodeName"),
        "device id = node name"
    );
    assert!(
        yaml.contains("value: https://shoal-hub.shoal.svc:50051")
            && yaml.contains("--grpc-tls-name=shoal-hub.shoal.svc")
            && yaml.contains("--enroll-token-file=/etc/shoal/enroll/$(SHOAL_DEVICE_ID)")
            && yaml.contains("secretName: shoal-agent-enrollment"),
        "agents enroll per node and report over TLS to a name the hub's certificate covers"
    );
    assert!(
        yaml.contains("--kube-in-cluster")
            && yaml.contains("serviceAccountName: shoal-hub")
            && yaml.contains("resources:\n  - jobs/status"),
        "the hub runs Kubernetes jobs with its own, namespaced permissions"
    );
    probes_tell_liveness_from_readiness(&yaml);
}

/// Readiness is `/readyz` (ready only while the store takes writes), liveness `/healthz` (a
/// full disk is no reason to restart the hub), for every hub.
fn probes_tell_liveness_from_readiness(yaml: &str) {
    let probes: Vec<(&str, &str)> = yaml
        .split("Probe:")
        .zip(yaml.split("Probe:").skip(1))
        .map(|(before, after)| {
            let kind = before.rsplit(char::is_whitespace).next().unwrap_or("");
            let path = after
                .lines()
                .find_map(|l| l.trim().strip_prefix("path: "))
                .unwrap_or("");
            (kind, path)
        })
        .filter(|(_, path)| path.ends_with("z"))
        .collect();
    assert!(!probes.is_empty(), "the hub has probes");
    for (kind, path) in probes {
        match kind {
            "readiness" => assert_eq!(path, "/readyz"),
            "liveness" => assert_eq!(path, "/healthz"),
            other => panic!("unexpected probe {other:?} on {path}"),
        }
    }
}

#[test]
fn pi_overlay_places_the_agent_like_smon() {
    let yaml = render_and_validate("deploy/kubernetes/overlays/pi");
    assert!(yaml.contains("kubernetes.io/role: sensor"));
    assert!(
        yaml.contains("key: dedicated")
            && yaml.contains("value: pi")
            && yaml.contains("effect: NoSchedule")
    );
    assert!(yaml.contains("--interval=15s"), "the book's 15 s cadence");
}

#[test]
fn gpu_overlay_uses_the_nvidia_runtime() {
    let yaml = render_and_validate("deploy/kubernetes/overlays/gpu");
    assert!(yaml.contains("runtimeClassName: nvidia"));
    assert!(yaml.contains("NVIDIA_DRIVER_CAPABILITIES") && yaml.contains("value: utility"));
}

#[test]
fn chain_renders_and_validates() {
    let yaml = render_validated("deploy/kubernetes/chain");
    for kind in [
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert!(
            yaml.contains(&format!("kind: {kind}\n")),
            "the chain renders a {kind}"
        );
    }
    assert!(
        !yaml.contains("kind: Namespace\n"),
        "deleting the chain must not delete the hub's namespace"
    );
    assert!(
        !yaml.contains("kind: Secret\n"),
        "validator keys are never committed: the operator makes the Secrets"
    );
    assert!(yaml.contains("replicas: 4\n"), "four QBFT validators");
    let images: Vec<&str> = yaml
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image: "))
        .collect();
    assert!(
        images.contains(&"hyperledger/besu:25.12.0"),
        "Besu at a pinned release: {images:?}"
    );
    for &image in &images {
        let name = image.rsplit('/').next().unwrap_or(image);
        let tag = name.split_once(':').map(|(_, tag)| tag);
        assert!(
            tag.is_some_and(|tag| tag != "latest"),
            "{image} is pinned to a version"
        );
    }
    assert!(
        yaml.contains("--rpc-http-api=ETH,NET,WEB3,QBFT"),
        "the RPC serves the hub and no admin or debug API"
    );
    assert!(
        yaml.contains("--host-allowlist=") && yaml.contains("besu-rpc.shoal.svc"),
        "the RPC answers the name the hub calls it by"
    );
    assert!(
        yaml.contains("--node-private-key-file=/keys/$(POD_NAME)")
            && yaml.contains("secretName: besu-validator-keys"),
        "each validator signs with its own key from the Secret"
    );
    assert!(
        yaml.contains("genesis.json: |") && yaml.contains("\"qbft\""),
        "the genesis ConfigMap is a QBFT genesis"
    );
    assert!(
        yaml.contains("besu-0.besu.shoal.svc:30303") && yaml.contains("clusterIP: None"),
        "the validators find each other by their stable names"
    );
    assert!(
        yaml.contains("name: ethstats\n")
            && yaml.contains("--ethstats=ws://$(POD_NAME):$(ETHSTATS_SECRET)@ethstats:3000"),
        "every validator reports to the ethstats dashboard"
    );
    assert!(
        yaml.contains("kind: NetworkPolicy\n")
            && yaml.contains("app.kubernetes.io/name: shoal-hub")
            && yaml.contains("port: 8545")
            && yaml.contains("port: 30303"),
        "JSON-RPC only from the hub, p2p only between validators"
    );
}

#[test]
fn the_validator_catches_a_broken_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("broken.yaml");
    let broken = render("deploy/kubernetes/overlays/pi").replace("nodeSelector:", "nodeSelektor:");
    std::fs::write(&file, broken).unwrap();
    let (ok, report) = validate(&file);
    assert!(
        !ok,
        "a misspelt field must fail strict validation:\n{report}"
    );
}

#[test]
fn data_platform_renders_and_validates() {
    let yaml = render_validated("deploy/kubernetes/platform");
    for name in [
        "name: kafka\n",
        "name: elasticsearch\n",
        "name: kibana\n",
        "name: minio\n",
        "name: kafka-topics\n",
        "name: kibana-setup\n",
    ] {
        assert!(yaml.contains(name), "the platform renders {name}");
    }
    assert!(
        !yaml.contains("kind: Secret\n") && !yaml.contains("kind: Namespace\n"),
        "no credentials committed, and the hub's namespace is not the platform's to delete"
    );
    assert!(yaml.contains("--partitions=12") && yaml.contains("min.insync.replicas=2"));
    assert!(
        yaml.contains("KAFKA_PROCESS_ROLES") && yaml.contains("broker,controller"),
        "KRaft"
    );
    let images: Vec<&str> = yaml
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image: "))
        .collect();
    for &image in &images {
        let tag = image.rsplit_once(':').map(|(_, t)| t);
        assert!(
            tag.is_some_and(|t| t != "latest" && !t.contains('/')),
            "{image} is pinned to a version"
        );
    }
    // The Kibana saved objects: a sensor-* data view on @timestamp, and a dashboard whose
    // panels all resolve to objects in the same file.
    let ndjson = std::fs::read_to_string(
        repo().join("deploy/kubernetes/platform/kibana/shoal-fleet.ndjson"),
    )
    .unwrap();
    let objects: Vec<serde_json::Value> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = objects.iter().map(|o| o["id"].as_str().unwrap()).collect();
    let view = objects
        .iter()
        .find(|o| o["type"] == "index-pattern")
        .unwrap();
    assert_eq!(view["attributes"]["title"], "sensor-*");
    assert_eq!(view["attributes"]["timeFieldName"], "@timestamp");
    let dashboard = objects.iter().find(|o| o["type"] == "dashboard").unwrap();
    let panels: Vec<serde_json::Value> =
        serde_json::from_str(dashboard["attributes"]["panelsJSON"].as_str().unwrap()).unwrap();
    assert!(panels.len() >= 4);
    for o in &objects {
        for r in o["references"].as_array().unwrap() {
            assert!(ids.contains(&r["id"].as_str().unwrap()), "{r} resolves");
        }
    }
    // Every field the visualizations use is one the sink's index template maps.
    let fields = serde_json::Value::Array(objects.clone()).to_string();
    for field in [
        "cpu_percent",
        "memory_used_bytes",
        "pi_soc_temperature_celsius",
        "device_id",
    ] {
        assert!(fields.contains(field), "{field}");
    }
}

#[test]
fn scale_out_overlay_wires_the_hubs_to_the_platform() {
    let yaml = render_and_validate("deploy/kubernetes/overlays/scale-out");
    probes_tell_liveness_from_readiness(&yaml);
    assert!(yaml.contains("--sink=kafka://kafka-0.kafka-headless.shoal.svc:9092"));
    assert!(yaml.contains("--ingest-from=kafka://") && yaml.contains("group=shoal-hubs"));
    assert!(
        yaml.contains("--sink=elasticsearch+http://elastic:$(ELASTIC_PASSWORD)@elasticsearch:9200")
    );
    assert!(yaml.contains("name: shoal-hub-consumer\n"));
    // The flags the manifests give parse as `shoal serve` flags.
    for line in yaml.lines() {
        let line = line.trim();
        if let Some(url) = line.strip_prefix("- --sink=") {
            let url = url.replace("$(ELASTIC_PASSWORD)", "secret");
            shoal_hub::platform::SinkSpec::parse(&url).unwrap_or_else(|e| panic!("{e}"));
        }
        if let Some(url) = line.strip_prefix("- --ingest-from=") {
            shoal_hub::platform::consume::IngestFrom::parse(url).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
