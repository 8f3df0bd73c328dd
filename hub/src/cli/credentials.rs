//! Where the operator commands find their API token: `SHOAL_TOKEN`, else the credentials file's
//! entry for the hub's URL, which `shoal login` (and `shoal up`, for its own hub) writes.
//!
//! The file is `$SHOAL_CREDENTIALS`, else `$XDG_CONFIG_HOME/shoal/credentials.toml`, else
//! `~/.config/shoal/credentials.toml`; readable by its owner only:
//!
//! ```toml
//! [hubs."http://127.0.0.1:8080"]
//! token = "shoal_…"
//! ```

use std::path::PathBuf;

/// The credentials file's path (it may not exist yet); `None` without any home to put it in.
pub fn path() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("SHOAL_CREDENTIALS")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("shoal/credentials.toml")))
        .or_else(|| var("HOME").map(|h| h.join(".config/shoal/credentials.toml")))
}

fn key(hub: &str) -> String {
    hub.trim_end_matches('/').to_string()
}

/// The token for `hub`: `SHOAL_TOKEN`, else the credentials file's entry.
pub fn token_for(hub: &str) -> Option<String> {
    if let Some(t) = std::env::var("SHOAL_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    {
        return Some(t);
    }
    let text = std::fs::read_to_string(path()?).ok()?;
    let table: toml::Table = text.parse().ok()?;
    table
        .get("hubs")?
        .get(key(hub).as_str())?
        .get("token")?
        .as_str()
        .map(str::to_string)
}

/// Stores `token` for `hub`, keeping the other hubs' entries; returns the file's path.
pub fn save(hub: &str, token: &str) -> Result<PathBuf, String> {
    let path = path().ok_or("no home directory: set SHOAL_CREDENTIALS to a file path")?;
    let mut table: toml::Table = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .parse()
            .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let hubs = table
        .entry("hubs")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(hubs) = hubs.as_table_mut() else {
        return Err(format!("{}: `hubs` is not a table", path.display()));
    };
    let mut entry = toml::Table::new();
    entry.insert("token".into(), toml::Value::String(token.into()));
    hubs.insert(key(hub), toml::Value::Table(entry));
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = toml::to_string(&table).expect("a TOML table serialises");
    crate::auth::tokens::write_secret(&path, &text)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}
