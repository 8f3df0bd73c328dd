//! Where a model came from, signed: an in-toto Statement v1 whose subjects are the model's
//! files, with a SLSA Provenance v1 predicate (the dataset and its digest, the trainer's
//! binary and version, the run), in a DSSE envelope signed with ECDSA P-256.
//!
//! Keys are PKCS#8 PEM files (`shoal keys generate`); a key's id is the SHA-256 of its public
//! key (SubjectPublicKeyInfo DER), in hex. [`verify`] checks a model folder against an
//! envelope step by step and names the step that fails.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::dataset::hex;

/// The DSSE payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The build type Shoal's training records.
pub const BUILD_TYPE: &str = "https://shoal.dev/provenance/training/v1";
/// The envelope's file in a model folder.
pub const ENVELOPE_FILE: &str = "provenance.dsse.json";
/// The model folder's files a statement covers, when present.
pub const SUBJECT_FILES: [&str; 3] = ["model.onnx", "MLmodel", "metrics.json"];

/// The DER prefix of a P-256 SubjectPublicKeyInfo before the 65-byte uncompressed point.
const SPKI_P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Envelope(String),
    #[error("{0}")]
    Io(String),
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn unpem(label: &str, text: &str) -> Result<Vec<u8>, ProvenanceError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(b, _)| b)
        .ok_or_else(|| ProvenanceError::Key(format!("not a PEM {label}")))?;
    let joined: String = body.split_whitespace().collect();
    B64.decode(joined)
        .map_err(|e| ProvenanceError::Key(format!("PEM {label}: {e}")))
}

/// A signing key.
pub struct SigningKey {
    pair: EcdsaKeyPair,
}

impl SigningKey {
    /// A new key: (the key, its PKCS#8 PEM, its public key PEM).
    pub fn generate() -> Result<(Self, String, String), ProvenanceError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| ProvenanceError::Key("cannot generate a P-256 key".into()))?;
        let key = Self::from_pkcs8(pkcs8.as_ref())?;
        let private = pem("PRIVATE KEY", pkcs8.as_ref());
        let public = pem("PUBLIC KEY", &key.spki());
        Ok((key, private, public))
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, ProvenanceError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &SystemRandom::new())
                .map_err(|e| ProvenanceError::Key(format!("not a P-256 PKCS#8 key: {e}")))?;
        Ok(Self { pair })
    }

    /// Reads a PKCS#8 PEM key file.
    pub fn load(path: &Path) -> Result<Self, ProvenanceError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProvenanceError::Key(format!("{}: {e}", path.display())))?;
        Self::from_pkcs8(&unpem("PRIVATE KEY", &text)?)
            .map_err(|e| ProvenanceError::Key(format!("{}: {e}", path.display())))
    }

    fn spki(&self) -> Vec<u8> {
        [&SPKI_P256_PREFIX[..], self.pair.public_key().as_ref()].concat()
    }

    /// The key's id: SHA-256 of its public key, hex.
    pub fn key_id(&self) -> String {
        hex(&Sha256::digest(self.spki()))
    }

    /// The public key as PEM (64-column lines, as OpenSSL writes it).
    pub fn public_pem(&self) -> String {
        pem("PUBLIC KEY", &self.spki())
    }

    /// The DER ECDSA signature over `payload`'s DSSE pre-authentication encoding.
    pub fn sign_dsse(&self, payload: &[u8]) -> Result<Vec<u8>, ProvenanceError> {
        self.pair
            .sign(&SystemRandom::new(), &pae(PAYLOAD_TYPE, payload))
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| ProvenanceError::Key("signing failed".into()))
    }

    /// A DSSE envelope over `statement`.
    pub fn sign(&self, statement: &Value) -> Result<Value, ProvenanceError> {
        let payload = serde_json::to_vec(statement).expect("a statement serialises");
        let sig = self.sign_dsse(&payload)?;
        Ok(json!({
            "payloadType": PAYLOAD_TYPE,
            "payload": B64.encode(&payload),
            "signatures": [{ "keyid": self.key_id(), "sig": B64.encode(sig) }],
        }))
    }
}

/// A public key for verifying: its id and the uncompressed point.
pub struct PublicKey {
    pub key_id: String,
    point: Vec<u8>,
}

