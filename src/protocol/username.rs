//! Usernames: validated and case-folded once, at the edge, so every other layer can trust them.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Shortest allowed username, in characters.
pub const MIN_LEN: usize = 3;
/// Longest allowed username, in characters.
pub const MAX_LEN: usize = 32;

/// Why a string is not a valid username.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// Fewer than 3 or more than 32 characters.
    #[error("a username has 3 to 32 characters")]
    Length,
    /// A character outside `a-z`, `0-9`, `_`, `.`, `-` (after case folding).
    #[error("a username may only contain a-z, 0-9, '_', '.' and '-'")]
    Charset,
}

/// A valid username: 3–32 characters of `[a-z0-9_.-]`, ASCII letters folded to lower case.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Username(String);

impl Username {
    /// Validates `raw`, folding ASCII upper case to lower case (`Alice` is `alice`).
    pub fn parse(raw: &str) -> Result<Self, UsernameError> {
        let len = raw.chars().count();
        if !(MIN_LEN..=MAX_LEN).contains(&len) {
            return Err(UsernameError::Length);
        }
        let folded = raw.to_ascii_lowercase();
        let valid = folded.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
        if !valid {
            return Err(UsernameError::Charset);
        }
        Ok(Self(folded))
    }

    /// The canonical (folded) name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for Username {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Username {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_accepts_the_charset() {
        assert_eq!(
            Username::parse("Alice_1.b-c").unwrap().as_str(),
            "alice_1.b-c"
        );
        assert_eq!(Username::parse("abc").unwrap().as_str(), "abc");
        assert!(Username::parse(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn rejects_bad_lengths_and_characters() {
        assert_eq!(Username::parse("ab"), Err(UsernameError::Length));
        assert_eq!(Username::parse(&"a".repeat(33)), Err(UsernameError::Length));
        assert_eq!(Username::parse("al ice"), Err(UsernameError::Charset));
        assert_eq!(Username::parse("alice!"), Err(UsernameError::Charset));
        assert_eq!(Username::parse("ålice"), Err(UsernameError::Charset));
        assert_eq!(Username::parse("al\u{0}ce"), Err(UsernameError::Charset));
    }
}
