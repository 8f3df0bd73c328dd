//! Device identity, end to end against real `shoal serve` and `shoal-agent` processes: a
//! device enrolls with a one-time token and reports over TLS with its own certificate; every
//! way around that (no TLS, no certificate, another CA's certificate, another device's
//! certificate, a reused or expired token, a wrong CA fingerprint) is refused and counted;
//! certificates renew before expiry and, within the grace window, after; a revoked device is
//! stopped and keeps its spool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use shoal_agent::identity::{self, Identity};
use shoal_e2e::{
    Hub, Proc, agent_with, bin, free_port, run_bin, shoal_cli, spool_status, wait_until,
};
use shoal_proto::v1::ingest_client::IngestClient;
use shoal_proto::v1::{DeviceHello, IngestRequest, ingest_request};

/// A hub as deployed: devices need certificates.
async fn hub(dir: &Path, extra: &[&str]) -> Hub {
    let mut args = vec!["--device-auth", "cert"];
    args.extend_from_slice(extra);
    Hub::start_on(dir, free_port(), free_port(), &args).await
}

fn https(hub: &Hub) -> String {
    format!("https://{}", hub.grpc)
}

/// `POST /api/v1/enrollments` as admin: the answer (token, command, ca_sha256, ...).
async fn enrollment(hub: &Hub, device: &str, ttl: &str) -> Value {
    let r = hub
        .client()
        .post(format!("{}/api/v1/enrollments", hub.http_url()))
        .json(&json!({ "device_id": device, "labels": { "site": "lab" }, "ttl": ttl }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    r.json().await.unwrap()
}

/// `shoal-agent enroll` with what the enrollment answered: (success, stdout + stderr).
fn enroll(hub: &Hub, e: &Value, dir: &Path, extra: &[&str]) -> (bool, String) {
    assert_eq!(e["hub"].as_str().unwrap(), https(hub));
    let out = shoal_e2e::enroll_agent(e, dir, extra);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Enrolls `device` into `dir`, asserting it worked.
async fn enrolled(hub: &Hub, device: &str, dir: &Path) {
    let e = enrollment(hub, device, "10m").await;
    let (ok, out) = enroll(hub, &e, dir, &[]);
    assert!(ok, "{out}");
}

fn device_agent(hub: &Hub, device: &str, id: &Path, spool: &Path, count: Option<u64>) -> Proc {
    agent_with(
        &https(hub),
        device,
        spool,
        "100ms",
        count,
        &["--identity-dir", id.to_str().unwrap()],
    )
}

async fn denied(hub: &Hub, reason: &str) -> f64 {
    let url = format!("{}/metrics", hub.http_url());
    let series = format!("shoal_device_denied_total{{reason=\"{reason}\"}}");
    shoal_e2e::scrape_metric(&url, &series).await.unwrap_or(0.0)
}

/// Opens an ingest stream with `tls` and sends a hello as `device`: the hub's answer.
async fn hello_as(hub: &Hub, tls: Arc<rustls::ClientConfig>, device: &str) -> Result<(), String> {
    let channel = identity::channel(&https(hub), tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = IngestClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(IngestRequest {
        msg: Some(ingest_request::Msg::Hello(DeviceHello {
            device_id: device.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match stream.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("closed".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn ca_file(hub: &Hub) -> PathBuf {
    hub.data_dir.join("ca").join("ca.crt")
}

/// TLS that trusts `hub` and presents no certificate.
fn anonymous_tls(hub: &Hub) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_file(hub)).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

use rustls::pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_device_reports_with_its_own_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&dir.path().join("hub"), &[]).await;
    let id = dir.path().join("id");
    let e = enrollment(&hub, "pi-7", "10m").await;
    assert!(
        e["command"]
            .as_str()
            .unwrap()
            .starts_with("shoal-agent enroll --hub https://"),
        "{e}"
    );
    assert_eq!(e["ca_sha256"], json!(enrollment_fingerprint(&hub)));
    let (ok, out) = enroll(&hub, &e, &id, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("enrolled as pi-7"), "{out}");
    for f in ["device.key", "device.crt", "ca.crt", "identity.toml"] {
        let mode = std::fs::metadata(id.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // The key was made on the device: the hub's data holds no copy of it.
    let key = std::fs::read_to_string(id.join("device.key")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    // Past the PKCS#8 header every P-256 key shares: the private scalar itself.
    let secret = &body.as_bytes()[48..80];
    let hub_files = shoal_e2e::files_below(&hub.data_dir);
    assert!(
        hub_files.iter().all(|f| !std::fs::read(f)
            .unwrap_or_default()
            .windows(secret.len())
            .any(|w| w == secret)),
        "the device key appears in the hub's data dir"
    );

    let mut agent = device_agent(&hub, "pi-7", &id, &dir.path().join("spool"), Some(5));
    assert!(agent.wait(Duration::from_secs(30)).await.success());
    assert_eq!(hub.stored_seqs("pi-7").await, vec![1, 2, 3, 4, 5]);
    let device = hub.get("/api/v1/devices/pi-7").await;
    assert_eq!(
        device["labels"]["site"], "lab",
        "labels from the enrollment"
    );

    let (ok, out, _) = shoal_cli(&hub, &["devices", "identities"]);
    assert!(
        ok && out.contains("pi-7") && out.contains("active"),
        "{out}"
    );
    let audit = hub.get("/api/v1/audit").await;
    let lines = audit.to_string();
    assert!(
        lines.contains("shoal.v1.Enrollment/Enroll") && lines.contains("/api/v1/enrollments"),
        "{lines}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_around_the_certificate_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&dir.path().join("hub"), &[]).await;
    let a = dir.path().join("a");
    enrolled(&hub, "dev-a", &a).await;
    enrolled(&hub, "dev-b", &dir.path().join("b")).await;

    // Plaintext gRPC: the port speaks TLS only.
    let tls_failures = hub.metric("shoal_grpc_tls_failures_total").await;
    let mut plain = agent_with(
        &hub.grpc_url(),
        "dev-a",
        &dir.path().join("plain-spool"),
        "100ms",
        Some(1),
        &[],
    );
    wait_until(
        "a refused plaintext connection",
        Duration::from_secs(20),
        || async { hub.metric("shoal_grpc_tls_failures_total").await > tls_failures },
    )
    .await;
    plain.kill9();

    // TLS without a client certificate.
    let e = hello_as(&hub, anonymous_tls(&hub), "dev-a")
        .await
        .unwrap_err();
    assert!(
        e.contains("Unauthenticated") && e.contains("enrolled"),
        "{e}"
    );
    assert_eq!(denied(&hub, "no_certificate").await, 1.0);

    // Renewal without a client certificate.
    let channel = identity::channel(&https(&hub), anonymous_tls(&hub))
        .await
        .unwrap();
    let e = shoal_proto::v1::enrollment_client::EnrollmentClient::new(channel)
        .renew(shoal_proto::v1::RenewRequest {
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert_eq!(denied(&hub, "no_certificate").await, 2.0);

    // Device A's certificate sending as B.
    let a_tls = Identity::require(&a).unwrap().tls_config(None).unwrap();
    let e = hello_as(&hub, a_tls.clone(), "dev-b").await.unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("\"dev-a\""),
        "{e}"
    );
    assert_eq!(denied(&hub, "wrong_device").await, 1.0);
    hello_as(&hub, a_tls, "dev-a").await.unwrap();
    // The agent itself refuses to claim another id with its certificate.
    let out = run_bin(
        "shoal-agent",
        &[
            "run",
            "--hub",
            &https(&hub),
            "--identity-dir",
            a.to_str().unwrap(),
            "--device-id",
            "dev-b",
            "--spool-dir",
            dir.path().join("s").to_str().unwrap(),
            "--count",
            "1",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("enrolled as \"dev-a\""));

    // A certificate from another hub's CA.
    let other = hub_other(dir.path()).await;
    let c = dir.path().join("c");
    enrolled(&other, "dev-a", &c).await;
    let foreign = Identity::require(&c)
        .unwrap()
        .tls_config(Some(&ca_file(&hub)))
        .unwrap();
    let before = hub.metric("shoal_grpc_tls_failures_total").await;
    assert!(hello_as(&hub, foreign, "dev-a").await.is_err());
    assert!(hub.metric("shoal_grpc_tls_failures_total").await > before);

    // A reused token, an expired token, a wrong CA fingerprint.
    let e = enrollment(&hub, "dev-c", "10m").await;
    assert!(enroll(&hub, &e, &dir.path().join("c1"), &[]).0);
    let (ok, out) = enroll(&hub, &e, &dir.path().join("c2"), &[]);
    assert!(!ok && out.contains("already used"), "{out}");
    assert_eq!(denied(&hub, "enrollment_used").await, 1.0);
    let e = enrollment(&hub, "dev-d", "1s").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (ok, out) = enroll(&hub, &e, &dir.path().join("d"), &[]);
    assert!(!ok && out.contains("expired"), "{out}");
    assert_eq!(denied(&hub, "enrollment_expired").await, 1.0);
    let mut e = enrollment(&hub, "dev-e", "10m").await;
    e["ca_sha256"] = json!("00".repeat(32));
    let (ok, out) = enroll(&hub, &e, &dir.path().join("e"), &[]);
    assert!(!ok && out.contains("fingerprint"), "{out}");
    // ...and that token is still good: nothing reached the hub.
    e["ca_sha256"] = json!(enrollment_fingerprint(&hub));
    assert!(enroll(&hub, &e, &dir.path().join("e"), &[]).0);
    // An identity already there is not overwritten by accident.
    let e = enrollment(&hub, "dev-f", "10m").await;
    let (ok, out) = enroll(&hub, &e, &dir.path().join("e"), &[]);
    assert!(!ok && out.contains("--force"), "{out}");

    let audit = hub.get("/api/v1/audit?outcome=denied").await.to_string();
    assert!(
        audit.contains("shoal.v1.Ingest/Stream") && audit.contains("shoal.v1.Enrollment/Enroll"),
        "{audit}"
    );
    assert!(
        hub.stored_seqs("dev-b").await.is_empty(),
        "nothing stored as dev-b"
    );
}

fn enrollment_fingerprint(hub: &Hub) -> String {
    use sha2::{Digest, Sha256};
    let pem = std::fs::read(ca_file(hub)).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn hub_other(dir: &Path) -> Hub {
    hub(&dir.join("other-hub"), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_stopped_and_keeps_its_spool() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&dir.path().join("hub"), &[]).await;
    let id = dir.path().join("id");
    let spool = dir.path().join("spool");
    enrolled(&hub, "pi-r", &id).await;
    let mut agent = device_agent(&hub, "pi-r", &id, &spool, None);
    wait_until("samples stored", Duration::from_secs(20), || async {
        hub.stored_up_to("pi-r").await >= 3
    })
    .await;

    let (ok, out, err) = shoal_cli(&hub, &["devices", "revoke", "pi-r"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked pi-r"), "{out}");
    wait_until(
        "the revoked device refused",
        Duration::from_secs(20),
        || async { denied(&hub, "revoked").await >= 1.0 },
    )
    .await;
    let stored = hub.stored_up_to("pi-r").await;
    // The agent goes on sampling into its spool.
    shoal_e2e::wait_for_spool(
        &spool,
        "samples spooled while revoked",
        Duration::from_secs(20),
        |s| s["last_written_seq"].as_u64().unwrap() >= stored + 5,
    )
    .await;
    assert!(hub.stored_up_to("pi-r").await <= stored + 1);
    assert_eq!(agent.terminate().await.code(), Some(0));
    let status = spool_status(&spool);
    let written = status["last_written_seq"].as_u64().unwrap();
    assert!(status["pending"].as_u64().unwrap() > 0);
    assert_eq!(status["dropped_total"], 0);

    // Enrolled again, the same device delivers everything it kept.
    let e = enrollment(&hub, "pi-r", "10m").await;
    let (ok, out) = enroll(&hub, &e, &id, &["--force"]);
    assert!(ok, "{out}");
    let mut agent = device_agent(&hub, "pi-r", &id, &spool, None);
    wait_until("the spool delivered", Duration::from_secs(30), || async {
        hub.stored_up_to("pi-r").await >= written
    })
    .await;
    agent.kill9();
    let seqs = hub.stored_seqs("pi-r").await;
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_before_expiry_and_within_the_grace_window_after() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(
        &dir.path().join("hub"),
        &["--device-cert-ttl", "3s", "--device-renew-grace", "1h"],
    )
    .await;
    let id = dir.path().join("id");
    let spool = dir.path().join("spool");
    enrolled(&hub, "pi-n", &id).await;
    let first = hub.get("/api/v1/identities").await[0].clone();
    let mut agent = device_agent(&hub, "pi-n", &id, &spool, None);
    // Renewed at 2/3 of 3 s, and again: the serial changes while samples keep arriving.
    wait_until("two renewals", Duration::from_secs(20), || async {
        let now = hub.get("/api/v1/identities").await[0].clone();
        now["serial"] != first["serial"] && now["previous_serial"] != first["serial"]
    })
    .await;
    let before = hub.stored_up_to("pi-n").await;
    wait_until("samples after renewal", Duration::from_secs(20), || async {
        hub.stored_up_to("pi-n").await >= before + 5
    })
    .await;
    agent.kill9();

    // Offline past expiry: within the grace window the agent renews, then reports.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let expired = hub.get("/api/v1/identities").await[0].clone();
    assert!(expired["not_after_s"].as_i64().unwrap() * 1000 < now_ms());
    let stored = hub.stored_up_to("pi-n").await;
    let mut agent = device_agent(&hub, "pi-n", &id, &spool, None);
    wait_until(
        "samples after renewing late",
        Duration::from_secs(30),
        || async { hub.stored_up_to("pi-n").await >= stored + 3 },
    )
    .await;
    agent.kill9();
    assert!(
        denied(&hub, "expired_certificate").await >= 1.0,
        "the expired certificate could only renew"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_grace_window_an_expired_certificate_cannot_renew() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(
        &dir.path().join("hub"),
        &["--device-cert-ttl", "1s", "--device-renew-grace", "0s"],
    )
    .await;
    let id = dir.path().join("id");
    enrolled(&hub, "pi-g", &id).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = hub.metric("shoal_grpc_tls_failures_total").await;
    let mut agent = device_agent(&hub, "pi-g", &id, &dir.path().join("spool"), None);
    wait_until(
        "the expired certificate refused",
        Duration::from_secs(20),
        || async { hub.metric("shoal_grpc_tls_failures_total").await >= before + 2.0 },
    )
    .await;
    agent.kill9();
    assert!(hub.stored_seqs("pi-g").await.is_empty());
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_device_authentication_a_hub_stays_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("shoal"))
        .args([
            "serve",
            "--device-auth",
            "none",
            "--grpc-listen",
            "0.0.0.0:0",
            "--http-listen",
        ])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without device authentication") && err.contains("--insecure-no-auth"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolls_itself_at_first_start_from_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&dir.path().join("hub"), &[]).await;
    let e = enrollment(&hub, "node-1", "10m").await;
    let token_file = dir.path().join("node-1");
    std::fs::write(&token_file, e["token"].as_str().unwrap()).unwrap();
    let id = dir.path().join("id");
    let args = [
        "--identity-dir",
        id.to_str().unwrap(),
        "--enroll-token-file",
        token_file.to_str().unwrap(),
        "--ca-sha256",
        e["ca_sha256"].as_str().unwrap(),
    ];
    let spool = dir.path().join("spool");
    for round in 1..=2 {
        // The second start finds its identity; the used token beside it is ignored.
        let mut agent = agent_with(&https(&hub), "node-1", &spool, "100ms", Some(2), &args);
        assert!(
            agent.wait(Duration::from_secs(30)).await.success(),
            "round {round}"
        );
    }
    assert_eq!(hub.stored_seqs("node-1").await, vec![1, 2, 3, 4]);
    assert_eq!(denied(&hub, "enrollment_used").await, 0.0);
    // Without a fingerprint or CA the agent does not know which hub to trust.
    let out = run_bin(
        "shoal-agent",
        &[
            "check-config",
            "--hub",
            &https(&hub),
            "--enroll-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca-sha256"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_takes_device_certificates_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let certs = shoal_e2e::TestCerts::make(&dir.path().join("certs"));
    let addr = format!("127.0.0.1:{}", free_port());
    let hub = hub(
        &dir.path().join("hub"),
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
    let id = dir.path().join("id");
    enrolled(&hub, "mq-1", &id).await;
    let ca = certs.ca.to_str().unwrap();
    let with_id = ["--identity-dir", id.to_str().unwrap(), "--tls-ca", ca];
    let mut a = agent_with(
        &url,
        "mq-1",
        &dir.path().join("s1"),
        "50ms",
        Some(5),
        &with_id,
    );
    assert!(a.wait(Duration::from_secs(60)).await.success());
    assert_eq!(hub.stored_seqs("mq-1").await, vec![1, 2, 3, 4, 5]);

    // No certificate and no password: refused.
    let empty = dir.path().join("no-identity");
    let mut anon = agent_with(
        &url,
        "mq-2",
        &dir.path().join("s2"),
        "50ms",
        Some(1),
        &["--identity-dir", empty.to_str().unwrap(), "--tls-ca", ca],
    );
    wait_until(
        "an anonymous client refused",
        Duration::from_secs(20),
        || async { denied(&hub, "no_certificate").await >= 1.0 },
    )
    .await;
    anon.kill9();

    // Revoked: refused at its next connection.
    let (ok, _, err) = shoal_cli(&hub, &["devices", "revoke", "mq-1"]);
    assert!(ok, "{err}");
    let mut revoked = agent_with(
        &url,
        "mq-1",
        &dir.path().join("s1"),
        "50ms",
        Some(1),
        &with_id,
    );
    wait_until(
        "the revoked device refused",
        Duration::from_secs(20),
        || async { denied(&hub, "revoked").await >= 1.0 },
    )
    .await;
    revoked.kill9();
    assert_eq!(hub.stored_seqs("mq-1").await, vec![1, 2, 3, 4, 5]);
    assert!(hub.stored_seqs("mq-2").await.is_empty());
}
