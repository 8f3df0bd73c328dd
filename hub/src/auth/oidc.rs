//! OpenID Connect: JWT bearer tokens from an issuer (Keycloak in the book's platform) stand for
//! people. The issuer's signing keys come from its JWKS (found through
//! `ISSUER/.well-known/openid-configuration`), kept in memory and fetched again when a token
//! names a key not seen yet (at most every [`REFRESH_EVERY`]), so a key rotation needs no
//! restart. A token is accepted when its signature verifies with RS256/384/512, PS256/384/512,
//! ES256 or ES384 (never `none` or a shared-secret HMAC), its `iss` is the issuer, its `aud`
//! holds the audience, it has not expired, and the role claim (a dot path such as
//! `realm_access.roles`) names a Shoal role.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;

use super::{Principal, Role};

/// Unknown key ids refetch the JWKS at most this often.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_S: i64 = 60;

/// `shoal serve --oidc-*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    /// Dot path of the claim holding role names, e.g. `realm_access.roles` or `groups`.
    pub role_claim: String,
    /// Prefix of role names in that claim (`shoal-` maps `shoal-admin` to admin).
    pub role_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the bearer token is not a JWT (header.payload.signature, base64url)")]
    Malformed,
    #[error("JWT algorithm {0:?} is not accepted (RS256/384/512, PS256/384/512, ES256, ES384)")]
    Algorithm(String),
    #[error("the issuer has no signing key {0:?} (not even after fetching its JWKS again)")]
    UnknownKey(String),
    #[error("the JWT's signature does not verify")]
    Signature,
    #[error("the JWT was issued by {0:?}, not by this hub's issuer")]
    Issuer(String),
    #[error("the JWT is not meant for this hub (audience {0})")]
    Audience(String),
    #[error("the JWT has expired (or is not valid yet)")]
    Expired,
    #[error("the JWT names no Shoal role in its {0:?} claim (viewer, operator, scientist, admin)")]
    NoRole(String),
    #[error("cannot read the issuer's keys: {0}")]
    Unavailable(String),
}

impl OidcError {
    /// The reason a refusal is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "jwt_malformed",
            Self::Algorithm(_) => "jwt_algorithm",
            Self::UnknownKey(_) => "jwt_unknown_key",
            Self::Signature => "jwt_signature",
            Self::Issuer(_) => "jwt_issuer",
            Self::Audience(_) => "jwt_audience",
            Self::Expired => "jwt_expired",
            Self::NoRole(_) => "jwt_no_role",
            Self::Unavailable(_) => "oidc_unavailable",
        }
    }
}

/// A verification key from the JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (0x04 || x || y) on P-256 or P-384.
    Ec {
        p384: bool,
        point: Vec<u8>,
    },
}

#[derive(Debug, Default)]
struct Keys {
    by_kid: HashMap<String, Key>,
    fetched: Option<Instant>,
}

