//! The steps of `shoal models verify` past the model folder: the hub's ledger (its whole
//! chain re-walked here, not trusted) and the chain (the anchor's event, its block still
//! canonical, its confirmations). Each step is ok or failed with the reason, like the folder's
//! steps (`shoal_ml::provenance::verify`).

use std::path::Path;

use alloy::primitives::{Address, B256};
use serde_json::Value;
use shoal_ml::provenance::Step;

use super::Entry;
use super::chain::Chain;

fn ok(check: String) -> Step {
    Step {
        check,
        failure: None,
    }
}

fn failed(check: &str, why: impl Into<String>) -> Step {
    Step {
        check: check.to_string(),
        failure: Some(why.into()),
    }
}

/// Where to check anchors: the RPC URL, the chain id it must serve, the contract (default:
/// the one the hub names), and the confirmations required.
pub struct ChainCheckArgs<'a> {
    pub rpc: &'a str,
    pub chain_id: u64,
    pub contract: Option<Address>,
    pub confirmations: u64,
}

/// The ledger steps for the statement with digest `statement_sha256`, given the hub's
/// `GET /api/v1/provenance` answer; then, with `chain`, the chain steps. Returns the steps.
pub async fn ledger_and_chain(
    ledger: &Value,
    statement_sha256: &str,
    chain: Option<ChainCheckArgs<'_>>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let entries: Vec<Entry> = match serde_json::from_value(ledger["entries"].clone()) {
        Ok(e) => e,
        Err(e) => {
            steps.push(failed(
                "ledger",
                format!("the hub's answer is not a ledger: {e}"),
            ));
            return steps;
        }
    };
    let walk = super::check(&entries);
    if !walk.intact {
        steps.push(failed(
            "ledger chain",
            walk.reason.unwrap_or_else(|| "broken".into()),
        ));
        return steps;
    }
    steps.push(ok(format!(
        "ledger chain: {} entries, each chained to the one before",
        entries.len()
    )));
    let Some((at, entry)) = entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.statement_sha256 == statement_sha256)
    else {
        steps.push(failed(
            "ledger entry",
            format!("the hub's ledger has no entry for statement {statement_sha256}"),
        ));
        return steps;
    };
    steps.push(ok(format!(
        "ledger entry {} records the statement (signed by {})",
        entry.index, entry.key_id
    )));
    let Some(args) = chain else {
        return steps;
    };
    // The hub says which anchor covers the entry; the chain is the authority on whether it
    // does.
    let position = ledger["entries"][at]["anchor"].clone();
    let anchor = &position["anchor"];
    let Some(index) = anchor["index"].as_u64() else {
        let state = position["state"].as_str().unwrap_or("not anchored");
        steps.push(failed(
            "anchor",
            format!(
                "no anchor covers ledger entry {} yet ({state})",
                entry.index
            ),
        ));
        return steps;
    };
    let Some(covering) = entries.iter().find(|e| e.index == index) else {
        steps.push(failed(
            "anchor",
            format!("the hub names ledger entry {index} as the anchor, but its ledger has none"),
        ));
        return steps;
    };
    let contract = match args.contract.map(Ok).unwrap_or_else(|| {
        anchor["contract"]
            .as_str()
            .unwrap_or_default()
            .parse::<Address>()
            .map_err(|e| e.to_string())
    }) {
        Ok(c) => c,
        Err(e) => {
            steps.push(failed(
                "anchor",
                format!("no contract address (--contract): {e}"),
            ));
            return steps;
        }
    };
    let chain = match Chain::connect(args.rpc, args.chain_id, None).await {
        Ok(c) => c,
        Err(e) => {
            steps.push(failed("chain", e.to_string()));
            return steps;
        }
    };
    steps.push(ok(format!("chain {} at {}", args.chain_id, args.rpc)));
    let digest: B256 = match covering.statement_sha256.parse() {
        Ok(d) => d,
        Err(e) => {
            steps.push(failed("anchor", format!("statement digest: {e}")));
            return steps;
        }
    };
    let event = match chain.event(contract, digest).await {
        Ok(Some(ev)) => ev,
        Ok(None) => {
            steps.push(failed(
                "anchor event",
                format!(
                    "no Anchored event for ledger entry {index} (statement {}) in contract {contract} on chain {}",
                    covering.statement_sha256, args.chain_id
                ),
            ));
            return steps;
        }
        Err(e) => {
            steps.push(failed("anchor event", e.to_string()));
            return steps;
        }
    };
    if format!("{:x}", event.ledger_head) != covering.hash {
        steps.push(failed(
            "anchor event",
            format!(
                "the chain anchors ledger head {:x} for entry {index}, but the ledger's entry hashes to {}",
                event.ledger_head, covering.hash
            ),
        ));
        return steps;
    }
    steps.push(ok(format!(
        "anchor event: the ledger head at entry {index} (covering entry {}) is on chain, transaction {}",
        entry.index, event.tx_hash
    )));
    match chain.block_hash(event.block_number).await {
        Ok(Some(h)) if h == event.block_hash => steps.push(ok(format!(
            "block {} ({}) is canonical",
            event.block_number, event.block_hash
        ))),
        Ok(other) => {
            steps.push(failed(
                "anchor block",
                format!(
                    "block {} is {} on the chain now, not the anchor's {}: the anchor was reorganised away",
                    event.block_number,
                    other.map_or_else(|| "missing".into(), |h| h.to_string()),
                    event.block_hash
                ),
            ));
            return steps;
        }
        Err(e) => {
            steps.push(failed("anchor block", e.to_string()));
            return steps;
        }
    }
    match chain.head().await {
        Ok(head) => {
            let confirmations = (head + 1).saturating_sub(event.block_number);
            if confirmations >= args.confirmations {
                steps.push(ok(format!("{confirmations} confirmations")));
            } else {
                steps.push(failed(
                    "confirmations",
                    format!("{confirmations} of the {} required", args.confirmations),
                ));
            }
        }
        Err(e) => steps.push(failed("confirmations", e.to_string())),
    }
    steps
}

/// Downloads registered model `name` at `version` ("latest": the newest) from MLflow into
/// `into`: its model.onnx and MLmodel, the run's metrics.json and provenance envelope. Returns
/// the version.
pub async fn fetch_registered(
    mlflow_uri: &str,
    name: &str,
    version: &str,
    into: &Path,
) -> Result<String, String> {
    let client = shoal_ml::mlflow::Mlflow::new(mlflow_uri).map_err(|e| e.to_string())?;
    let (source, version) = client
        .model_version_source(name, version)
        .await
        .map_err(|e| e.to_string())?;
    let run_root = source
        .trim_end_matches('/')
        .rsplit_once('/')
        .map(|(root, _)| root.to_string())
        .ok_or_else(|| format!("model version source {source:?} is not a run's artifact"))?;
    for (from, path, file, required) in [
        (&source, "model.onnx", "model.onnx", true),
        (&source, "MLmodel", "MLmodel", false),
        (&run_root, "evaluation/metrics.json", "metrics.json", false),
        (
            &run_root,
            "provenance/provenance.dsse.json",
            shoal_ml::provenance::ENVELOPE_FILE,
            true,
        ),
    ] {
        match client.download(from, path).await {
            Ok(bytes) => std::fs::write(into.join(file), bytes)
                .map_err(|e| format!("{}: {e}", into.display()))?,
            Err(e) if required => {
                return Err(format!(
                    "registered model {name} version {version}: {path}: {e}"
                ));
            }
            Err(_) => {}
        }
    }
    Ok(version)
}
