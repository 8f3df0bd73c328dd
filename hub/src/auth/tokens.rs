//! API tokens: `shoal_<id>_<secret>`, shown once at creation and stored as the SHA-256 of the
//! secret (a token is 256 random bits, so a fast hash is enough: there is nothing to guess).
//! Each has a name, a role, an optional expiry, and can be revoked; a revoked token stays
//! listed (and audited) but opens nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_ml::dataset::hex;
use utoipa::ToSchema;

use super::{Principal, Role};
use crate::store::records::{RecordTable, RecordWrite};
use crate::store::{Store, StoreError};

const TOKENS: RecordTable = RecordTable::new("api_tokens");
const PREFIX: &str = "shoal_";
/// The file `shoal serve` writes the first admin token to, in its data dir.
pub const BOOTSTRAP_FILE: &str = "admin.token";
/// The first admin token's name.
pub const BOOTSTRAP_NAME: &str = "bootstrap-admin";

/// A token as stored (the secret only as its hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    info: TokenInfo,
    secret_sha256: String,
}

/// A token as listed: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Public id, the part after `shoal_` in the token.
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_ms: i64,
    /// Who created it (a principal's name).
    pub created_by: String,
    /// When it stops working; absent: never.
    pub expires_ms: Option<i64>,
    /// When it was revoked; absent: not revoked.
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a Shoal API token (they look like shoal_<id>_<secret>)")]
    Malformed,
    #[error("the token is not known to this hub (a typo, or made for another hub)")]
    Unknown,
    #[error("the token {name:?} has expired; ask an admin for a new one (shoal tokens create)")]
    Expired { name: String },
    #[error("the token {name:?} was revoked")]
    Revoked { name: String },
    #[error("invalid token name {0:?}: use 1-64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    #[error("a token named {0:?} is already active; revoke it first or choose another name")]
    NameTaken(String),
    #[error("no token with id or name {0:?}")]
    NotFound(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TokenError {
    /// The reason label under which a refusal is counted.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed | TokenError::Unknown => "invalid_token",
            TokenError::Expired { .. } => "expired_token",
            TokenError::Revoked { .. } => "revoked_token",
            _ => "error",
        }
    }
}

/// The hub's API tokens.
#[derive(Clone)]
pub struct Tokens {
    store: Store,
}

impl Tokens {
    pub fn open(store: Store) -> Result<Self, StoreError> {
        store.create_record_tables(&[TOKENS])?;
        Ok(Self { store })
    }

    /// Makes a token; returns what is listed and the token itself, which is never shown again.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        expires_in: Option<Duration>,
        created_by: &str,
    ) -> Result<(TokenInfo, String), TokenError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(TokenError::BadName(name.into()));
        }
        let now = crate::now_ms();
        if self
            .list()?
            .iter()
            .any(|t| t.name == name && active(t, now))
        {
            return Err(TokenError::NameTaken(name.into()));
        }
        let id = random_hex(6);
        let secret = random_hex(32);
        let info = TokenInfo {
            id: id.clone(),
            name: name.into(),
            role,
            created_ms: now,
            created_by: created_by.into(),
            expires_ms: expires_in
                .map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
            revoked_ms: None,
        };
        let stored = Stored {
            info: info.clone(),
            secret_sha256: sha256_hex(&secret),
        };
        self.store
            .write_records(&[RecordWrite::put(TOKENS, &id, &stored)])?;
        Ok((info, format!("{PREFIX}{id}_{secret}")))
    }

    /// Every token, revoked and expired ones included, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        let mut all: Vec<TokenInfo> = self
            .store
            .records::<Stored>(TOKENS)?
            .into_iter()
            .map(|s| s.info)
            .collect();
        all.sort_by_key(|t| (t.created_ms, t.id.clone()));
        Ok(all)
    }

    /// Revokes the token with this id, or the active one with this name.
    pub fn revoke(&self, id_or_name: &str) -> Result<TokenInfo, TokenError> {
        let now = crate::now_ms();
        let all = self.store.records::<Stored>(TOKENS)?;
        let found = all
            .iter()
            .find(|s| s.info.id == id_or_name)
            .or_else(|| {
                all.iter()
                    .find(|s| s.info.name == id_or_name && active(&s.info, now))
            })
            .ok_or_else(|| TokenError::NotFound(id_or_name.into()))?;
        let mut stored = found.clone();
        if stored.info.revoked_ms.is_none() {
            stored.info.revoked_ms = Some(now);
            self.store
                .write_records(&[RecordWrite::put(TOKENS, &stored.info.id, &stored)])?;
        }
        Ok(stored.info)
    }

    /// The principal a presented token stands for, at `now_ms`.
    pub fn authenticate(&self, presented: &str, now_ms: i64) -> Result<Principal, TokenError> {
        let (id, secret) = presented
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .filter(|(id, secret)| is_hex(id, 12) && is_hex(secret, 64))
            .ok_or(TokenError::Malformed)?;
        let stored: Stored = self.store.record(TOKENS, id)?.ok_or(TokenError::Unknown)?;
        if !constant_time_eq(
            sha256_hex(secret).as_bytes(),
            stored.secret_sha256.as_bytes(),
        ) {
            return Err(TokenError::Unknown);
        }
        let info = stored.info;
        if info.revoked_ms.is_some() {
            return Err(TokenError::Revoked { name: info.name });
        }
        if info.expires_ms.is_some_and(|e| e <= now_ms) {
            return Err(TokenError::Expired { name: info.name });
        }
        Ok(Principal {
            name: format!("token:{}", info.name),
            role: info.role,
        })
    }

    /// On a hub with no tokens at all, makes an admin token and writes it to
    /// `DATA_DIR/admin.token` (mode 0600) for the operator to log in with; returns that path.
    /// A hub that has tokens is left as it is.
    pub fn bootstrap(&self, data_dir: &Path) -> Result<Option<PathBuf>, TokenError> {
        if !self.store.records::<Stored>(TOKENS)?.is_empty() {
            return Ok(None);
        }
        let (_, token) = self.create(BOOTSTRAP_NAME, Role::Admin, None, "shoal serve")?;
        let path = data_dir.join(BOOTSTRAP_FILE);
        write_secret(&path, &format!("{token}\n")).map_err(|source| TokenError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(Some(path))
    }
}