/// The issuer's keys and the checks.
pub struct Oidc {
    config: OidcConfig,
    http: reqwest::Client,
    keys: std::sync::RwLock<Keys>,
    refresh: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

impl Oidc {
    pub fn new(config: OidcConfig) -> Self {
        // reqwest is built without a default crypto provider; every binary installs ring's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            config,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            keys: std::sync::RwLock::new(Keys::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Whether `token` looks like a JWT rather than a Shoal API token.
    pub fn is_jwt(token: &str) -> bool {
        token.starts_with("eyJ") && token.bytes().filter(|&b| b == b'.').count() == 2
    }

    /// The principal a JWT stands for at `now_s`.
    pub async fn authenticate(&self, jwt: &str, now_s: i64) -> Result<Principal, OidcError> {
        let mut parts = jwt.split('.');
        let (Some(h), Some(p), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(OidcError::Malformed);
        };
        let header: Header = decode_json(h)?;
        let alg = algorithm(&header.alg)?;
        let signature = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| OidcError::Malformed)?;
        let kid = header.kid.unwrap_or_default();
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.fetch_keys().await?;
                self.key(&kid).ok_or(OidcError::UnknownKey(kid))?
            }
        };
        verify(alg, &key, format!("{h}.{p}").as_bytes(), &signature)?;
        let claims: Value = decode_json(p)?;
        self.check_claims(&claims, now_s)
    }

    fn check_claims(&self, claims: &Value, now_s: i64) -> Result<Principal, OidcError> {
        let iss = claims["iss"].as_str().unwrap_or_default();
        if iss.trim_end_matches('/') != self.config.issuer.trim_end_matches('/') {
            return Err(OidcError::Issuer(iss.into()));
        }
        let aud_ok = match &claims["aud"] {
            Value::String(a) => *a == self.config.audience,
            Value::Array(all) => all
                .iter()
                .any(|a| a.as_str() == Some(&self.config.audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(OidcError::Audience(claims["aud"].to_string()));
        }
        let exp = claims["exp"].as_i64().ok_or(OidcError::Expired)?;
        let nbf = claims["nbf"].as_i64().unwrap_or(i64::MIN);
        // Saturating: the numbers come from the caller.
        if exp.saturating_add(LEEWAY_S) <= now_s || nbf.saturating_sub(LEEWAY_S) > now_s {
            return Err(OidcError::Expired);
        }
        let role = self
            .role(claims)
            .ok_or_else(|| OidcError::NoRole(self.config.role_claim.clone()))?;
        let who = ["preferred_username", "email", "sub"]
            .iter()
            .find_map(|k| claims[*k].as_str().filter(|s| !s.is_empty()))
            .unwrap_or("unknown");
        Ok(Principal {
            name: format!("oidc:{who}"),
            role,
        })
    }

    /// The highest Shoal role the role claim names: admin, scientist, operator, viewer.
    fn role(&self, claims: &Value) -> Option<Role> {
        let mut v = claims;
        for step in self.config.role_claim.split('.') {
            v = v.get(step)?;
        }
        let names: Vec<&str> = match v {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => return None,
        };
        [Role::Admin, Role::Scientist, Role::Operator, Role::Viewer]
            .into_iter()
            .find(|role| {
                names.iter().any(|n| {
                    n.strip_prefix(self.config.role_prefix.as_str()) == Some(role.as_str())
                })
            })
    }

    fn key(&self, kid: &str) -> Option<Key> {
        let keys = self.keys.read().expect("keys lock");
        match keys.by_kid.get(kid) {
            Some(k) => Some(k.clone()),
            // A token without a kid, from an issuer with one key.
            None if kid.is_empty() && keys.by_kid.len() == 1 => {
                keys.by_kid.values().next().cloned()
            }
            None => None,
        }
    }

    /// Reads the JWKS again (not more often than [`REFRESH_EVERY`]).
    async fn fetch_keys(&self) -> Result<(), OidcError> {
        let _one = self.refresh.lock().await;
        let recent = self
            .keys
            .read()
            .expect("keys lock")
            .fetched
            .is_some_and(|t| t.elapsed() < REFRESH_EVERY);
        if recent {
            return Ok(());
        }
        let result = self.download_keys().await;
        let mut keys = self.keys.write().expect("keys lock");
        keys.fetched = Some(Instant::now());
        let fresh = result?;
        tracing::info!(keys = fresh.len(), issuer = %self.config.issuer, "read the issuer's signing keys");
        keys.by_kid = fresh;
        Ok(())
    }

    async fn download_keys(&self) -> Result<HashMap<String, Key>, OidcError> {
        let unavailable = |e: String| OidcError::Unavailable(e);
        let discovery = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let get = |url: String| async move {
            let resp = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{url}: {}", resp.status()));
            }
            resp.json::<Value>()
                .await
                .map_err(|e| format!("{url}: {e}"))
        };
        let doc = get(discovery.clone()).await.map_err(unavailable)?;
        let jwks_uri = doc["jwks_uri"]
            .as_str()
            .ok_or_else(|| unavailable(format!("{discovery} names no jwks_uri")))?
            .to_string();
        let jwks = get(jwks_uri).await.map_err(unavailable)?;
        Ok(parse_jwks(&jwks))
    }
}

