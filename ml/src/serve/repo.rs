//! The models a server holds: by name, each with one or more versions side by side. Putting a
//! version replaces it whole; requests already running keep the one they started with, so a
//! swap drops nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::model::LoadedModel;

/// Models by name, then by version (ordered as numbers when they are numbers).
#[derive(Default)]
pub struct Repository {
    models: RwLock<BTreeMap<String, BTreeMap<VersionKey, Arc<LoadedModel>>>>,
}

/// A version, ordered numerically when it is a number ("10" after "9").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct VersionKey(Option<u64>, String);

impl VersionKey {
    fn new(v: &str) -> Self {
        Self(v.parse().ok(), v.to_string())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotFound {
    #[error("no model {0:?} on this server")]
    Model(String),
    #[error("model {0:?} has no version {1:?} (it has {2})")]
    Version(String, String, String),
}

impl Repository {
    /// Adds `model` as `name` version `version`, replacing that version if present.
    pub fn put(&self, name: &str, version: &str, model: LoadedModel) {
        self.models
            .write()
            .expect("repository lock")
            .entry(name.to_string())
            .or_default()
            .insert(VersionKey::new(version), Arc::new(model));
    }

    /// The model `name` at `version`, or its newest version when `version` is empty.
    pub fn get(&self, name: &str, version: &str) -> Result<(String, Arc<LoadedModel>), NotFound> {
        let models = self.models.read().expect("repository lock");
        let versions = models
            .get(name)
            .ok_or_else(|| NotFound::Model(name.into()))?;
        let found = if version.is_empty() {
            versions.iter().next_back()
        } else {
            versions.get_key_value(&VersionKey::new(version))
        };
        found.map(|(k, m)| (k.1.clone(), m.clone())).ok_or_else(|| {
            NotFound::Version(name.into(), version.into(), self.list(versions).join(", "))
        })
    }

    /// The versions of `name`, oldest first.
    pub fn versions(&self, name: &str) -> Vec<String> {
        let models = self.models.read().expect("repository lock");
        models.get(name).map(|v| self.list(v)).unwrap_or_default()
    }

    /// Every version of `name` with its model, oldest first.
    pub fn all(&self, name: &str) -> Vec<(String, Arc<LoadedModel>)> {
        let models = self.models.read().expect("repository lock");
        models
            .get(name)
            .map(|v| v.iter().map(|(k, m)| (k.1.clone(), m.clone())).collect())
            .unwrap_or_default()
    }

    /// Removes `name` at `version` (every version when `version` is empty); whether anything
    /// was there. Requests already running finish on it.
    pub fn remove(&self, name: &str, version: &str) -> bool {
        let mut models = self.models.write().expect("repository lock");
        let Some(versions) = models.get_mut(name) else {
            return false;
        };
        let removed = if version.is_empty() {
            !std::mem::take(versions).is_empty()
        } else {
            versions.remove(&VersionKey::new(version)).is_some()
        };
        if versions.is_empty() {
            models.remove(name);
        }
        removed
    }

    /// Every model name.
    pub fn names(&self) -> Vec<String> {
        self.models
            .read()
            .expect("repository lock")
            .keys()
            .cloned()
            .collect()
    }

    fn list(&self, versions: &BTreeMap<VersionKey, Arc<LoadedModel>>) -> Vec<String> {
        versions.keys().map(|k| k.1.clone()).collect()
    }
}
