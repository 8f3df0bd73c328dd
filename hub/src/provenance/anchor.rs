//! Anchoring the ledger on chain. The ledger is the outbox: an entry is pending until an anchor
//! covers it, and an anchor of entry N covers N and every entry before it (each entry's hash
//! chains to the one before). So one transaction anchors everything recorded since the last
//! one, however many statements that is.
//!
//! A round: advance the anchors in flight (mined? enough confirmations? block still
//! canonical?), then, when the newest entry is not covered yet, anchor it. The transaction is
//! kept before it is waited for, and the contract records a digest once, so a hub that crashes
//! or loses a receipt finds its anchor again (or sends it again, harmlessly) at the next
//! round. When the chain is down the rounds fail, back off with jitter up to a minute, and the
//! entries stay pending; nothing is lost.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::chain::{Chain, ChainConfig, ChainError};
use super::{Entry, Ledger};
use crate::store::records::{RecordTable, RecordWrite};
use crate::store::{Store, StoreError};

const ANCHORS: RecordTable = RecordTable::new("provenance_anchors");
const CONTRACTS: RecordTable = RecordTable::new("provenance_contracts");
/// The longest wait between failed rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One anchor transaction: ledger entry `index` (and so every entry before it) on chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Anchor {
    /// The ledger entry anchored; the anchor covers it and every entry before it.
    pub index: u64,
    pub statement_sha256: String,
    /// The entry's hash: the ledger head the contract records.
    pub ledger_head: String,
    pub chain_id: u64,
    pub contract: String,
    pub tx_hash: String,
    pub block_number: Option<u64>,
    pub block_hash: Option<String>,
    pub gas_used: Option<u64>,
    /// Blocks on top of the anchor's, itself included, when last checked.
    pub confirmations: u64,
    /// Mined, confirmed and its block still canonical.
    pub anchored: bool,
    pub submitted_ms: i64,
    pub anchored_ms: Option<i64>,
}

/// Where an entry stands on chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnchorState {
    /// No anchor covers it yet.
    Pending,
    /// An anchor that covers it is sent, waiting to be mined or confirmed.
    Confirming,
    /// Anchored and confirmed.
    Anchored,
}

/// An entry's state and the anchor that covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EntryAnchor {
    pub state: AnchorState,
    pub anchor: Option<Anchor>,
}

/// How anchoring goes, for status and /metrics.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct AnchorHealth {
    pub rpc: String,
    pub chain_id: u64,
    pub contract: Option<String>,
    pub account: String,
    pub confirmations: u64,
    /// Failed rounds since the hub started.
    pub errors: u64,
    /// The last round's error, until a round succeeds.
    pub last_error: Option<String>,
    pub last_ok_ms: Option<i64>,
    /// Anchor transactions sent since the hub started.
    pub sent: u64,
}

#[derive(Serialize, Deserialize)]
struct ContractRecord {
    chain_id: u64,
    address: String,
}

pub struct Anchorer {
    store: Store,
    ledger: Arc<Ledger>,
    config: ChainConfig,
    key: PrivateKeySigner,
    wake: Notify,
    health: Mutex<AnchorHealth>,
}

fn b256(hex: &str) -> Result<B256, ChainError> {
    hex.parse()
        .map_err(|e| ChainError::Contract(format!("{hex:?} is not 32 bytes of hex: {e}")))
}

fn hex0x(b: B256) -> String {
    format!("{b:#x}")
}

impl Anchorer {
    pub fn new(
        store: &Store,
        ledger: Arc<Ledger>,
        config: ChainConfig,
        key: PrivateKeySigner,
    ) -> Result<Self, StoreError> {
        store.create_record_tables(&[ANCHORS, CONTRACTS])?;
        let health = AnchorHealth {
            rpc: config.rpc.clone(),
            chain_id: config.chain_id,
            contract: config.contract.map(|a| a.to_string()),
            account: key.address().to_string(),
            confirmations: config.confirmations,
            ..AnchorHealth::default()
        };
        Ok(Self {
            store: store.clone(),
            ledger,
            config,
            key,
            wake: Notify::new(),
            health: Mutex::new(health),
        })
    }

