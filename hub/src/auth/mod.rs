//! Who may do what: roles, the principals that hold them ([`tokens`]: API tokens stored hashed),
//! and the append-only [`audit`] log; for devices, the hub's certificate authority ([`ca`]),
//! enrollment, renewal and revocation ([`devices`]) and the gRPC port's TLS ([`tls`]). It uses
//! [`crate::store`] (tokens and identities live in record tables) and nothing above it;
//! [`crate::api`] enforces it on every route, [`crate::ingest`] on every device stream.
//!
//! Roles: `viewer` reads; `operator` manages devices; `scientist` runs jobs and exports
//! datasets (jobs run commands on the hub); `admin` does everything, including tokens and the
//! audit log. A route needs one role; `admin` holds every role, and every role can read.

pub mod audit;
pub mod ca;
pub mod devices;
pub mod oidc;
pub mod tls;
pub mod tokens;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use self::audit::{AuditEntry, AuditLog};
pub use self::devices::{DeviceAuthError, DeviceAuthority, PeerCert};
pub use self::tokens::{TokenError, Tokens};

/// What a principal may do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads devices, telemetry, jobs, runs and their logs.
    Viewer,
    /// Manages devices (and reads).
    Operator,
    /// Applies and runs jobs (commands on the hub), exports datasets (and reads).
    Scientist,
    /// Everything, including API tokens and the audit log.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Scientist, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Scientist => "scientist",
            Role::Admin => "admin",
        }
    }

    /// Whether holding `self` permits what needs `needed`.
    pub fn permits(self, needed: Role) -> bool {
        self == Role::Admin || self == needed || needed == Role::Viewer
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (viewer, operator, scientist, admin)"))
    }
}

/// Who is asking: a token's holder, or anyone when authentication is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Principal {
    /// `token:NAME` for an API token; `anonymous` when authentication is off.
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// Everyone, when the hub runs with `--insecure-no-auth`.
    pub fn anonymous_admin() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_holds_every_role_and_everyone_reads() {
        for have in Role::ALL {
            assert!(have.permits(Role::Viewer), "{have} reads");
            assert!(Role::Admin.permits(have));
        }
        assert!(!Role::Viewer.permits(Role::Operator));
        assert!(!Role::Operator.permits(Role::Scientist));
        assert!(!Role::Scientist.permits(Role::Operator));
        assert!(!Role::Scientist.permits(Role::Admin));
        assert!(Role::Scientist.permits(Role::Scientist));
    }

    #[test]
    fn roles_parse_by_name_only() {
        assert_eq!("scientist".parse::<Role>(), Ok(Role::Scientist));
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .contains("viewer, operator")
        );
    }
}
