//! Model provenance on a real chain: anvil (npm `@foundry-rs/anvil`) runs the committed
//! ShoalProvenance contract; the hub anchors its ledger there in batches, keeps entries pending
//! through a chain outage and anchors them when the chain is back; `shoal models verify` checks
//! folder, ledger and chain step by step and names each tampering; the hub refuses a wrong chain,
//! an endpoint that is not JSON-RPC, and (with --deploy-requires anchored) unanchored models.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use shoal_e2e::{ANVIL_KEY, Anvil, Hub, shoal_cli};
use shoal_ml::provenance::{Build, ENVELOPE_FILE, SigningKey, statement};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A model folder: a real ONNX model (its intercept `n`, so each one differs) and its signed
/// statement.
fn signed_model(dir: &Path, key: &SigningKey, n: usize) -> PathBuf {
    let folder = dir.join(format!("model-{n}"));
    std::fs::create_dir_all(&folder).unwrap();
    let mut model = shoal_e2e::bench_model();
    model.intercept = n as f64;
    std::fs::write(
        folder.join("model.onnx"),
        shoal_ml::onnx::export(&model, &[]),
    )
    .unwrap();
    let build = Build {
        dataset_uri: "file:///datasets/pi",
        dataset_sha256: &"0".repeat(64),
        arguments: vec!["train".into()],
        builder: "provenance-test".into(),
        run_id: None,
        mlflow_run_id: None,
        started: "2026-11-30T00:00:00Z".into(),
        finished: "2026-11-30T00:00:01Z".into(),
    };
    let envelope = key.sign(&statement(&folder, &build).unwrap()).unwrap();
    std::fs::write(
        folder.join(ENVELOPE_FILE),
        serde_json::to_vec(&envelope).unwrap(),
    )
    .unwrap();
    folder
}

fn keys(dir: &Path) -> (SigningKey, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (key, private, public) = SigningKey::generate().unwrap();
    std::fs::write(dir.join("signing.key"), private).unwrap();
    std::fs::write(dir.join("signing.pub"), public).unwrap();
    (key, dir.join("signing.key"), dir.join("signing.pub"))
}

async fn push(hub: &Hub, folder: &Path) -> reqwest::StatusCode {
    let envelope: Value =
        serde_json::from_slice(&std::fs::read(folder.join(ENVELOPE_FILE)).unwrap()).unwrap();
    hub.client()
        .post(format!("{}/api/v1/provenance", hub.http_url()))
        .json(&envelope)
        .send()
        .await
        .unwrap()
        .status()
}

async fn wait_anchored(hub: &Hub, entries: usize) -> Value {
    shoal_e2e::wait_until(
        "the ledger to be anchored",
        Duration::from_secs(60),
        || async {
            let l = hub.get("/api/v1/provenance").await;
            l["entries"].as_array().is_some_and(|e| {
                e.len() == entries && e.iter().all(|e| e["anchor"]["state"] == "anchored")
            })
        },
    )
    .await;
    hub.get("/api/v1/provenance").await
}

