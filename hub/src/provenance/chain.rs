//! The hub's Ethereum client for provenance anchors: alloy over JSON-RPC/HTTP, talking to the
//! `ShoalProvenance` contract (`hub/contracts/`). Every connection checks the endpoint's chain id
//! against the one configured, so a hub pointed at the wrong network refuses instead of
//! anchoring there; an endpoint that answers something other than JSON-RPC is named as such.

use std::time::Duration;

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, TxHash};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{BlockNumberOrTag, Filter, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolEvent};

alloy::sol! {
    event Anchored(bytes32 indexed statementDigest, bytes32 indexed ledgerHead, string uri);
    function anchor(bytes32 statementDigest, bytes32 ledgerHead, string uri) returns (bool);
    function anchorOf(bytes32 statementDigest) returns (bytes32 ledgerHead, uint64 blockNumber);
    function owner() returns (address);
}

/// The contract's creation code, compiled by `hub/contracts/build` (solc 0.8.37).
pub const BYTECODE: &str = include_str!("../../contracts/ShoalProvenance.bin");

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("chain RPC {url}: {reason}")]
    Rpc { url: String, reason: String },
    #[error("chain RPC {url} serves chain id {found}, not the configured {expected}")]
    WrongChain {
        url: String,
        expected: u64,
        found: u64,
    },
    #[error("{0}")]
    Contract(String),
    #[error("invalid chain key: {0}")]
    Key(String),
}

/// Where the chain is and what the hub expects of it.
#[derive(Debug, Clone)]
pub struct ChainConfig {
    pub rpc: String,
    pub chain_id: u64,
    /// The deployed contract; `None` lets the hub deploy it once.
    pub contract: Option<Address>,
    /// Blocks on top of an anchor's, itself included, before it counts as anchored.
    pub confirmations: u64,
}

/// An `Anchored` event as the chain holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorEvent {
    pub ledger_head: B256,
    pub uri: String,
    pub block_number: u64,
    pub block_hash: B256,
    pub tx_hash: TxHash,
}

/// A mined transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mined {
    pub block_number: u64,
    pub block_hash: B256,
    pub gas_used: u64,
    pub success: bool,
    pub contract: Option<Address>,
}

/// One connection to the chain, with the hub's account when it may send.
#[derive(Clone)]
pub struct Chain {
    provider: DynProvider,
    url: String,
    pub chain_id: u64,
    /// The hub's account (`None`: read only).
    pub account: Option<Address>,
}

/// A chain key: 32 bytes of hex (with or without 0x), as `cast wallet new` and Besu write them.
pub fn load_key(text: &str) -> Result<PrivateKeySigner, ChainError> {
    text.trim()
        .parse::<PrivateKeySigner>()
        .map_err(|e| ChainError::Key(format!("expected 32 bytes of hex: {e}")))
}

