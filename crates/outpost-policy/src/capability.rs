//! The closed list of capabilities a job may ask for.

use std::fmt;

/// Every capability a job may name. The list is closed on purpose: there is no capability
/// that reads or changes the policy, so a hub cannot ask for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// Agent and connector status, queue depths, versions, disk, clock.
    Health,
    /// The agent's own recent logs.
    LogsTail,
    /// Search over the agent's logs and stored HL7 messages.
    LogsSearch,
    /// Restart one connector.
    ConnectorRestart,
    /// Pause one connector.
    ConnectorPause,
    /// Resume one paused connector.
    ConnectorResume,
    /// A diagnostics bundle: masked config, recent logs, health, preflight.
    Diagnostics,
    /// List a folder under the policy's roots.
    FilesList,
    /// Read a file under the policy's roots.
    FilesRead,
    /// Write a file under the policy's roots.
    FilesWrite,
    /// A read-only query on the tables and columns the policy names.
    SqlQuery,
    /// Run a configured backup.
    BackupRun,
    /// List the configured backups.
    BackupList,
    /// Restore a backup to a scratch target.
    BackupRestore,
    /// Install a signed release.
    UpdateApply,
    /// Propose a new connector config, applied only after local approval.
    ConfigPropose,
    /// Run commands; refused unless the policy enables it, and then approval-only.
    Shell,
}

impl Capability {
    /// All capabilities, in the order of security.md's table.
    pub const ALL: [Capability; 17] = [
        Capability::Health,
        Capability::LogsTail,
        Capability::LogsSearch,
        Capability::ConnectorRestart,
        Capability::ConnectorPause,
        Capability::ConnectorResume,
        Capability::Diagnostics,
        Capability::FilesList,
        Capability::FilesRead,
        Capability::FilesWrite,
        Capability::SqlQuery,
        Capability::BackupRun,
        Capability::BackupList,
        Capability::BackupRestore,
        Capability::UpdateApply,
        Capability::ConfigPropose,
        Capability::Shell,
    ];

    /// The name used in jobs and in the policy's `[allow]` table, e.g. `files.read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Health => "health",
            Capability::LogsTail => "logs.tail",
            Capability::LogsSearch => "logs.search",
            Capability::ConnectorRestart => "connector.restart",
            Capability::ConnectorPause => "connector.pause",
            Capability::ConnectorResume => "connector.resume",
            Capability::Diagnostics => "diagnostics",
            Capability::FilesList => "files.list",
            Capability::FilesRead => "files.read",
            Capability::FilesWrite => "files.write",
            Capability::SqlQuery => "sql.query",
            Capability::BackupRun => "backup.run",
            Capability::BackupList => "backup.list",
            Capability::BackupRestore => "backup.restore",
            Capability::UpdateApply => "update.apply",
            Capability::ConfigPropose => "config.propose",
            Capability::Shell => "shell",
        }
    }

    /// Looks a capability up by its exact name; `None` for anything not in the list.
    pub fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether this capability works on files under the policy's `roots`.
    pub fn is_files(self) -> bool {
        matches!(
            self,
            Capability::FilesList | Capability::FilesRead | Capability::FilesWrite
        )
    }

    /// Index into per-capability tables.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The policy key of this capability's entry, quoted as TOML needs it:
    /// `allow.health`, `allow."files.read"`.
    pub fn policy_key(self) -> String {
        let name = self.as_str();
        if name.contains('.') {
            format!("allow.\"{name}\"")
        } else {
            format!("allow.{name}")
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indexes_match_all() {
        for (i, cap) in Capability::ALL.into_iter().enumerate() {
            assert_eq!(Capability::from_name(cap.as_str()), Some(cap));
            assert_eq!(cap.index(), i);
        }
    }

    #[test]
    fn there_is_no_policy_capability() {
        for name in ["policy.write", "policy.read", "policy", "config.write"] {
            assert_eq!(Capability::from_name(name), None, "{name}");
        }
    }
}
