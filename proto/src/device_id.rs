//! Device ids: the key of everything a device sends. Kept to characters that are safe in MQTT
//! topics, URLs and file names.

/// Longest device id accepted.
pub const MAX_LEN: usize = 128;

/// Why a device id is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidDeviceId {
    Empty,
    TooLong(usize),
    BadChar(char),
}

impl std::fmt::Display for InvalidDeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "device id is empty"),
            Self::TooLong(n) => write!(f, "device id is {n} characters long (at most {MAX_LEN})"),
            Self::BadChar(c) => write!(
                f,
                "device id contains {c:?}; use letters, digits, '.', '_', ':' and '-' only"
            ),
        }
    }
}

impl std::error::Error for InvalidDeviceId {}

/// Checks a device id: 1 to 128 characters from `[A-Za-z0-9._:-]`.
pub fn validate(id: &str) -> Result<(), InvalidDeviceId> {
    if id.is_empty() {
        return Err(InvalidDeviceId::Empty);
    }
    if id.len() > MAX_LEN {
        return Err(InvalidDeviceId::TooLong(id.len()));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        Some(c) => Err(InvalidDeviceId::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for id in ["pi-4", "node_01.lab", "a", "gpu:0", &"x".repeat(MAX_LEN)] {
            assert_eq!(validate(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(validate(""), Err(InvalidDeviceId::Empty));
        assert_eq!(
            validate(&"x".repeat(129)),
            Err(InvalidDeviceId::TooLong(129))
        );
        assert_eq!(validate("a/b"), Err(InvalidDeviceId::BadChar('/')));
        assert_eq!(validate("a b"), Err(InvalidDeviceId::BadChar(' ')));
        assert_eq!(validate("#"), Err(InvalidDeviceId::BadChar('#')));
        assert!(validate("é").is_err());
    }
}
