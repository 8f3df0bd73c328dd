//! OpenID Connect against a real `shoal serve`: the test is the issuer (no Keycloak installs
//! here). It serves a discovery document and a JWKS on 127.0.0.1 and signs its own tokens
//! with an ES256 key (ring) and an RS256 key (made by the openssl command, as Keycloak's
//! default). A good token maps its role; a bad signature, another audience, `alg: none`,
//! another issuer, an expired token and one without a Shoal role are refused with a clear
//! message, counted in /metrics and audited, and change nothing; a key the issuer adds later
//! is found without a restart.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use shoal_e2e::{Hub, authed_client, free_port};

/// The issuer: discovery and JWKS on a local port; `keys` may change while it runs.
struct Issuer {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
}

async fn issuer() -> Issuer {
    issuer_with(|_| axum::Router::new()).await
}

/// The issuer with more routes (`extra` gets its URL); every answer allows any origin (CORS),
/// as an issuer configured with the hub as a web origin does.
async fn issuer_with(extra: impl FnOnce(&str) -> axum::Router) -> Issuer {
    use axum::routing::get;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/realms/shoal");
    let keys: Arc<Mutex<Vec<Value>>> = Arc::default();
    let doc = json!({
        "issuer": url,
        "jwks_uri": format!("{url}/protocol/openid-connect/certs"),
        "authorization_endpoint": format!("{url}/protocol/openid-connect/auth"),
        "token_endpoint": format!("{url}/protocol/openid-connect/token"),
    });
    let served = keys.clone();
    let app = axum::Router::new()
        .route(
            "/realms/shoal/.well-known/openid-configuration",
            get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc) }
            }),
        )
        .route(
            "/realms/shoal/protocol/openid-connect/certs",
            get(move || {
                let keys = served.lock().unwrap().clone();
                async move { axum::Json(json!({ "keys": keys })) }
            }),
        )
        .merge(extra(&url))
        .layer(axum::middleware::map_response(
            |mut r: axum::response::Response| async move {
                r.headers_mut().insert(
                    "access-control-allow-origin",
                    axum::http::HeaderValue::from_static("*"),
                );
                r
            },
        ));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Issuer { url, keys }
}

/// The authorization code flow with PKCE for one person, `dana` (role `shoal-operator`), who
/// is signed in at the issuer already: `/auth` sends the browser straight back with a code;
/// `/token` gives an ID token for it only with the verifier that matches the challenge, for
/// the same client and redirect URI.
fn code_flow(url: &str, signer: Arc<Signer>) -> axum::Router {
    use axum::extract::Query;
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::{get, post};
    use std::collections::HashMap;
    type Pending = Arc<Mutex<HashMap<String, (String, String, String)>>>;
    let pending: Pending = Arc::default();
    let issued = pending.clone();
    let iss = url.to_string();
    axum::Router::new()
        .route(
            "/realms/shoal/protocol/openid-connect/auth",
            get(move |Query(q): Query<HashMap<String, String>>| {
                let issued = issued.clone();
                async move {
                    let ok = q.get("response_type").map(String::as_str) == Some("code")
                        && q.get("code_challenge_method").map(String::as_str) == Some("S256")
                        && q.get("scope")
                            .is_some_and(|s| s.split(' ').any(|x| x == "openid"));
                    if !ok {
                        return (
                            axum::http::StatusCode::BAD_REQUEST,
                            "bad authorization request",
                        )
                            .into_response();
                    }
                    let code = format!("code-{}", issued.lock().unwrap().len() + 1);
                    issued.lock().unwrap().insert(
                        code.clone(),
                        (
                            q["code_challenge"].clone(),
                            q["client_id"].clone(),
                            q["redirect_uri"].clone(),
                        ),
                    );
                    Redirect::to(&format!(
                        "{}?code={code}&state={}",
                        q["redirect_uri"], q["state"]
                    ))
                    .into_response()
                }
            }),
        )
        .route(
            "/realms/shoal/protocol/openid-connect/token",
            post(move |body: String| {
                let pending = pending.clone();
                let (signer, iss) = (signer.clone(), iss.clone());
                async move {
                    // A form body is a query string (axum's Form is not built here).
                    let uri: axum::http::Uri = format!("/?{body}").parse().unwrap_or_default();
                    let f: HashMap<String, String> =
                        Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
                    let refused = || {
                        (
                            axum::http::StatusCode::BAD_REQUEST,
                            axum::Json(json!({"error": "invalid_grant"})),
                        )
                    };
                    let Some((challenge, client, redirect)) = pending
                        .lock()
                        .unwrap()
                        .remove(f.get("code").map_or("", String::as_str))
                    else {
                        return refused().into_response();
                    };
                    let verifier = f.get("code_verifier").map_or("", String::as_str);
                    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
                    if B64.encode(digest.as_ref()) != challenge
                        || f.get("client_id") != Some(&client)
                        || f.get("redirect_uri") != Some(&redirect)
                        || f.get("grant_type").map(String::as_str) != Some("authorization_code")
                    {
                        return refused().into_response();
                    }
                    let mut c = claims(&iss, "dana", &["shoal-operator"]);
                    c["aud"] = json!(client);
                    axum::Json(
                        json!({ "id_token": signer.token("es-1", &c), "token_type": "Bearer" }),
                    )
                    .into_response()
                }
            }),
        )
}