impl Chain {
    /// Connects to `url` and checks that it serves `chain_id`; with `key` the hub's account
    /// signs what it sends.
    pub async fn connect(
        url: &str,
        chain_id: u64,
        key: Option<PrivateKeySigner>,
    ) -> Result<Self, ChainError> {
        let parsed: reqwest::Url = url.parse().map_err(|e| ChainError::Rpc {
            url: url.into(),
            reason: format!("not a URL: {e}"),
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| ChainError::Rpc {
                url: url.into(),
                reason: e.to_string(),
            })?;
        let account = key.as_ref().map(|k| k.address());
        let provider = match key {
            Some(key) => ProviderBuilder::new()
                .wallet(EthereumWallet::from(key))
                .with_chain_id(chain_id)
                .connect_reqwest(http, parsed)
                .erased(),
            None => ProviderBuilder::new()
                .connect_reqwest(http, parsed)
                .erased(),
        };
        let chain = Self {
            provider,
            url: url.to_string(),
            chain_id,
            account,
        };
        let found = chain.rpc(chain.provider.get_chain_id().await)?;
        if found != chain_id {
            return Err(ChainError::WrongChain {
                url: url.into(),
                expected: chain_id,
                found,
            });
        }
        Ok(chain)
    }

    fn rpc<T>(&self, r: Result<T, alloy::transports::TransportError>) -> Result<T, ChainError> {
        r.map_err(|e| ChainError::Rpc {
            url: self.url.clone(),
            reason: describe(&e),
        })
    }

    /// Deploys the contract with the hub's account as its owner; returns the transaction.
    pub async fn deploy(&self) -> Result<TxHash, ChainError> {
        let code: Bytes = BYTECODE
            .trim()
            .parse()
            .map_err(|e| ChainError::Contract(format!("contract bytecode: {e}")))?;
        let tx = TransactionRequest::default().with_deploy_code(code);
        let pending = self.rpc(self.provider.send_transaction(tx).await)?;
        Ok(*pending.tx_hash())
    }

    /// Checks that `contract` is a `ShoalProvenance` owned by the hub's account (or by anyone,
    /// read only).
    pub async fn check_contract(&self, contract: Address) -> Result<(), ChainError> {
        let owner = self
            .call(contract, ownerCall {}.abi_encode())
            .await
            .and_then(|out| {
                ownerCall::abi_decode_returns(&out).map_err(|e| {
                    ChainError::Contract(format!(
                        "{contract} does not answer as a ShoalProvenance contract: {e}"
                    ))
                })
            })?;
        match self.account {
            Some(account) if account != owner => Err(ChainError::Contract(format!(
                "contract {contract} belongs to {owner}, not to this hub's account {account}"
            ))),
            _ => Ok(()),
        }
    }

    async fn call(&self, to: Address, input: Vec<u8>) -> Result<Bytes, ChainError> {
        let tx = TransactionRequest::default()
            .with_to(to)
            .with_input(Bytes::from(input));
        let out = self.rpc(self.provider.call(tx).await)?;
        if out.is_empty() {
            return Err(ChainError::Contract(format!(
                "no contract at {to} on chain {}",
                self.chain_id
            )));
        }
        Ok(out)
    }

    /// The ledger head and block a digest was anchored with, if it was.
    pub async fn anchor_of(
        &self,
        contract: Address,
        digest: B256,
    ) -> Result<Option<(B256, u64)>, ChainError> {
        let out = self
            .call(
                contract,
                anchorOfCall {
                    statementDigest: digest,
                }
                .abi_encode(),
            )
            .await?;
        let r = anchorOfCall::abi_decode_returns(&out)
            .map_err(|e| ChainError::Contract(format!("anchorOf answered garbage: {e}")))?;
        Ok((r.blockNumber != 0).then_some((r.ledgerHead, r.blockNumber)))
    }

    /// Sends `anchor(digest, head, uri)`; returns the transaction.
    pub async fn send_anchor(
        &self,
        contract: Address,
        digest: B256,
        head: B256,
        uri: &str,
    ) -> Result<TxHash, ChainError> {
        let input = anchorCall {
            statementDigest: digest,
            ledgerHead: head,
            uri: uri.to_string(),
        }
        .abi_encode();
        let tx = TransactionRequest::default()
            .with_to(contract)
            .with_input(Bytes::from(input));
        let pending = self.rpc(self.provider.send_transaction(tx).await)?;
        Ok(*pending.tx_hash())
    }

    /// The transaction's block, once mined.
    pub async fn mined(&self, tx: TxHash) -> Result<Option<Mined>, ChainError> {
        let receipt = self.rpc(self.provider.get_transaction_receipt(tx).await)?;
        Ok(receipt.and_then(|r| {
            Some(Mined {
                block_number: r.block_number?,
                block_hash: r.block_hash?,
                gas_used: r.gas_used,
                success: r.status(),
                contract: r.contract_address,
            })
        }))
    }

    /// Whether the node still knows the transaction (mined or waiting in its pool).
    pub async fn knows(&self, tx: TxHash) -> Result<bool, ChainError> {
        Ok(self
            .rpc(self.provider.get_transaction_by_hash(tx).await)?
            .is_some())
    }

    /// The newest block's number.
    pub async fn head(&self) -> Result<u64, ChainError> {
        self.rpc(self.provider.get_block_number().await)
    }

    /// The canonical block at `number`'s hash, if there is one.
    pub async fn block_hash(&self, number: u64) -> Result<Option<B256>, ChainError> {
        let block = self.rpc(
            self.provider
                .get_block_by_number(BlockNumberOrTag::Number(number))
                .await,
        )?;
        Ok(block.map(|b| b.header.hash))
    }

    /// The `Anchored` event for `digest` in `contract`, if the chain has one.
    pub async fn event(
        &self,
        contract: Address,
        digest: B256,
    ) -> Result<Option<AnchorEvent>, ChainError> {
        let filter = Filter::new()
            .address(contract)
            .event_signature(Anchored::SIGNATURE_HASH)
            .topic1(digest)
            .from_block(0);
        let logs = self.rpc(self.provider.get_logs(&filter).await)?;
        let Some(log) = logs.into_iter().find(|l| !l.removed) else {
            return Ok(None);
        };
        let (Some(block_number), Some(block_hash), Some(tx_hash)) =
            (log.block_number, log.block_hash, log.transaction_hash)
        else {
            return Err(ChainError::Contract(
                "the chain answered an Anchored event without its block".into(),
            ));
        };
        let decoded = Anchored::decode_log(&log.inner).map_err(|e| {
            ChainError::Contract(format!("an Anchored event that does not decode: {e}"))
        })?;
        Ok(Some(AnchorEvent {
            ledger_head: decoded.ledgerHead,
            uri: decoded.data.uri.clone(),
            block_number,
            block_hash,
            tx_hash,
        }))
    }
}

/// A transport error in words: unreachable, not JSON-RPC, or the node's own error.
fn describe(e: &alloy::transports::TransportError) -> String {
    use alloy::transports::RpcError;
    match e {
        RpcError::ErrorResp(payload) => format!("the node refused: {}", payload.message),
        RpcError::DeserError { text, .. } => format!(
            "answered something that is not JSON-RPC: {}",
            text.chars().take(120).collect::<String>()
        ),
        RpcError::Transport(kind) => format!("unreachable: {kind}"),
        other => other.to_string(),
    }
}