fn active(t: &TokenInfo, now_ms: i64) -> bool {
    t.revoked_ms.is_none() && t.expires_ms.is_none_or(|e| e > now_ms)
}

/// Writes `text` to `path` readable by its owner only, replacing it whole (temp file + rename).
pub fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the system's random source works");
    hex(&buf)
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

pub(crate) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> (tempfile::TempDir, Tokens) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, Tokens::open(store).unwrap())
    }

    #[test]
    fn a_created_token_authenticates_with_its_role_and_is_stored_hashed() {
        let (dir, t) = tokens();
        let (info, token) = t.create("ci", Role::Scientist, None, "test").unwrap();
        let p = t.authenticate(&token, crate::now_ms()).unwrap();
        assert_eq!(p.role, Role::Scientist);
        assert_eq!(p.name, "token:ci");
        assert!(token.starts_with(&format!("shoal_{}_", info.id)));
        let secret = token.rsplit('_').next().unwrap();
        let raw = std::fs::read(dir.path().join("shoal.redb")).unwrap_or_default();
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret itself is never stored"
        );
    }

    #[test]
    fn wrong_secret_expired_revoked_and_malformed_are_refused() {
        let (_dir, t) = tokens();
        let (_, token) = t.create("a", Role::Viewer, None, "test").unwrap();
        let mut wrong = token.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(matches!(
            t.authenticate(&wrong, crate::now_ms()),
            Err(TokenError::Unknown)
        ));
        for bad in [
            "",
            "Bearer x",
            "shoal_",
            "shoal_zz_yy",
            &token[..token.len() - 1],
        ] {
            assert!(matches!(
                t.authenticate(bad, crate::now_ms()),
                Err(TokenError::Malformed)
            ));
        }
        let (_, short) = t
            .create("short", Role::Viewer, Some(Duration::from_secs(60)), "test")
            .unwrap();
        let later = crate::now_ms() + 61_000;
        assert!(matches!(
            t.authenticate(&short, later),
            Err(TokenError::Expired { .. })
        ));
        t.revoke("a").unwrap();
        assert!(matches!(
            t.authenticate(&token, crate::now_ms()),
            Err(TokenError::Revoked { .. })
        ));
        assert_eq!(t.list().unwrap().len(), 2, "revoked tokens stay listed");
    }

    #[test]
    fn names_are_checked_and_unique_among_active_tokens() {
        let (_dir, t) = tokens();
        assert!(matches!(
            t.create("has space", Role::Viewer, None, "test"),
            Err(TokenError::BadName(_))
        ));
        t.create("ci", Role::Viewer, None, "test").unwrap();
        assert!(matches!(
            t.create("ci", Role::Admin, None, "test"),
            Err(TokenError::NameTaken(_))
        ));
        t.revoke("ci").unwrap();
        t.create("ci", Role::Admin, None, "test").unwrap();
        assert!(matches!(t.revoke("nope"), Err(TokenError::NotFound(_))));
    }

    #[test]
    fn bootstrap_writes_one_admin_token_once() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, t) = tokens();
        let path = t.bootstrap(dir.path()).unwrap().expect("first start");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = std::fs::read_to_string(&path).unwrap();
        let p = t.authenticate(token.trim(), crate::now_ms()).unwrap();
        assert_eq!(p.role, Role::Admin);
        assert_eq!(t.bootstrap(dir.path()).unwrap(), None, "second start");
    }
}