/// A hub that takes the issuer's JWTs for audience `shoal`, roles prefixed `shoal-`.
async fn hub_trusting(dir: &Path, idp: &Issuer) -> Hub {
    Hub::start_on(
        &dir.join("hub"),
        free_port(),
        free_port(),
        &[
            "--oidc-issuer",
            &idp.url,
            "--oidc-audience",
            "shoal",
            "--oidc-role-prefix",
            "shoal-",
        ],
    )
    .await
}

enum Signer {
    Es(EcdsaKeyPair),
    Rs(RsaKeyPair),
}

impl Signer {
    fn es256() -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Self::Es(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
    }

    /// An RSA key from the openssl command (ring makes none).
    fn rs256(dir: &Path) -> Self {
        let der = dir.join("rsa.der");
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
                "-out",
            ])
            .arg(&der)
            .output()
            .expect("the openssl command is not installed");
        assert!(out.status.success(), "{out:?}");
        // openssl writes an RSAPrivateKey (PKCS#1) in DER.
        Self::Rs(RsaKeyPair::from_der(&std::fs::read(der).unwrap()).unwrap())
    }

    fn alg(&self) -> &'static str {
        match self {
            Self::Es(_) => "ES256",
            Self::Rs(_) => "RS256",
        }
    }

    fn jwk(&self, kid: &str) -> Value {
        match self {
            Self::Es(k) => {
                let p = k.public_key().as_ref();
                json!({ "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                        "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65]) })
            }
            Self::Rs(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({ "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                        "n": B64.encode(&c.n), "e": B64.encode(&c.e) })
            }
        }
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match self {
            Self::Es(k) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
            Self::Rs(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
        };
        format!("{input}.{}", B64.encode(sig))
    }

    fn token(&self, kid: &str, claims: &Value) -> String {
        self.sign(
            &json!({ "alg": self.alg(), "kid": kid, "typ": "JWT" }),
            claims,
        )
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(issuer: &str, user: &str, roles: &[&str]) -> Value {
    json!({ "iss": issuer, "aud": ["account", "shoal"], "sub": format!("id-{user}"),
            "preferred_username": user, "exp": now_s() + 300, "iat": now_s(),
            "realm_access": { "roles": roles } })
}

/// (status, body) of `GET /api/v1/whoami` with `token`.
async fn whoami(hub: &Hub, token: &str) -> (u16, Value) {
    let r = authed_client(token)
        .get(format!("{}/api/v1/whoami", hub.http_url()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// Refusals counted under `reason` (0 before the first).
async fn denied(hub: &Hub, reason: &str) -> f64 {
    let url = format!("{}/metrics", hub.http_url());
    let series = format!("shoal_http_denied_total{{reason=\"{reason}\"}}");
    shoal_e2e::scrape_metric(&url, &series).await.unwrap_or(0.0)
}

const JOB: &str = "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: probe\nspec:\n  schedule: \"0 3 * * *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: c\n              command: [\"true\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_from_the_issuer_sign_people_in_and_every_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let idp = issuer().await;
    let es = Signer::es256();
    let rs = Signer::rs256(dir.path());
    idp.keys
        .lock()
        .unwrap()
        .extend([es.jwk("es-1"), rs.jwk("rs-1")]);
    let hub = hub_trusting(dir.path(), &idp).await;

    // Good tokens, either algorithm; the role comes from the claim.
    let alice = es.token(
        "es-1",
        &claims(&idp.url, "alice", &["offline_access", "shoal-scientist"]),
    );
    let (status, me) = whoami(&hub, &alice).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["name"].as_str(), me["role"].as_str()),
        (Some("oidc:alice"), Some("scientist"))
    );
    let bob = rs.token("rs-1", &claims(&idp.url, "bob", &["shoal-viewer"]));
    let (status, me) = whoami(&hub, &bob).await;
    assert_eq!((status, me["role"].as_str()), (200, Some("viewer")), "{me}");

    // A viewer may read, not change.
    let r = authed_client(&bob)
        .post(format!("{}/api/v1/jobs", hub.http_url()))
        .header("content-type", "application/yaml")
        .body(JOB)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // Every bad token: 401 (403 without a role), a clear message, counted.
    let other = Signer::es256();
    let mut wrong_aud = claims(&idp.url, "eve", &["shoal-admin"]);
    wrong_aud["aud"] = json!("grafana");
    let mut expired = claims(&idp.url, "eve", &["shoal-admin"]);
    expired["exp"] = json!(now_s() - 600);
    let none = format!(
        "{}.{}.",
        B64.encode(json!({ "alg": "none", "kid": "es-1" }).to_string()),
        B64.encode(claims(&idp.url, "eve", &["shoal-admin"]).to_string())
    );
    let cases = [
        (
            other.token("es-1", &claims(&idp.url, "eve", &["shoal-admin"])),
            401,
            "jwt_signature",
            "signature",
        ),
        (
            es.token("es-1", &wrong_aud),
            401,
            "jwt_audience",
            "not meant for this hub",
        ),
        (none, 401, "jwt_algorithm", "\"none\""),
        (
            es.token(
                "es-1",
                &claims("https://evil.example/realms/shoal", "eve", &["shoal-admin"]),
            ),
            401,
            "jwt_issuer",
            "evil.example",
        ),
        (es.token("es-1", &expired), 401, "jwt_expired", "expired"),
        (
            es.token("es-1", &claims(&idp.url, "eve", &["admin"])),
            403,
            "jwt_no_role",
            "no Shoal role",
        ),
        (
            other.token("unknown-kid", &claims(&idp.url, "eve", &["shoal-admin"])),
            401,
            "jwt_unknown_key",
            "no signing key",
        ),
    ];
    for (token, status, reason, says) in cases {
        let before = denied(&hub, reason).await;
        let (got, body) = whoami(&hub, &token).await;
        assert_eq!(got, status, "{reason}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(says),
            "{reason}: {body}"
        );
        assert_eq!(denied(&hub, reason).await, before + 1.0, "{reason} counted");
    }
    let audit = hub.get("/api/v1/audit?outcome=denied").await.to_string();
    assert!(
        audit.contains("jwt_signature") && audit.contains("jwt_issuer"),
        "{audit}"
    );
    assert_eq!(
        hub.get("/api/v1/jobs").await["jobs"]
            .as_array()
            .map_or(0, Vec::len),
        0
    );

    // The issuer rotates in a new key: found without a restart.
    tokio::time::sleep(Duration::from_secs(11)).await; // past the refetch limit after the unknown kid above
    let rotated = Signer::es256();
    idp.keys.lock().unwrap().push(rotated.jwk("es-2"));
    let carol = rotated.token("es-2", &claims(&idp.url, "carol", &["shoal-admin"]));
    let (status, me) = whoami(&hub, &carol).await;
    assert_eq!((status, me["role"].as_str()), (200, Some("admin")), "{me}");
}

/// The dashboard's "Sign in with your organisation": the authorization code flow with PKCE in
/// headless Chromium, against the test's issuer; the page then holds the person's ID token and
/// shows their role. A sign-in page reached without a flow started in the tab refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_at_the_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let es = Arc::new(Signer::es256());
    let signer = es.clone();
    let idp = issuer_with(move |url| code_flow(url, signer)).await;
    idp.keys.lock().unwrap().push(es.jwk("es-1"));
    let hub = hub_trusting(dir.path(), &idp).await;
    let out = shoal_e2e::python_json(
        "dashboard.py",
        &[],
        &json!({ "oidc": true, "hub": hub.http_url() }),
    );
    assert_eq!(out["who"], "oidc:dana · operator", "{out}");
    assert_eq!(out["url"], format!("{}/", hub.http_url()), "{out}");
    assert_eq!(out["console"], json!([]), "{out}");
    assert!(
        out["unstarted"]
            .as_str()
            .unwrap()
            .contains("not started from this tab"),
        "{out}"
    );
}