impl PublicKey {
    /// Reads a PEM public key file (SubjectPublicKeyInfo, P-256).
    pub fn load(path: &Path) -> Result<Self, ProvenanceError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProvenanceError::Key(format!("{}: {e}", path.display())))?;
        Self::from_pem(&text).map_err(|e| ProvenanceError::Key(format!("{}: {e}", path.display())))
    }

    /// The key as PEM (SubjectPublicKeyInfo), as `shoal keys generate` writes it.
    pub fn to_pem(&self) -> String {
        pem("PUBLIC KEY", &[&SPKI_P256_PREFIX[..], &self.point].concat())
    }

    /// A PEM public key (SubjectPublicKeyInfo, P-256).
    pub fn from_pem(text: &str) -> Result<Self, ProvenanceError> {
        let der = unpem("PUBLIC KEY", text)?;
        let point = der
            .strip_prefix(&SPKI_P256_PREFIX[..])
            .filter(|p| p.len() == 65)
            .ok_or_else(|| ProvenanceError::Key("not a P-256 public key".into()))?;
        Ok(Self {
            key_id: hex(&Sha256::digest(&der)),
            point: point.to_vec(),
        })
    }
}

/// DSSE's pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The statement's subjects: each of [`SUBJECT_FILES`] present in `dir`, with its digest.
pub fn subjects(dir: &Path) -> Result<Vec<Value>, ProvenanceError> {
    let mut out = Vec::new();
    for name in SUBJECT_FILES {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => out.push(
                json!({ "name": name, "digest": { "sha256": hex(&Sha256::digest(&bytes)) } }),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProvenanceError::Io(format!("{name}: {e}"))),
        }
    }
    Ok(out)
}

/// What a training run was: the inputs of its provenance predicate.
pub struct Build<'a> {
    pub dataset_uri: &'a str,
    pub dataset_sha256: &'a str,
    /// The trainer's arguments as given.
    pub arguments: Vec<String>,
    /// Who ran it: the hub's URL for a job, else `shoal-ml`.
    pub builder: String,
    /// The Shoal run id and the MLflow run id, when there are.
    pub run_id: Option<String>,
    pub mlflow_run_id: Option<String>,
    pub started: String,
    pub finished: String,
}

/// The in-toto Statement v1 with a SLSA Provenance v1 predicate for the model in `dir`.
pub fn statement(dir: &Path, b: &Build<'_>) -> Result<Value, ProvenanceError> {
    // The running binary's digest, read once per process (a trainer signs one model; a
    // process that signs many hashes itself once).
    static EXE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let exe = EXE
        .get_or_init(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| std::fs::read(p).ok())
                .map(|bytes| hex(&Sha256::digest(bytes)))
        })
        .clone();
    let mut dependencies = vec![json!({
        "uri": b.dataset_uri, "digest": { "sha256": b.dataset_sha256 }, "name": "dataset",
    })];
    if let Some(d) = exe {
        dependencies.push(json!({
            "uri": format!("pkg:cargo/shoal-ml@{}", env!("CARGO_PKG_VERSION")),
            "digest": { "sha256": d }, "name": "shoal-ml",
        }));
    }
    Ok(json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": subjects(dir)?,
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "dataset": b.dataset_uri,
                    "arguments": b.arguments,
                    // A hub's job: its name (the CronJob manifest is the hub's, under that name).
                    "job": std::env::var("SHOAL_JOB").ok(),
                },
                "internalParameters": {},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": { "id": b.builder },
                "metadata": {
                    "invocationId": b.run_id,
                    "startedOn": b.started,
                    "finishedOn": b.finished,
                },
                "byproducts": b.mlflow_run_id.as_ref().map(|id| vec![json!({ "name": "mlflow-run", "uri": format!("mlflow:runs/{id}") })]).unwrap_or_default(),
            },
        },
    }))
}

/// One step of a verification: what was checked, and the failure if it failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    pub check: String,
    pub failure: Option<String>,
}