fn verify(hub: &Hub, folder: &Path, public: &Path, chain: Option<(&str, u64)>) -> (bool, String) {
    let mut args = vec![
        "models".to_string(),
        "verify".into(),
        folder.to_string_lossy().into_owned(),
        "--public-key".into(),
        public.to_string_lossy().into_owned(),
        "--ledger".into(),
    ];
    if let Some((rpc, id)) = chain {
        args.extend([
            "--chain-rpc".into(),
            rpc.into(),
            "--chain-id".into(),
            id.to_string(),
            "--confirmations".into(),
            "2".into(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = shoal_cli(hub, &args);
    (ok, format!("{out}{err}"))
}

fn chain_hub_flags<'a>(anvil_url: &'a str, chain_id: &'a str, key_file: &'a str) -> Vec<&'a str> {
    vec![
        "--chain-rpc",
        anvil_url,
        "--chain-id",
        chain_id,
        "--chain-key-file",
        key_file,
        "--chain-confirmations",
        "2",
    ]
}

#[test]
fn the_committed_contract_is_what_solc_0_8_37_compiles() {
    let out = tempfile::tempdir().unwrap();
    let built = std::process::Command::new(repo().join("hub/contracts/build"))
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "hub/contracts/build (needs solcjs from npm solc@0.8.37; tests/run installs it): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    for f in ["ShoalProvenance.abi", "ShoalProvenance.bin"] {
        assert_eq!(
            std::fs::read_to_string(out.path().join(f)).unwrap(),
            std::fs::read_to_string(repo().join("hub/contracts").join(f)).unwrap(),
            "{f} differs from what the source compiles to: run hub/contracts/build and commit"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_is_anchored_in_batches_through_a_chain_outage_and_verifies_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut anvil = Anvil::start(&dir.path().join("anvil"), 31337).await;
    let (key, key_file, public) = keys(&dir.path().join("keys"));
    let chain_key = dir.path().join("chain.key");
    std::fs::write(&chain_key, ANVIL_KEY).unwrap();
    let anvil_url = anvil.url();
    let mut flags = chain_hub_flags(&anvil_url, "31337", chain_key.to_str().unwrap());
    flags.extend([
        "--signing-key",
        key_file.to_str().unwrap(),
        "--deploy-requires",
        "anchored",
    ]);
    let hub = Hub::start_on(
        &dir.path().join("hub"),
        shoal_e2e::free_port(),
        shoal_e2e::free_port(),
        &flags,
    )
    .await;
    let models = dir.path().join("models");

    // An unsigned model is not deployed; a signed one only once it is anchored.
    let first = signed_model(&models, &key, 1);
    let deploy = |folder: &Path| {
        shoal_cli(
            &hub,
            &[
                "models",
                "deploy",
                "anchored-model",
                "--source",
                folder.to_str().unwrap(),
            ],
        )
    };
    let (ok, _, err) = deploy(&first);
    assert!(!ok && err.contains("no signed statement"), "{err}");
    assert_eq!(push(&hub, &first).await, reqwest::StatusCode::CREATED);
    let ledger = wait_anchored(&hub, 1).await;
    let anchor = &ledger["entries"][0]["anchor"]["anchor"];
    assert!(
        anchor["block_hash"].as_str().unwrap().len() == 66
            && anchor["gas_used"].as_u64().unwrap() > 21_000
            && anchor["confirmations"].as_u64().unwrap() >= 2,
        "{anchor}"
    );
    assert_eq!(ledger["anchoring"]["chain_id"], 31337);
    assert_eq!(
        ledger["public_keys"][0]["pem"],
        std::fs::read_to_string(&public).unwrap(),
        "the hub lists the keys it trusts for verifiers"
    );
    let (ok, out, err) = deploy(&first);
    assert!(ok, "{out}{err}");
    let (ok, shown, err) = shoal_cli(&hub, &["models", "show", "anchored-model"]);
    assert!(
        ok && shown.contains("ledger entry 1") && shown.contains("anchored, block"),
        "{shown}{err}"
    );

    // Twelve statements at once: fewer transactions than statements, every one anchored.
    let batch: Vec<PathBuf> = (2..=13).map(|n| signed_model(&models, &key, n)).collect();
    for folder in &batch {
        assert_eq!(push(&hub, folder).await, reqwest::StatusCode::CREATED);
    }
    let ledger = wait_anchored(&hub, 13).await;
    let txs: std::collections::BTreeSet<String> = ledger["entries"].as_array().unwrap()[1..]
        .iter()
        .map(|e| {
            e["anchor"]["anchor"]["tx_hash"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        txs.len() < 12,
        "12 statements took {} transactions",
        txs.len()
    );
    let sent = hub
        .metric("shoal_provenance_anchor_transactions_total")
        .await;
    assert!(sent <= 1.0 + txs.len() as f64, "{sent} transactions sent");

    // Every step checks out for a model in the middle of a batch.
    let (ok, steps) = verify(&hub, &batch[4], &public, Some((&anvil.url(), 31337)));
    assert!(ok, "{steps}");
    for step in [
        "ok      signature",
        "ok      digest model.onnx",
        "ok      ledger chain: 13 entries",
        "ok      ledger entry 6 records the statement",
        "ok      chain 31337",
        "ok      anchor event",
        "is canonical",
        "confirmations",
    ] {
        assert!(steps.contains(step), "{step}: {steps}");
    }

    // The chain goes down: a new statement stays pending, and says so.
    anvil.stop().await;
    let late = signed_model(&models, &key, 14);
    assert_eq!(push(&hub, &late).await, reqwest::StatusCode::CREATED);
    shoal_e2e::wait_until(
        "a failed anchoring round",
        Duration::from_secs(20),
        || async { hub.metric("shoal_provenance_anchor_errors_total").await >= 1.0 },
    )
    .await;
    assert_eq!(hub.metric("shoal_provenance_pending_entries").await, 1.0);
    let (ok, listed, err) = shoal_cli(&hub, &["models", "provenance"]);
    assert!(ok, "{err}");
    assert!(
        listed.contains("pending")
            && listed.contains("is failing")
            && listed.contains("unreachable"),
        "{listed}"
    );
    let (ok, steps) = verify(&hub, &late, &public, Some((&anvil.url(), 31337)));
    assert!(
        !ok && steps.contains("FAILED  anchor: no anchor covers ledger entry 14 yet (pending)"),
        "{steps}"
    );
    let (ok, _, err) = deploy(&late);
    assert!(
        !ok && err.contains("pending on chain, not anchored yet"),
        "{err}"
    );

    // Back with the chain it had: the entry is anchored, the earlier anchors still stand.
    anvil.restart().await;
    wait_anchored(&hub, 14).await;
    let (ok, steps) = verify(&hub, &late, &public, Some((&anvil.url(), 31337)));
    assert!(ok, "{steps}");
    let (ok, steps) = verify(&hub, &first, &public, Some((&anvil.url(), 31337)));
    assert!(ok, "{steps}");
    assert_eq!(hub.metric("shoal_provenance_pending_entries").await, 0.0);

    // Tampering, each named. A changed byte in the model:
    let onnx = std::fs::read(first.join("model.onnx")).unwrap();
    let mut changed = onnx.clone();
    *changed.last_mut().unwrap() ^= 1;
    std::fs::write(first.join("model.onnx"), &changed).unwrap();
    let (ok, steps) = verify(&hub, &first, &public, Some((&anvil.url(), 31337)));
    assert!(
        !ok && steps.contains("FAILED  digest model.onnx"),
        "{steps}"
    );
    std::fs::write(first.join("model.onnx"), &onnx).unwrap();

    // An edited statement (the signature no longer covers it):
    let edited = models.join("edited");
    copy_folder(&batch[0], &edited);
    let mut envelope: Value =
        serde_json::from_slice(&std::fs::read(edited.join(ENVELOPE_FILE)).unwrap()).unwrap();
    let mut stmt: Value =
        serde_json::from_slice(&B64.decode(envelope["payload"].as_str().unwrap()).unwrap())
            .unwrap();
    stmt["predicate"]["runDetails"]["builder"]["id"] = json!("https://mallory.example");
    envelope["payload"] = json!(B64.encode(serde_json::to_vec(&stmt).unwrap()));
    std::fs::write(
        edited.join(ENVELOPE_FILE),
        serde_json::to_vec(&envelope).unwrap(),
    )
    .unwrap();
    let (ok, steps) = verify(&hub, &edited, &public, None);
    assert!(!ok && steps.contains("FAILED  signature"), "{steps}");

    // A statement signed by another key: the hub does not record it, verify names the key.
    let (other, _, other_public) = keys(&dir.path().join("other"));
    let foreign = signed_model(&models.join("foreign"), &other, 99);
    assert_eq!(
        push(&hub, &foreign).await,
        reqwest::StatusCode::UNPROCESSABLE_ENTITY
    );
    let (ok, steps) = verify(&hub, &foreign, &public, None);
    assert!(!ok && steps.contains("no signature by key"), "{steps}");
    let (ok, steps) = verify(&hub, &foreign, &other_public, None);
    assert!(
        !ok && steps.contains("FAILED  ledger entry: the hub's ledger has no entry"),
        "{steps}"
    );

    // An anchor looked for on another chain: not there, or the endpoint is another chain.
    let other_chain = Anvil::start(&dir.path().join("anvil-b"), 31338).await;
    let (ok, steps) = verify(&hub, &batch[0], &public, Some((&other_chain.url(), 31338)));
    assert!(
        !ok && steps.contains("FAILED  anchor event: no Anchored event for ledger entry")
            && steps.contains("on chain 31338"),
        "{steps}"
    );
    let (ok, steps) = verify(&hub, &batch[0], &public, Some((&anvil.url(), 31338)));
    assert!(
        !ok && steps.contains("serves chain id 31337, not the configured 31338"),
        "{steps}"
    );

    // A hub whose ledger lost an entry: the verifier walks the chain itself.
    let mut lossy = hub.get("/api/v1/provenance").await;
    lossy["entries"].as_array_mut().unwrap().remove(2);
    let fake = serve_json("/api/v1/provenance", lossy).await;
    let out = std::process::Command::new(shoal_e2e::bin("shoal"))
        .args(["--hub", &fake, "models", "verify"])
        .arg(&batch[8])
        .arg("--public-key")
        .arg(&public)
        .args(["--chain-rpc", &anvil.url(), "--chain-id", "31337"])
        .env("SHOAL_TOKEN", "unused")
        .env("SHOAL_CREDENTIALS", "/nonexistent/credentials.toml")
        .output()
        .unwrap();
    let steps = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && steps.contains("FAILED  ledger chain: entry 4 follows entry 2: one is missing"),
        "{steps}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_chain_or_an_endpoint_that_is_not_json_rpc_anchors_nothing_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let anvil = Anvil::start(&dir.path().join("anvil"), 31337).await;
    let anvil_url = anvil.url();
    let (key, _, public) = keys(&dir.path().join("keys"));
    let chain_key = dir.path().join("chain.key");
    std::fs::write(&chain_key, ANVIL_KEY).unwrap();
    let garbage = serve_text("this is not JSON-RPC").await;

    for (rpc, chain_id, says) in [
        (
            anvil.url(),
            "31338",
            "serves chain id 31337, not the configured 31338",
        ),
        (garbage.clone(), "31337", "is not JSON-RPC"),
    ] {
        let mut flags = chain_hub_flags(&rpc, chain_id, chain_key.to_str().unwrap());
        flags.extend(["--provenance-key", public.to_str().unwrap()]);
        let name = format!("hub-{chain_id}-{}", rpc.len());
        let hub = Hub::start_on(
            &dir.path().join(name),
            shoal_e2e::free_port(),
            shoal_e2e::free_port(),
            &flags,
        )
        .await;
        let model = signed_model(&dir.path().join("models"), &key, 1);
        assert_eq!(push(&hub, &model).await, reqwest::StatusCode::CREATED);
        shoal_e2e::wait_until(
            "the hub to report the chain's error",
            Duration::from_secs(20),
            || async {
                hub.get("/api/v1/provenance").await["anchoring"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(says))
            },
        )
        .await;
        let ledger = hub.get("/api/v1/provenance").await;
        assert_eq!(
            ledger["entries"][0]["anchor"]["state"], "pending",
            "{ledger}"
        );
        assert_eq!(
            hub.metric("shoal_provenance_anchor_transactions_total")
                .await,
            0.0
        );
    }

    // Nothing is anchored twice: the contract records a digest once. The hub anchors a
    // statement; the same digest sent again from the hub's account (anvil keeps it unlocked)
    // is mined without an event and changes nothing; from another account it is refused.
    let model = signed_model(&dir.path().join("models"), &key, 2);
    let mut flags = chain_hub_flags(&anvil_url, "31337", chain_key.to_str().unwrap());
    flags.extend(["--provenance-key", public.to_str().unwrap()]);
    let hub = Hub::start_on(
        &dir.path().join("anchoring"),
        shoal_e2e::free_port(),
        shoal_e2e::free_port(),
        &flags,
    )
    .await;
    assert_eq!(push(&hub, &model).await, reqwest::StatusCode::CREATED);
    let ledger = wait_anchored(&hub, 1).await;
    let contract = ledger["anchoring"]["contract"]
        .as_str()
        .unwrap()
        .to_string();
    let account = ledger["anchoring"]["account"].as_str().unwrap().to_string();
    let digest = ledger["entries"][0]["statement_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let head = ledger["entries"][0]["hash"].as_str().unwrap().to_string();
    let rpc = |method: &'static str, params: Value| {
        let url = anvil_url.clone();
        async move {
            shoal_e2e::http_client()
                .post(&url)
                .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // anchor(bytes32,bytes32,string) and anchorOf(bytes32), selectors as solc computes them.
    let again = format!(
        "0x85094452{digest}{}{:064x}{:064x}{:0<64}",
        "ab".repeat(32),
        0x60,
        1,
        "78"
    );
    let sent = rpc(
        "eth_sendTransaction",
        json!([{ "from": account, "to": contract, "data": again }]),
    )
    .await;
    let tx = sent["result"].as_str().expect("a transaction").to_string();
    let mut receipt = Value::Null;
    for _ in 0..50 {
        receipt = rpc("eth_getTransactionReceipt", json!([tx])).await["result"].clone();
        if !receipt.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(receipt["status"], "0x1", "{receipt}");
    assert_eq!(receipt["logs"].as_array().unwrap().len(), 0, "{receipt}");
    let of = rpc(
        "eth_call",
        json!([{ "to": contract, "data": format!("0xcf4ff901{digest}") }, "latest"]),
    )
    .await;
    assert!(
        of["result"]
            .as_str()
            .unwrap()
            .starts_with(&format!("0x{head}")),
        "the first anchor's head stays: {of}"
    );
    let logs = rpc(
        "eth_getLogs",
        json!([{ "address": contract, "fromBlock": "0x0", "topics": [null, format!("0x{digest}")] }]),
    )
    .await;
    assert_eq!(logs["result"].as_array().unwrap().len(), 1, "{logs}");
    let stranger = rpc(
        "eth_call",
        json!([{ "from": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "to": contract, "data": again }, "latest"]),
    )
    .await;
    assert!(
        stranger["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("revert")),
        "{stranger}"
    );

    // Bad flags are refused before the hub starts.
    for (flags, says) in [
        (
            vec![
                "--chain-rpc",
                "ftp://x",
                "--chain-id",
                "1",
                "--chain-key-file",
                chain_key.to_str().unwrap(),
            ],
            "invalid chain-rpc",
        ),
        (
            vec![
                "--chain-rpc",
                "http://127.0.0.1:1",
                "--chain-id",
                "1",
                "--chain-key-file",
                public.to_str().unwrap(),
            ],
            "invalid chain-key-file",
        ),
        (
            vec!["--deploy-requires", "anchored"],
            "anchored needs a chain",
        ),
        (vec!["--chain-rpc", "http://127.0.0.1:1"], "--chain-id"),
    ] {
        let out = std::process::Command::new(shoal_e2e::bin("shoal"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("refused"))
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{flags:?}: {err}"
        );
    }
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A server answering `path` with `body` as JSON (a hub that lies about its ledger).
async fn serve_json(path: &'static str, body: Value) -> String {
    let app = axum::Router::new().route(
        path,
        axum::routing::get(move || {
            let body = body.clone();
            async move { axum::Json(body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A server answering every request with `text` (an endpoint that is not JSON-RPC).
async fn serve_text(text: &'static str) -> String {
    let app = axum::Router::new().fallback(move || async move { text });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}