/// The usable signing keys of a JWKS, by kid (others are skipped).
fn parse_jwks(jwks: &Value) -> HashMap<String, Key> {
    let b64 = |v: &Value| v.as_str().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
    let mut out = HashMap::new();
    for k in jwks["keys"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if k["use"].as_str().is_some_and(|u| u != "sig") {
            continue;
        }
        let kid = k["kid"].as_str().unwrap_or_default().to_string();
        let key = match (k["kty"].as_str(), k["crv"].as_str()) {
            (Some("RSA"), _) => match (b64(&k["n"]), b64(&k["e"])) {
                (Some(n), Some(e)) => Key::Rsa { n, e },
                _ => continue,
            },
            (Some("EC"), Some(crv @ ("P-256" | "P-384"))) => match (b64(&k["x"]), b64(&k["y"])) {
                (Some(x), Some(y)) => {
                    let mut point = vec![4u8];
                    point.extend(x);
                    point.extend(y);
                    Key::Ec {
                        p384: crv == "P-384",
                        point,
                    }
                }
                _ => continue,
            },
            _ => continue,
        };
        out.insert(kid, key);
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Alg {
    Rs(&'static signature::RsaParameters),
    Es256,
    Es384,
}

fn algorithm(name: &str) -> Result<Alg, OidcError> {
    Ok(match name {
        "RS256" => Alg::Rs(&signature::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => Alg::Rs(&signature::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => Alg::Rs(&signature::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => Alg::Rs(&signature::RSA_PSS_2048_8192_SHA256),
        "PS384" => Alg::Rs(&signature::RSA_PSS_2048_8192_SHA384),
        "PS512" => Alg::Rs(&signature::RSA_PSS_2048_8192_SHA512),
        "ES256" => Alg::Es256,
        "ES384" => Alg::Es384,
        other => return Err(OidcError::Algorithm(other.into())),
    })
}

fn verify(alg: Alg, key: &Key, message: &[u8], sig: &[u8]) -> Result<(), OidcError> {
    let ok = match (alg, key) {
        (Alg::Rs(params), Key::Rsa { n, e }) => signature::RsaPublicKeyComponents { n, e }
            .verify(params, message, sig)
            .is_ok(),
        (Alg::Es256, Key::Ec { p384: false, point }) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, sig)
                .is_ok()
        }
        (Alg::Es384, Key::Ec { p384: true, point }) => {
            UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(message, sig)
                .is_ok()
        }
        // The header's algorithm does not fit the key: refused, not tried another way.
        _ => false,
    };
    ok.then_some(()).ok_or(OidcError::Signature)
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, OidcError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| OidcError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| OidcError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    const ISSUER: &str = "https://id.example/realms/shoal";

    fn oidc_with(kid: &str, key: &EcdsaKeyPair) -> Oidc {
        let o = Oidc::new(OidcConfig {
            issuer: ISSUER.into(),
            audience: "shoal".into(),
            role_claim: "realm_access.roles".into(),
            role_prefix: "shoal-".into(),
        });
        {
            let mut keys = o.keys.write().unwrap();
            keys.by_kid.insert(
                kid.into(),
                Key::Ec {
                    p384: false,
                    point: key.public_key().as_ref().to_vec(),
                },
            );
            keys.fetched = Some(Instant::now());
        }
        o
    }

    fn es256_key() -> EcdsaKeyPair {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &SystemRandom::new(),
        )
        .unwrap()
    }

    fn sign(header: &Value, claims: &Value, key: &EcdsaKeyPair) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let p = URL_SAFE_NO_PAD.encode(claims.to_string());
        let sig = key
            .sign(&SystemRandom::new(), format!("{h}.{p}").as_bytes())
            .unwrap();
        format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn claims(now: i64) -> Value {
        json!({
            "iss": ISSUER, "aud": ["account", "shoal"], "exp": now + 300, "sub": "u-1",
            "preferred_username": "alice", "realm_access": { "roles": ["offline", "shoal-operator"] },
        })
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_good_token_maps_its_role_and_every_bad_one_is_refused_for_its_reason() {
        let key = es256_key();
        let o = oidc_with("k1", &key);
        let now = 1_800_000_000;
        let header = json!({ "alg": "ES256", "kid": "k1", "typ": "JWT" });
        let rt = rt();
        let auth = |t: &str| rt.block_on(o.authenticate(t, now));
        let p = auth(&sign(&header, &claims(now), &key)).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("oidc:alice", Role::Operator));

        let mut c = claims(now);
        c["realm_access"]["roles"] = json!(["shoal-viewer", "shoal-admin"]);
        assert_eq!(auth(&sign(&header, &c, &key)).unwrap().role, Role::Admin);

        let refused = |t: String| auth(&t).unwrap_err().reason();
        let other = es256_key();
        assert_eq!(
            refused(sign(&header, &claims(now), &other)),
            "jwt_signature"
        );
        let mut c = claims(now);
        c["aud"] = json!("grafana");
        assert_eq!(refused(sign(&header, &c, &key)), "jwt_audience");
        let mut c = claims(now);
        c["iss"] = json!("https://evil.example/realms/shoal");
        assert_eq!(refused(sign(&header, &c, &key)), "jwt_issuer");
        let mut c = claims(now);
        c["exp"] = json!(now - 120);
        assert_eq!(refused(sign(&header, &c, &key)), "jwt_expired");
        for (exp, nbf) in [(i64::MIN, 0), (i64::MAX, i64::MIN), (now + 300, i64::MAX)] {
            let mut c = claims(now);
            (c["exp"], c["nbf"]) = (json!(exp), json!(nbf));
            let _ = auth(&sign(&header, &c, &key)); // no overflow, whatever the numbers
        }
        let mut c = claims(now);
        c["realm_access"]["roles"] = json!(["admin"]);
        assert_eq!(refused(sign(&header, &c, &key)), "jwt_no_role");
        for alg in ["none", "HS256"] {
            let h = json!({ "alg": alg, "kid": "k1" });
            let t = format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(h.to_string()),
                URL_SAFE_NO_PAD.encode(claims(now).to_string())
            );
            assert_eq!(refused(t), "jwt_algorithm", "{alg}");
        }
        // The header says RS256 over an EC key: refused, not tried as ES256.
        let good = sign(&header, &claims(now), &key);
        let (_, rest) = good.split_once('.').unwrap();
        let rs = format!(
            "{}.{rest}",
            URL_SAFE_NO_PAD.encode(json!({ "alg": "RS256", "kid": "k1" }).to_string())
        );
        assert_eq!(refused(rs), "jwt_signature");
        assert_eq!(refused("eyJ.x".into()), "jwt_malformed");
        // An unknown kid is looked up at the issuer; an unreachable issuer says so.
        let h = json!({ "alg": "ES256", "kid": "k9" });
        o.keys.write().unwrap().fetched = None;
        assert_eq!(refused(sign(&h, &claims(now), &key)), "oidc_unavailable");
    }

    #[test]
    fn jwks_keys_are_read_by_kid_and_unusable_ones_skipped() {
        let jwks = json!({ "keys": [
            { "kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB", "use": "sig" },
            { "kty": "RSA", "kid": "enc", "n": "AQAB", "e": "AQAB", "use": "enc" },
            { "kty": "EC", "kid": "e", "crv": "P-256", "x": "AQ", "y": "Ag" },
            { "kty": "EC", "kid": "k", "crv": "secp256k1", "x": "AQ", "y": "Ag" },
            { "kty": "oct", "kid": "h", "k": "c2VjcmV0" },
        ]});
        let keys = parse_jwks(&jwks);
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["e", "r"]);
        assert_eq!(
            keys["e"],
            Key::Ec {
                p384: false,
                point: vec![4, 1, 2]
            }
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn b64_json() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                // JSON-ish: valid objects with arbitrary claim values.
                (
                    any::<i64>(),
                    any::<i64>(),
                    ".{0,20}",
                    prop::collection::vec(".{0,12}", 0..4)
                )
                    .prop_map(|(exp, nbf, aud, roles)| {
                        json!({ "alg": "ES256", "kid": "k1", "iss": ISSUER, "aud": aud,
                                "exp": exp, "nbf": nbf, "realm_access": { "roles": roles } })
                        .to_string()
                        .into_bytes()
                    }),
            ]
            .prop_map(|b| URL_SAFE_NO_PAD.encode(b))
        }

        proptest! {
            #[test]
            fn any_bearer_token_is_refused_without_panic(
                raw in ".{0,300}",
                h in b64_json(),
                p in b64_json(),
                sig in prop::collection::vec(any::<u8>(), 0..80),
                now in any::<i64>(),
            ) {
                static OIDC: std::sync::OnceLock<Oidc> = std::sync::OnceLock::new();
                let o = OIDC.get_or_init(|| oidc_with("k1", &es256_key()));
                let rt = rt();
                prop_assert!(rt.block_on(o.authenticate(&raw, now)).is_err());
                let forged = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(&sig));
                prop_assert!(rt.block_on(o.authenticate(&forged, now)).is_err());
            }
        }
    }
}