    /// Starts a round now (after an append).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn health(&self) -> AnchorHealth {
        self.health.lock().expect("health lock").clone()
    }

    /// Every anchor sent, in ledger order.
    pub fn anchors(&self) -> Result<Vec<Anchor>, StoreError> {
        self.store.records(ANCHORS)
    }

    /// Where entry `index` stands, given the anchors.
    pub fn state_of(index: u64, anchors: &[Anchor]) -> EntryAnchor {
        let covering = anchors.iter().filter(|a| a.index >= index);
        if let Some(a) = covering.clone().find(|a| a.anchored) {
            return EntryAnchor {
                state: AnchorState::Anchored,
                anchor: Some(a.clone()),
            };
        }
        match anchors.iter().find(|a| a.index >= index) {
            Some(a) => EntryAnchor {
                state: AnchorState::Confirming,
                anchor: Some(a.clone()),
            },
            None => EntryAnchor {
                state: AnchorState::Pending,
                anchor: None,
            },
        }
    }

    /// How many of the first `entries` entries are pending and how many confirming, from the
    /// anchors alone (an anchor covers its entry and every one before it).
    pub fn counts(entries: u64, anchors: &[Anchor]) -> (u64, u64) {
        let anchored = anchors
            .iter()
            .filter(|a| a.anchored)
            .map(|a| a.index)
            .max()
            .unwrap_or(0)
            .min(entries);
        let covered = anchors
            .iter()
            .map(|a| a.index)
            .max()
            .unwrap_or(0)
            .clamp(anchored, entries);
        (entries - covered, covered - anchored)
    }

    /// Rounds until `shutdown`: every second, at once after an append, further apart after
    /// failures.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut chain: Option<Chain> = None;
        let mut backoff = Duration::from_secs(1);
        loop {
            let result = match &chain {
                Some(c) => self.round(c).await,
                None => match Chain::connect(
                    &self.config.rpc,
                    self.config.chain_id,
                    Some(self.key.clone()),
                )
                .await
                {
                    Ok(c) => {
                        let r = self.round(&c).await;
                        chain = Some(c);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            let wait = match result {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    let mut h = self.health.lock().expect("health lock");
                    h.last_error = None;
                    h.last_ok_ms = Some(crate::now_ms());
                    Duration::from_secs(1)
                }
                Err(e) => {
                    tracing::warn!("provenance anchoring: {e}; retrying in {backoff:?}");
                    {
                        let mut h = self.health.lock().expect("health lock");
                        h.errors += 1;
                        h.last_error = Some(e.to_string());
                    }
                    if matches!(e, ChainError::Rpc { .. } | ChainError::WrongChain { .. }) {
                        chain = None;
                    }
                    // Full jitter between half and all of the backoff.
                    let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// The contract: configured, deployed earlier on this chain, or deployed now.
    async fn contract(&self, chain: &Chain) -> Result<Address, ChainError> {
        let key = self.config.chain_id.to_string();
        let known = match self.config.contract {
            Some(a) => Some(a),
            None => self
                .store
                .record::<ContractRecord>(CONTRACTS, &key)
                .map_err(store_error)?
                .map(|r| r.address.parse::<Address>())
                .transpose()
                .map_err(|e| ChainError::Contract(format!("stored contract address: {e}")))?,
        };
        if let Some(address) = known {
            if self.health().contract.as_deref() != Some(&address.to_string()) {
                chain.check_contract(address).await?;
                self.health.lock().expect("health lock").contract = Some(address.to_string());
            }
            return Ok(address);
        }
        let tx = chain.deploy().await?;
        let address = loop {
            if let Some(m) = chain.mined(tx).await? {
                match (m.success, m.contract) {
                    (true, Some(a)) => break a,
                    _ => {
                        return Err(ChainError::Contract(format!(
                            "deploying the contract failed (transaction {tx})"
                        )));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        self.store
            .write_records(&[RecordWrite::put(
                CONTRACTS,
                &key,
                &ContractRecord {
                    chain_id: self.config.chain_id,
                    address: address.to_string(),
                },
            )])
            .map_err(store_error)?;
        tracing::info!(
            "deployed the provenance contract at {address} on chain {}",
            self.config.chain_id
        );
        self.health.lock().expect("health lock").contract = Some(address.to_string());
        Ok(address)
    }

    async fn round(&self, chain: &Chain) -> Result<(), ChainError> {
        let contract = self.contract(chain).await?;
        let mut anchors = self.anchors().map_err(store_error)?;
        for a in anchors.iter_mut().filter(|a| !a.anchored) {
            self.advance(chain, contract, a).await?;
        }
        let ours = || {
            anchors
                .iter()
                .filter(|a| a.chain_id == self.config.chain_id)
        };
        // One transaction at a time: what is recorded while it waits to be mined goes into
        // the next, together (the store writer's group commit, on chain).
        if ours().any(|a| a.block_number.is_none()) {
            return Ok(());
        }
        let covered = ours().map(|a| a.index).max().unwrap_or(0);
        if self.ledger.len() <= covered {
            return Ok(());
        }
        // Something to anchor: the ledger is read, and re-walked, once per transaction.
        let (entries, check) = self.ledger.entries().map_err(store_error)?;
        if !check.intact {
            return Err(ChainError::Contract(format!(
                "the ledger's chain is broken at entry {}: {}; nothing is anchored until it is repaired",
                check.broken_at.unwrap_or_default(),
                check.reason.unwrap_or_default()
            )));
        }
        if let Some(newest) = entries.last().filter(|e| e.index > covered) {
            self.send(chain, contract, newest).await?;
        }
        Ok(())
    }

    /// Anchors `entry` (and so every entry before it), unless the chain already has it.
    async fn send(
        &self,
        chain: &Chain,
        contract: Address,
        entry: &Entry,
    ) -> Result<(), ChainError> {
        let digest = b256(&entry.statement_sha256)?;
        let head = b256(&entry.hash)?;
        let mut anchor = Anchor {
            index: entry.index,
            statement_sha256: entry.statement_sha256.clone(),
            ledger_head: entry.hash.clone(),
            chain_id: self.config.chain_id,
            contract: contract.to_string(),
            tx_hash: String::new(),
            block_number: None,
            block_hash: None,
            gas_used: None,
            confirmations: 0,
            anchored: false,
            submitted_ms: crate::now_ms(),
            anchored_ms: None,
        };
        match chain.event(contract, digest).await? {
            // Sent before a crash, or by another hub with this ledger: found, not sent again.
            Some(ev) => anchor.tx_hash = ev.tx_hash.to_string(),
            None => {
                let uri = format!("shoal:provenance/{}", entry.index);
                anchor.tx_hash = chain
                    .send_anchor(contract, digest, head, &uri)
                    .await?
                    .to_string();
                self.health.lock().expect("health lock").sent += 1;
            }
        }
        self.put(&anchor)
    }

    /// Moves an anchor in flight on: mined, confirmed, canonical; or dropped.
    async fn advance(
        &self,
        chain: &Chain,
        contract: Address,
        a: &mut Anchor,
    ) -> Result<(), ChainError> {
        if a.chain_id != self.config.chain_id {
            return Ok(());
        }
        let digest = b256(&a.statement_sha256)?;
        // The event is the authority: it names the block that recorded the digest, whichever
        // transaction that was.
        let Some(ev) = chain.event(contract, digest).await? else {
            let tx = a
                .tx_hash
                .parse()
                .map_err(|e| ChainError::Contract(format!("stored transaction hash: {e}")))?;
            if let Some(m) = chain.mined(tx).await?
                && !m.success
            {
                tracing::warn!("anchor transaction {tx} reverted; anchoring again");
                return self.forget(a);
            }
            if !chain.knows(tx).await? {
                tracing::warn!("anchor transaction {tx} was dropped; anchoring again");
                return self.forget(a);
            }
            return Ok(());
        };
        if hex0x(ev.ledger_head) != format!("0x{}", a.ledger_head) {
            return Err(ChainError::Contract(format!(
                "the chain anchors statement {} with ledger head {}, not this ledger's {}",
                a.statement_sha256, ev.ledger_head, a.ledger_head
            )));
        }
        if a.gas_used.is_none()
            && let Ok(tx) = a.tx_hash.parse()
            && let Some(m) = chain.mined(tx).await?
        {
            a.gas_used = Some(m.gas_used);
        }
        a.tx_hash = ev.tx_hash.to_string();
        a.block_number = Some(ev.block_number);
        a.block_hash = Some(hex0x(ev.block_hash));
        let head = chain.head().await?;
        a.confirmations = (head + 1).saturating_sub(ev.block_number);
        if a.confirmations >= self.config.confirmations.max(1) {
            match chain.block_hash(ev.block_number).await? {
                Some(h) if h == ev.block_hash => {
                    a.anchored = true;
                    a.anchored_ms = Some(crate::now_ms());
                }
                _ => {
                    tracing::warn!(
                        "block {} left the canonical chain; anchoring entry {} again",
                        ev.block_number,
                        a.index
                    );
                    return self.forget(a);
                }
            }
        }
        self.put(a)
    }

    fn put(&self, a: &Anchor) -> Result<(), ChainError> {
        self.store
            .write_records(&[RecordWrite::put(ANCHORS, &format!("{:020}", a.index), a)])
            .map_err(store_error)
    }

    fn forget(&self, a: &Anchor) -> Result<(), ChainError> {
        self.store
            .write_records(&[RecordWrite::Remove(ANCHORS, &format!("{:020}", a.index))])
            .map_err(store_error)
    }
}

fn store_error(e: StoreError) -> ChainError {
    ChainError::Contract(format!("the hub's store: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor(index: u64, anchored: bool) -> Anchor {
        Anchor {
            index,
            statement_sha256: String::new(),
            ledger_head: String::new(),
            chain_id: 1,
            contract: String::new(),
            tx_hash: format!("0x{index}"),
            block_number: anchored.then_some(index),
            block_hash: None,
            gas_used: None,
            confirmations: 0,
            anchored,
            submitted_ms: 0,
            anchored_ms: None,
        }
    }

    #[test]
    fn an_anchor_covers_its_entry_and_every_one_before_it() {
        // Entries 1–3 anchored by the anchor of 3; 4–5 sent with the anchor of 5; 6 pending.
        let anchors = [anchor(3, true), anchor(5, false)];
        let state = |i| Anchorer::state_of(i, &anchors);
        for i in 1..=3 {
            assert_eq!(state(i).state, AnchorState::Anchored);
            assert_eq!(state(i).anchor.unwrap().index, 3);
        }
        for i in 4..=5 {
            assert_eq!(state(i).state, AnchorState::Confirming);
            assert_eq!(state(i).anchor.unwrap().index, 5);
        }
        assert_eq!(state(6).state, AnchorState::Pending);
        assert_eq!(state(6).anchor, None);
        // The counts /metrics shows agree with the states.
        assert_eq!(Anchorer::counts(6, &anchors), (1, 2));
        assert_eq!(Anchorer::counts(6, &[]), (6, 0));
    }
}