/// Checks the model folder `dir` against its envelope and `key`: the envelope's form, the
/// signature, the statement, then each subject's digest. Every step is returned; verification
/// passed when none failed. A step that cannot run because an earlier one failed is not listed.
pub fn verify(dir: &Path, envelope: &Path, key: &PublicKey) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut step = |check: &str, r: Result<(), String>| {
        let ok = r.is_ok();
        steps.push(Step {
            check: check.into(),
            failure: r.err(),
        });
        ok
    };
    let parsed = std::fs::read(envelope)
        .map_err(|e| format!("{}: {e}", envelope.display()))
        .and_then(|b| {
            serde_json::from_slice::<Value>(&b)
                .map_err(|e| format!("{}: not JSON: {e}", envelope.display()))
        })
        .and_then(|v| envelope_parts(&v));
    let (payload_type, payload, signatures) = match parsed {
        Ok(p) => {
            step("envelope", Ok(()));
            p
        }
        Err(e) => {
            step("envelope", Err(e));
            return steps;
        }
    };
    let signature = check_signature(
        &payload_type,
        &payload,
        &signatures,
        std::slice::from_ref(key),
    )
    .map(|_| ());
    if !step("signature", signature) {
        return steps;
    }
    let statement = parse_statement(&payload);
    let statement = match statement {
        Ok(s) => {
            step("statement", Ok(()));
            s
        }
        Err(e) => {
            step("statement", Err(e));
            return steps;
        }
    };
    let subjects = statement["subject"].as_array().cloned().unwrap_or_default();
    for s in subjects {
        let name = s["name"].as_str().unwrap_or_default().to_string();
        let want = s["digest"]["sha256"].as_str().unwrap_or_default();
        let got = std::fs::read(dir.join(&name))
            .map(|b| hex(&Sha256::digest(b)))
            .map_err(|e| format!("{name}: {e}"));
        let r = got.and_then(|g| {
            (g == want)
                .then_some(())
                .ok_or_else(|| format!("{name}: SHA-256 is {g}, the statement says {want}"))
        });
        step(&format!("digest {name}"), r);
    }
    steps
}

/// The key among `keys` whose signature over the payload holds; else why none does.
fn check_signature(
    payload_type: &str,
    payload: &[u8],
    signatures: &[(String, Vec<u8>)],
    keys: &[PublicKey],
) -> Result<String, String> {
    let message = pae(payload_type, payload);
    for key in keys {
        let holds = signatures.iter().any(|(keyid, sig)| {
            (keyid.is_empty() || *keyid == key.key_id)
                && UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key.point)
                    .verify(&message, sig)
                    .is_ok()
        });
        if holds {
            return Ok(key.key_id.clone());
        }
    }
    let ids: Vec<&str> = signatures.iter().map(|(k, _)| k.as_str()).collect();
    if keys.iter().any(|k| ids.contains(&k.key_id.as_str())) {
        Err("the signature does not match the statement: it was changed after signing".into())
    } else {
        Err(format!(
            "no signature by key {} (signed by {})",
            keys.iter()
                .map(|k| k.key_id.as_str())
                .collect::<Vec<_>>()
                .join(" or "),
            ids.join(", ")
        ))
    }
}

fn parse_statement(payload: &[u8]) -> Result<Value, String> {
    let s: Value =
        serde_json::from_slice(payload).map_err(|e| format!("the statement is not JSON: {e}"))?;
    if s["_type"] == "https://in-toto.io/Statement/v1" && s["subject"].is_array() {
        Ok(s)
    } else {
        Err("not an in-toto Statement v1 with subjects".into())
    }
}

/// A statement opened from its envelope: who signed it, what it says, and its digest (the
/// SHA-256 of the signed payload).
#[derive(Debug, Clone)]
pub struct Opened {
    pub key_id: String,
    pub statement: Value,
    pub sha256: String,
}

/// The statement in `envelope` if one of `keys` signed it; else what failed.
pub fn open(envelope: &Value, keys: &[PublicKey]) -> Result<Opened, String> {
    let (payload_type, payload, signatures) = envelope_parts(envelope)?;
    let key_id = check_signature(&payload_type, &payload, &signatures, keys)?;
    Ok(Opened {
        key_id,
        statement: parse_statement(&payload)?,
        sha256: hex(&Sha256::digest(&payload)),
    })
}

