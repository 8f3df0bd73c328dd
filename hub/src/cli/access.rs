//! `shoal tokens`, `shoal login`, `shoal whoami`, `shoal audit`.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::client::{CliError, Client, Output, encode};
use super::credentials;
use super::format::*;
use crate::auth::Role;

#[derive(clap::Subcommand)]
pub enum TokensCommand {
    /// Make an API token, printed once and stored only as a hash: keep it now. [role: admin]
    ///
    ///   shoal tokens create --name ci-nightly --role scientist --expires 30d
    Create {
        /// Unique among active tokens: letters, digits, '.', '_', '-'.
        #[arg(long)]
        name: String,
        /// viewer: read; operator: devices; scientist: jobs and datasets; admin: everything.
        #[arg(long, value_enum)]
        role: Role,
        /// How long it works (30d, 12h); never expires when absent.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Every token: id, name, role, state (never the secret). [role: admin]
    List,
    /// Revoke a token by id (or an active token's name); it opens nothing from then on. [role: admin]
    Revoke { token: String },
}

impl TokensCommand {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        match self {
            TokensCommand::Create {
                name,
                role,
                expires,
            } => {
                let body = json!({ "name": name, "role": role, "expires_in": expires });
                let v = client
                    .send_json(reqwest::Method::POST, "/api/v1/tokens", &body)
                    .await?;
                Ok(if output == Output::Json {
                    pretty(&v)
                } else {
                    format!(
                        "{}\n\nThe token above is shown once. Use it as SHOAL_TOKEN, or: shoal login\nname {}  role {}  expires {}\n",
                        str_of(&v["token"]),
                        str_of(&v["name"]),
                        str_of(&v["role"]),
                        expiry(&v["expires_ms"]),
                    )
                })
            }
            TokensCommand::List => {
                let v = client.get("/api/v1/tokens", &[]).await?;
                Ok(if output == Output::Json {
                    pretty(&v)
                } else {
                    tokens_table(&v)
                })
            }
            TokensCommand::Revoke { token } => {
                let v = client
                    .send(
                        reqwest::Method::DELETE,
                        &format!("/api/v1/tokens/{}", encode(&token)),
                        None,
                    )
                    .await?;
                Ok(if output == Output::Json {
                    pretty(&v)
                } else {
                    format!("revoked {} ({})\n", str_of(&v["name"]), str_of(&v["id"]))
                })
            }
        }
    }
}

fn expiry(v: &Value) -> String {
    if v.is_null() {
        "never".into()
    } else {
        time_of(v)
    }
}

fn tokens_table(v: &Value) -> String {
    let now = crate::now_ms();
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let state = if !t["revoked_ms"].is_null() {
                "revoked"
            } else if t["expires_ms"].as_i64().is_some_and(|e| e <= now) {
                "expired"
            } else {
                "active"
            };
            vec![
                str_of(&t["id"]),
                str_of(&t["name"]),
                str_of(&t["role"]),
                state.into(),
                time_of(&t["created_ms"]),
                expiry(&t["expires_ms"]),
                str_of(&t["created_by"]),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "ROLE",
            "STATE",
            "CREATED",
            "EXPIRES",
            "CREATED BY",
        ],
        &rows,
    )
}

/// `shoal login`: checks a token against the hub, then stores it for that hub's URL.
#[derive(clap::Args)]
pub struct LoginArgs {
    /// Read the token from this file (e.g. the hub's DATA_DIR/admin.token); otherwise from
    /// SHOAL_TOKEN, else the first line of standard input.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl LoginArgs {
    pub async fn run(self, hub: &str) -> Result<String, CliError> {
        let token = match &self.token_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| CliError::Api(format!("cannot read {}: {e}", f.display())))?,
            None => match std::env::var("SHOAL_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty())
            {
                Some(t) => t,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .map_err(|e| CliError::Api(format!("cannot read the token: {e}")))?;
                    line
                }
            },
        };
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(CliError::Api(
                "no token given: --token-file FILE, SHOAL_TOKEN, or the token on standard input"
                    .into(),
            ));
        }
        let me = Client::new(hub, Some(token.clone()))
            .get("/api/v1/whoami", &[])
            .await?;
        let path = credentials::save(hub, &token).map_err(CliError::Api)?;
        Ok(format!(
            "logged in to {hub} as {} ({}); saved in {}\n",
            str_of(&me["name"]),
            str_of(&me["role"]),
            path.display()
        ))
    }
}

impl Client {
    pub async fn whoami(&self, output: Output) -> Result<String, CliError> {
        let v = self.get("/api/v1/whoami", &[]).await?;
        Ok(if output == Output::Json {
            pretty(&v)
        } else {
            format!("{} ({})\n", str_of(&v["name"]), str_of(&v["role"]))
        })
    }
}

/// `shoal audit`: who did what, newest last.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// How many of the latest entries.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Only refused requests.
    #[arg(long)]
    denied: bool,
    /// Only this actor (token:NAME, anonymous, unauthenticated).
    #[arg(long)]
    actor: Option<String>,
}

impl AuditArgs {
    pub async fn run(self, client: &Client, output: Output) -> Result<String, CliError> {
        let mut q = vec![("limit", self.limit.to_string())];
        if self.denied {
            q.push(("outcome", "denied".into()));
        }
        if let Some(a) = self.actor {
            q.push(("actor", a));
        }
        let v = client.get("/api/v1/audit", &q).await?;
        if output == Output::Json {
            return Ok(pretty(&v));
        }
        let rows: Vec<Vec<String>> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                vec![
                    time_of(&e["time_ms"]),
                    str_of(&e["actor"]),
                    e["role"].as_str().unwrap_or("-").to_string(),
                    str_of(&e["action"]),
                    str_of(&e["object"]),
                    e["status"].to_string(),
                    match e["reason"].as_str() {
                        Some(r) => format!("{} ({r})", str_of(&e["outcome"])),
                        None => str_of(&e["outcome"]),
                    },
                    e["from"].as_str().unwrap_or("-").to_string(),
                ]
            })
            .collect();
        Ok(table(
            &[
                "TIME", "ACTOR", "ROLE", "ACTION", "OBJECT", "STATUS", "OUTCOME", "FROM",
            ],
            &rows,
        ))
    }
}
