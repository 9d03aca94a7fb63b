//! Identifiers and checked names shared by every Outpost crate. No IO lives here.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Identifies one item in an agent's queue. Ids only grow and are never reused, so a
/// receiver can use them to drop a redelivered item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ItemId(pub i64);

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ItemId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .map(ItemId)
            .ok_or_else(|| NameError::BadItemId(s.to_owned()))
    }
}

/// The name of a source or sink from the agent config. Checked once when parsed: 1 to 64
/// characters from `A-Z a-z 0-9 . _ -`, so it is safe in file names, log fields and URLs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ConnectorName(String);

/// The longest connector name accepted.
pub const MAX_CONNECTOR_NAME_LEN: usize = 64;

impl ConnectorName {
    /// Checks `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let is_valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if name.is_empty() || name.len() > MAX_CONNECTOR_NAME_LEN {
            return Err(NameError::ConnectorLength(name.len()));
        }
        if let Some(bad) = name.chars().find(|c| !is_valid_char(*c)) {
            return Err(NameError::ConnectorChar(bad));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ConnectorName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for ConnectorName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::new(&raw).map_err(serde::de::Error::custom)
    }
}

/// What an item in the queue carries. Sinks use it to refuse items they cannot deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// One HL7 v2 message in ER7 encoding, segments ended by CR.
    Hl7,
    /// One DICOM instance: the payload is a small record naming its encrypted blob.
    Dicom,
    /// One database change event (JSON, see `docs/change-events.md`).
    Change,
}

impl ItemKind {
    /// The stable name stored in the queue.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hl7 => "hl7",
            Self::Dicom => "dicom",
            Self::Change => "change",
        }
    }
}

impl FromStr for ItemKind {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hl7" => Ok(Self::Hl7),
            "dicom" => Ok(Self::Dicom),
            "change" => Ok(Self::Change),
            other => Err(NameError::UnknownKind(other.to_owned())),
        }
    }
}

impl fmt::Display for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name or id that failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Connector names are 1 to 64 characters.
    #[error("a connector name must be 1 to {MAX_CONNECTOR_NAME_LEN} characters, not {0}")]
    ConnectorLength(usize),
    /// Connector names use a small safe alphabet.
    #[error("a connector name may use only A-Z, a-z, 0-9, '.', '_' and '-', not {0:?}")]
    ConnectorChar(char),
    /// Item ids are positive integers.
    #[error("{0:?} is not an item id (a positive integer)")]
    BadItemId(String),
    /// An item kind this version does not know.
    #[error("unknown item kind {0:?}")]
    UnknownKind(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_names_accept_the_safe_alphabet_only() {
        assert!(ConnectorName::new("lab-in_2.a").is_ok());
        assert_eq!(ConnectorName::new(""), Err(NameError::ConnectorLength(0)));
        assert_eq!(
            ConnectorName::new("lab in"),
            Err(NameError::ConnectorChar(' '))
        );
        assert_eq!(
            ConnectorName::new("../x"),
            Err(NameError::ConnectorChar('/'))
        );
        assert!(ConnectorName::new(&"a".repeat(65)).is_err());
    }

    #[test]
    fn item_ids_are_positive_integers() {
        assert_eq!("42".parse::<ItemId>(), Ok(ItemId(42)));
        assert!("0".parse::<ItemId>().is_err());
        assert!("x".parse::<ItemId>().is_err());
    }
}
