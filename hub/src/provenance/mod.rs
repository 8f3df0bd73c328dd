//! The provenance ledger: signed statements about models (DSSE envelopes over in-toto
//! statements, see `shoal_ml::provenance`), kept append-only in the hub's store, each entry
//! hash-chained to the one before it. The hub takes a statement only when one of the keys it
//! trusts (`--provenance-key`) signed it, once per statement (the same one again answers the
//! entry it already has). Reading the ledger re-checks the whole chain, so an entry edited or
//! removed in the store shows as a break at its index.

pub mod anchor;
pub mod chain;
pub mod verify;

use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use shoal_ml::provenance::PublicKey;

use crate::store::records::{RecordTable, RecordWrite};
use crate::store::{Store, StoreError};

const LEDGER: RecordTable = RecordTable::new("provenance_ledger");
/// The `previous` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One file a statement names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subject {
    pub name: String,
    pub sha256: String,
}

/// A public key the ledger trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TrustedKey {
    pub key_id: String,
    /// SubjectPublicKeyInfo PEM: what `shoal models verify --public-key` reads.
    pub pem: String,
}

/// A ledger entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entry {
    /// 1, 2, 3… in append order.
    pub index: u64,
    pub time_ms: i64,
    /// SHA-256 of the signed statement (the envelope's payload).
    pub statement_sha256: String,
    /// The key that signed it.
    pub key_id: String,
    pub subjects: Vec<Subject>,
    /// Who recorded it (the caller's principal).
    pub by: String,
    /// The previous entry's hash (64 zeros for the first).
    pub previous: String,
    /// SHA-256 over this entry's fields and `previous`.
    pub hash: String,
    /// The envelope as received.
    #[schema(value_type = Object)]
    pub envelope: Value,
}

impl Entry {
    fn computed_hash(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.previous.as_str(),
            &self.index.to_string(),
            &self.time_ms.to_string(),
            &self.statement_sha256,
            &self.key_id,
            &self.by,
        ] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        for s in &self.subjects {
            h.update(format!("{}\t{}\n", s.name, s.sha256).as_bytes());
        }
        shoal_ml::dataset::hex(&h.finalize())
    }
}

/// What a model needs in the ledger before the hub deploys it (`--deploy-requires`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Requirement {
    /// Any model is deployed.
    #[default]
    None,
    /// A statement signed by a trusted key names the model's file.
    Signed,
    /// That statement is also anchored on chain and confirmed (needs --chain-rpc).
    Anchored,
}

/// The hub's deployment policy over the ledger.
#[derive(Clone)]
pub struct Policy {
    pub requires: Requirement,
    pub ledger: std::sync::Arc<Ledger>,
    pub anchorer: Option<std::sync::Arc<anchor::Anchorer>>,
}

impl Policy {
    /// `Ok` when the model whose `model.onnx` has digest `onnx_sha256` may be deployed; else
    /// why not.
    pub fn admits(&self, onnx_sha256: &str) -> Result<(), String> {
        if self.requires == Requirement::None {
            return Ok(());
        }
        let (entries, chain) = self.ledger.entries().map_err(|e| e.to_string())?;
        if !chain.intact {
            return Err(format!(
                "the provenance ledger is broken at entry {} ({}): no model is deployed until it is repaired",
                chain.broken_at.unwrap_or_default(),
                chain.reason.unwrap_or_default()
            ));
        }
        let Some(entry) = entries.iter().find(|e| {
            e.subjects
                .iter()
                .any(|s| s.name == "model.onnx" && s.sha256 == onnx_sha256)
        }) else {
            return Err(format!(
                "no signed statement in the provenance ledger names this model.onnx (sha256 {onnx_sha256}); \
                 this hub deploys signed models only (--deploy-requires): record its statement with \
                 `shoal models provenance --push MODEL/provenance.dsse.json`"
            ));
        };
        if self.requires == Requirement::Anchored {
            let Some(anchorer) = &self.anchorer else {
                return Err(
                    "--deploy-requires anchored, but the hub has no chain (--chain-rpc)".into(),
                );
            };
            let anchors = anchorer.anchors().map_err(|e| e.to_string())?;
            let state = anchor::Anchorer::state_of(entry.index, &anchors).state;
            if state != anchor::AnchorState::Anchored {
                return Err(format!(
                    "the model's statement (ledger entry {}) is {} on chain, not anchored yet; \
                     this hub deploys anchored models only (--deploy-requires anchored)",
                    entry.index,
                    serde_json::to_value(&state)
                        .expect("state")
                        .as_str()
                        .unwrap_or_default()
                ));
            }
        }
        Ok(())
    }
}

