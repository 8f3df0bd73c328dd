//! Access to the hub's REST API: tokens and roles, refusals (each counted in /metrics and in
//! the audit log, nothing changed), the browser checks, the CLI's tokens and login, and the
//! refusal to expose an unauthenticated API.

use std::process::{Command, Stdio};

use serde_json::{Value, json};
use shoal_e2e::{Hub, authed_client, bin, free_port, http_client, shoal_cli_as};

const JOB: &str = "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: probe\nspec:\n  schedule: \"0 3 * * *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: c\n              command: [\"true\"]\n";

/// Makes a token through the API as admin; returns the token.
async fn token(hub: &Hub, name: &str, role: &str, expires_in: Option<&str>) -> String {
    let r = hub
        .client()
        .post(format!("{}/api/v1/tokens", hub.http_url()))
        .json(&json!({ "name": name, "role": role, "expires_in": expires_in }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// (status, error message) of `method path` with `token` (none when empty) and a YAML body.
async fn call(
    hub: &Hub,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let client = if token.is_empty() {
        http_client()
    } else {
        authed_client(token)
    };
    let mut req = client.request(method.parse().unwrap(), format!("{}{path}", hub.http_url()));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/yaml")
            .body(b.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or_default();
    (status, v["error"].as_str().unwrap_or("").to_string())
}

async fn jobs(hub: &Hub) -> usize {
    hub.get("/api/v1/jobs").await["jobs"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_clear_counted_audited_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let viewer = token(&hub, "dash", "viewer", None).await;
    let scientist = token(&hub, "ci", "scientist", None).await;
    let expired = token(&hub, "old", "scientist", Some("1ms")).await;
    let revoked = token(&hub, "gone", "scientist", None).await;
    assert_eq!(
        call(&hub, &hub.token, "DELETE", "/api/v1/tokens/gone", None)
            .await
            .0,
        200
    );
    let mut forged = scientist.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'a' { 'b' } else { 'a' });

    let cases: [(&str, &str, u16, &str); 6] = [
        ("", "missing_token", 401, "needs an API token"),
        ("not-a-token", "invalid_token", 401, "not a Shoal API token"),
        (&forged, "invalid_token", 401, "not known to this hub"),
        (&expired, "expired_token", 401, "has expired"),
        (&revoked, "revoked_token", 401, "was revoked"),
        (&viewer, "role", 403, "needs the scientist role"),
    ];
    for (token, reason, status, message) in cases {
        let (got, error) = call(&hub, token, "POST", "/api/v1/jobs", Some(JOB)).await;
        assert_eq!(got, status, "{reason}: {error}");
        assert!(error.contains(message), "{reason}: {error}");
        assert_eq!(
            hub.metric(&format!("shoal_http_denied_total{{reason=\"{reason}\"}}"))
                .await,
            if reason == "invalid_token" && token == forged {
                2.0
            } else {
                1.0
            },
            "{reason} counted"
        );
    }
    assert_eq!(jobs(&hub).await, 0, "nothing was applied");
    let r = http_client()
        .get(format!("{}/api/v1/devices", hub.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");

    // The viewer reads; the scientist applies; /healthz and /metrics need nothing.
    assert_eq!(
        call(&hub, &viewer, "GET", "/api/v1/jobs", None).await.0,
        200
    );
    assert_eq!(call(&hub, "", "GET", "/healthz", None).await.0, 200);
    assert_eq!(call(&hub, "", "GET", "/metrics", None).await.0, 200);
    assert_eq!(
        call(&hub, &scientist, "POST", "/api/v1/jobs", Some(JOB))
            .await
            .0,
        200
    );
    assert_eq!(jobs(&hub).await, 1);
    // A scientist may not make tokens or read the audit log.
    assert_eq!(
        call(&hub, &scientist, "GET", "/api/v1/audit", None).await.0,
        403
    );

    let audit = hub.get("/api/v1/audit?limit=1000").await;
    let entries = audit.as_array().unwrap();
    let denied: Vec<&Value> = entries
        .iter()
        .filter(|e| e["outcome"] == "denied")
        .collect();
    assert_eq!(denied.len(), 8, "{audit:#}");
    assert!(denied.iter().any(|e| {
        e["reason"] == "role"
            && e["actor"] == "token:dash"
            && e["action"] == "POST /api/v1/jobs"
            && e["status"] == 403
            && e["from"]
                .as_str()
                .is_some_and(|f| f.starts_with("127.0.0.1:"))
    }));
    let applied = entries
        .iter()
        .find(|e| e["outcome"] == "allowed" && e["action"] == "POST /api/v1/jobs")
        .expect("the apply is audited");
    assert_eq!(applied["actor"], "token:ci");
    assert_eq!(applied["role"], "scientist");
    assert_eq!(applied["status"], 200);
    // Reads are not audited (only changes and refusals).
    assert!(
        !entries
            .iter()
            .any(|e| e["action"] == "GET /api/v1/jobs" && e["outcome"] == "allowed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_site_cannot_change_anything() {
    let dir = tempfile::tempdir().unwrap();
    // Even with authentication off on loopback: the request a page can send without a
    // preflight (text/plain, or no body) from another origin is refused.
    let hub = Hub::start_on(dir.path(), free_port(), free_port(), &["--no-auth"]).await;
    assert!(
        hub.token.is_empty(),
        "no admin token without authentication"
    );
    let send = |content_type: Option<&'static str>, origin: Option<String>, path: &'static str| {
        let url = format!("{}{path}", hub.http_url());
        async move {
            let mut req = http_client().post(url);
            if let Some(c) = content_type {
                req = req.header("content-type", c).body(JOB);
            }
            if let Some(o) = origin {
                req = req.header("origin", o);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(send(Some("text/plain"), None, "/api/v1/jobs").await, 415);
    assert_eq!(
        send(
            Some("application/x-www-form-urlencoded"),
            None,
            "/api/v1/jobs"
        )
        .await,
        415
    );
    assert_eq!(
        send(
            Some("application/yaml"),
            Some("https://evil.example".into()),
            "/api/v1/jobs"
        )
        .await,
        403
    );
    assert_eq!(
        send(None, Some("null".into()), "/api/v1/jobs/probe/run").await,
        403
    );
    assert_eq!(jobs(&hub).await, 0, "nothing was applied");
    assert_eq!(
        send(
            Some("application/yaml"),
            Some(hub.http_url()),
            "/api/v1/jobs"
        )
        .await,
        200,
        "the hub's own origin may"
    );
    assert_eq!(
        hub.metric("shoal_http_denied_total{reason=\"cross_origin\"}")
            .await,
        2.0
    );
    assert_eq!(
        hub.metric("shoal_http_denied_total{reason=\"content_type\"}")
            .await,
        2.0
    );
}

#[test]
fn an_unauthenticated_api_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("shoal"))
        .args([
            "serve",
            "--no-auth",
            "--http-listen",
            "0.0.0.0:1",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("hub"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without authentication") && err.contains("--insecure-no-auth"),
        "{err}"
    );
    assert!(
        !dir.path().join("hub").exists(),
        "a refused start changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_on(
        dir.path(),
        free_port(),
        free_port(),
        &["--metrics-auth", "token"],
    )
    .await;
    assert_eq!(call(&hub, "", "GET", "/metrics", None).await.0, 401);
    assert_eq!(call(&hub, &hub.token, "GET", "/metrics", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_lists_revokes_and_logs_in_with_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).await;
    let (ok, out, err) = shoal_cli_as(
        &hub,
        &hub.token,
        &[
            "tokens",
            "create",
            "--name",
            "ops",
            "--role",
            "operator",
            "--expires",
            "30d",
        ],
    );
    assert!(ok, "{err}");
    let ops = out.lines().next().unwrap().trim().to_string();
    assert!(ops.starts_with("shoal_"), "{out}");
    assert!(out.contains("shown once"), "{out}");

    let (ok, listed, _) = shoal_cli_as(&hub, &hub.token, &["tokens", "list"]);
    assert!(ok);
    assert!(listed.contains("ops") && listed.contains("operator") && listed.contains("active"));
    assert!(!listed.contains(&ops[20..]), "the secret is never listed");

    // Anonymous, the CLI says what to do.
    let (ok, _, err) = shoal_cli_as(&hub, "", &["devices", "list"]);
    assert!(
        !ok && err.contains("needs an API token") && err.contains("HTTP 401"),
        "{err}"
    );
    // An operator may not make tokens.
    let (ok, _, err) = shoal_cli_as(&hub, &ops, &["tokens", "list"]);
    assert!(!ok && err.contains("needs the admin role"), "{err}");

    // `shoal login`: the token from stdin, checked, saved 0600 for this hub.
    let creds = dir.path().join("cfg/credentials.toml");
    let login = |token: &str| {
        let mut child = Command::new(bin("shoal"))
            .args(["--hub", &hub.http_url(), "login"])
            .env("SHOAL_CREDENTIALS", &creds)
            .env_remove("SHOAL_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
        child.wait_with_output().unwrap()
    };
    let bad = login(
        "shoal_000000000000_0000000000000000000000000000000000000000000000000000000000000000",
    );
    assert!(!bad.status.success());
    assert!(!creds.exists(), "a refused token is not saved");
    let good = login(&ops);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("as token:ops (operator)"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let whoami = Command::new(bin("shoal"))
        .args(["--hub", &hub.http_url(), "whoami"])
        .env("SHOAL_CREDENTIALS", &creds)
        .env_remove("SHOAL_TOKEN")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "token:ops (operator)\n"
    );

    let (ok, _, err) = shoal_cli_as(&hub, &hub.token, &["tokens", "revoke", "ops"]);
    assert!(ok, "{err}");
    let (ok, _, err) = shoal_cli_as(&hub, &ops, &["devices", "list"]);
    assert!(!ok && err.contains("was revoked"), "{err}");
    let (ok, audit, _) = shoal_cli_as(&hub, &hub.token, &["audit", "--denied"]);
    assert!(ok);
    assert!(
        audit.contains("denied (revoked_token)") && audit.contains("token:ops"),
        "{audit}"
    );
}