/// An envelope's payload type, payload and (keyid, signature) pairs.
#[allow(clippy::type_complexity)]
fn envelope_parts(v: &Value) -> Result<(String, Vec<u8>, Vec<(String, Vec<u8>)>), String> {
    let payload_type = v["payloadType"]
        .as_str()
        .ok_or("the envelope has no payloadType")?;
    if payload_type != PAYLOAD_TYPE {
        return Err(format!(
            "payloadType {payload_type:?}, not an in-toto statement"
        ));
    }
    let payload = v["payload"]
        .as_str()
        .and_then(|p| B64.decode(p).ok())
        .ok_or("the envelope's payload is missing or not base64")?;
    let signatures = v["signatures"]
        .as_array()
        .filter(|s| !s.is_empty())
        .ok_or("the envelope has no signatures")?
        .iter()
        .map(|s| {
            let sig = s["sig"]
                .as_str()
                .and_then(|x| B64.decode(x).ok())
                .ok_or("a signature is missing or not base64")?;
            Ok((s["keyid"].as_str().unwrap_or_default().to_string(), sig))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((payload_type.to_string(), payload, signatures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn a_signed_model_verifies_and_every_tampering_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        std::fs::write(m.join("model.onnx"), b"onnx bytes").unwrap();
        std::fs::write(m.join("metrics.json"), b"{}").unwrap();
        let (key, private, public) = SigningKey::generate().unwrap();
        std::fs::write(m.join("key.pem"), &private).unwrap();
        std::fs::write(m.join("key.pub"), &public).unwrap();
        assert_eq!(
            SigningKey::load(&m.join("key.pem")).unwrap().key_id(),
            key.key_id()
        );
        let public = PublicKey::load(&m.join("key.pub")).unwrap();
        assert_eq!(public.key_id, key.key_id());
        let build = Build {
            dataset_uri: "s3://telemetry/x",
            dataset_sha256: "ab",
            arguments: vec!["train".into()],
            builder: "shoal-ml".into(),
            run_id: None,
            mlflow_run_id: None,
            started: "2026-11-30T00:00:00Z".into(),
            finished: "2026-11-30T00:00:01Z".into(),
        };
        let statement = statement(m, &build).unwrap();
        assert_eq!(statement["subject"].as_array().unwrap().len(), 2);
        let envelope = m.join(ENVELOPE_FILE);
        std::fs::write(&envelope, key.sign(&statement).unwrap().to_string()).unwrap();
        let failed = |steps: Vec<Step>| -> Vec<String> {
            steps.into_iter().filter_map(|s| s.failure).collect()
        };
        assert_eq!(failed(verify(m, &envelope, &public)), Vec::<String>::new());

        // A changed byte in the model.
        std::fs::write(m.join("model.onnx"), b"onnx bytez").unwrap();
        let f = failed(verify(m, &envelope, &public));
        assert!(
            f.len() == 1 && f[0].starts_with("model.onnx: SHA-256"),
            "{f:?}"
        );
        std::fs::write(m.join("model.onnx"), b"onnx bytes").unwrap();
        // An edited statement.
        let mut edited: Value = serde_json::from_slice(&std::fs::read(&envelope).unwrap()).unwrap();
        let mut s = statement.clone();
        s["subject"][0]["digest"]["sha256"] = json!("00");
        edited["payload"] = json!(B64.encode(serde_json::to_vec(&s).unwrap()));
        std::fs::write(m.join("edited.json"), edited.to_string()).unwrap();
        let f = failed(verify(m, &m.join("edited.json"), &public));
        assert!(f[0].contains("changed after signing"), "{f:?}");
        // Another key.
        let (_, _, other) = SigningKey::generate().unwrap();
        std::fs::write(m.join("other.pub"), other).unwrap();
        let f = failed(verify(
            m,
            &envelope,
            &PublicKey::load(&m.join("other.pub")).unwrap(),
        ));
        assert!(f[0].contains("no signature by key"), "{f:?}");
        // Truncated.
        let text = std::fs::read_to_string(&envelope).unwrap();
        std::fs::write(m.join("cut.json"), &text[..text.len() / 2]).unwrap();
        let f = failed(verify(m, &m.join("cut.json"), &public));
        assert!(f[0].contains("not JSON"), "{f:?}");
    }
}