/// Whether the chain holds; where it breaks when not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ChainCheck {
    pub intact: bool,
    /// The first entry that does not follow from the one before it.
    pub broken_at: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("this hub trusts no provenance keys: start it with --provenance-key FILE")]
    NoKeys,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Ledger {
    store: Store,
    keys: Vec<PublicKey>,
    /// The head and which statements are recorded (read once at open); appends hold it, one
    /// at a time: each needs the head before it.
    head: Mutex<Head>,
}

/// The newest entry's index and hash, and each recorded statement's index.
#[derive(Default)]
struct Head {
    index: u64,
    hash: String,
    statements: std::collections::HashMap<String, u64>,
}

impl Ledger {
    /// The ledger in `store`, trusting the public keys in `key_files` and the public half of
    /// `signing_key` (the key the hub's own training runs sign with).
    pub fn open(
        store: &Store,
        key_files: &[PathBuf],
        signing_key: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        store
            .create_record_tables(&[LEDGER])
            .map_err(|e| e.to_string())?;
        let mut keys = key_files
            .iter()
            .map(|f| PublicKey::load(f).map_err(|e| format!("invalid provenance-key: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(file) = signing_key {
            let key = shoal_ml::provenance::SigningKey::load(file)
                .map_err(|e| format!("invalid signing-key: {e}"))?;
            keys.push(
                PublicKey::from_pem(&key.public_pem())
                    .map_err(|e| format!("invalid signing-key: {e}"))?,
            );
        }
        let entries: Vec<Entry> = store.records(LEDGER).map_err(|e| e.to_string())?;
        let head = Head {
            index: entries.last().map_or(0, |e| e.index),
            hash: entries
                .last()
                .map_or_else(|| GENESIS.to_string(), |e| e.hash.clone()),
            statements: entries
                .iter()
                .map(|e| (e.statement_sha256.clone(), e.index))
                .collect(),
        };
        Ok(Self {
            store: store.clone(),
            keys,
            head: Mutex::new(head),
        })
    }

    /// How many entries the ledger holds (the newest entry's index), without reading them.
    pub fn len(&self) -> u64 {
        self.head.lock().expect("ledger lock").index
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The trusted keys' ids.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.key_id.clone()).collect()
    }

    /// The trusted public keys, as PEM, by id.
    pub fn public_keys(&self) -> Vec<TrustedKey> {
        self.keys
            .iter()
            .map(|k| TrustedKey {
                key_id: k.key_id.clone(),
                pem: k.to_pem(),
            })
            .collect()
    }

    /// Records `envelope` if a trusted key signed it: (the entry, whether it is new).
    pub fn append(&self, envelope: Value, by: &str) -> Result<(Entry, bool), LedgerError> {
        if self.keys.is_empty() {
            return Err(LedgerError::NoKeys);
        }
        let opened = shoal_ml::provenance::open(&envelope, &self.keys).map_err(|e| {
            LedgerError::Refused(format!(
                "{e} (this hub trusts {})",
                self.key_ids().join(", ")
            ))
        })?;
        let subjects = opened.statement["subject"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let name = s["name"].as_str().unwrap_or_default().to_string();
                let sha256 = s["digest"]["sha256"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if name.is_empty() || sha256.len() != 64 {
                    return Err(LedgerError::Refused(
                        "a subject without a name or a SHA-256 digest".into(),
                    ));
                }
                Ok(Subject { name, sha256 })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut head = self.head.lock().expect("ledger lock");
        if let Some(&index) = head.statements.get(&opened.sha256)
            && let Some(e) = self
                .store
                .record::<Entry>(LEDGER, &format!("{index:020}"))?
        {
            return Ok((e, false));
        }
        let mut entry = Entry {
            index: head.index + 1,
            time_ms: crate::now_ms(),
            statement_sha256: opened.sha256,
            key_id: opened.key_id,
            subjects,
            by: by.to_string(),
            previous: head.hash.clone(),
            hash: String::new(),
            envelope,
        };
        entry.hash = entry.computed_hash();
        self.store.write_records(&[RecordWrite::put(
            LEDGER,
            &format!("{:020}", entry.index),
            &entry,
        )])?;
        head.index = entry.index;
        head.hash = entry.hash.clone();
        head.statements
            .insert(entry.statement_sha256.clone(), entry.index);
        Ok((entry, true))
    }

    /// Every entry in order, and whether the chain holds.
    pub fn entries(&self) -> Result<(Vec<Entry>, ChainCheck), StoreError> {
        let entries: Vec<Entry> = self.store.records(LEDGER)?;
        Ok((entries.clone(), check(&entries)))
    }
}

/// Walks the chain: indexes consecutive from 1, each `previous` the hash before it, each hash
/// its own fields'.
pub fn check(entries: &[Entry]) -> ChainCheck {
    let mut previous = GENESIS.to_string();
    for (i, e) in entries.iter().enumerate() {
        let reason = if e.index != i as u64 + 1 {
            Some(format!(
                "entry {} follows entry {i}: one is missing",
                e.index
            ))
        } else if e.previous != previous {
            Some(format!(
                "entry {} does not chain to the entry before it",
                e.index
            ))
        } else if e.hash != e.computed_hash() {
            Some(format!(
                "entry {} was changed after it was recorded",
                e.index
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return ChainCheck {
                intact: false,
                broken_at: Some(e.index),
                reason: Some(reason),
            };
        }
        previous = e.hash.clone();
    }
    ChainCheck {
        intact: true,
        broken_at: None,
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_ml::provenance::SigningKey;

    #[test]
    fn statements_chain_once_each_and_a_removed_or_edited_entry_breaks_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (key, _, public) = SigningKey::generate().unwrap();
        std::fs::write(dir.path().join("k.pub"), public).unwrap();
        let ledger = Ledger::open(&store, &[dir.path().join("k.pub")], None).unwrap();
        let statement = |n: &str| {
            serde_json::json!({ "_type": "https://in-toto.io/Statement/v1",
                "subject": [{ "name": "model.onnx", "digest": { "sha256": n.repeat(64) } }] })
        };
        let (a, new) = ledger
            .append(key.sign(&statement("a")).unwrap(), "ci")
            .unwrap();
        assert!(new && a.index == 1 && a.previous == GENESIS);
        let (b, _) = ledger
            .append(key.sign(&statement("b")).unwrap(), "ci")
            .unwrap();
        assert_eq!(b.previous, a.hash);
        let (again, new) = ledger.append(a.envelope.clone(), "ci").unwrap();
        assert!(!new && again.index == 1, "once per statement");
        let (entries, chain) = ledger.entries().unwrap();
        assert!(chain.intact && entries.len() == 2);

        let (other, _, _) = SigningKey::generate().unwrap();
        let refused = ledger.append(other.sign(&statement("c")).unwrap(), "ci");
        assert!(
            matches!(refused, Err(LedgerError::Refused(m)) if m.contains("no signature by key"))
        );

        let mut edited = entries.clone();
        edited[0].by = "mallory".into();
        assert_eq!(check(&edited).broken_at, Some(1));
        assert!(check(&entries[1..]).reason.unwrap().contains("missing"));
    }
}
