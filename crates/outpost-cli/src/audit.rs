//! `outpost audit verify`: checks an agent's audit log (hash chain, sequence, signatures)
//! and names the first bad entry. Anyone with the file can run it; `--pubkey` proves the
//! log is the agent's, not just consistent with itself.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;

/// `outpost audit` actions.
#[derive(Subcommand)]
pub enum AuditAction {
    /// Check the chain and signatures of an audit log; exit 1 at the first bad entry.
    Verify {
        /// The audit log (JSON Lines).
        file: PathBuf,
        /// The agent's Ed25519 public key (64 hex characters). Without it the key recorded
        /// in the log's first entry is used, which shows the log is consistent, not whose.
        #[arg(long)]
        pubkey: Option<String>,
    },
}

/// Runs an audit action.
pub fn run(action: AuditAction) -> anyhow::Result<()> {
    let AuditAction::Verify { file, pubkey } = action;
    let key = match pubkey.as_deref() {
        Some(text) => match outpost_audit::parse_public_key(text.trim()) {
            Some(key) => Some(key),
            None => {
                bail!("--pubkey: expected an Ed25519 public key as 64 lowercase hex characters")
            }
        },
        None => None,
    };
    let report = outpost_audit::verify(&file, key.as_ref())?;
    match &report.first_problem {
        None => {
            println!(
                "{}: {} entries, sequence, hash chain and signatures intact (key: {})",
                file.display(),
                report.entries,
                report.key_source
            );
            Ok(())
        }
        Some(problem) => {
            println!("{}: {} good entries, then:", file.display(), report.entries);
            bail!("{}: {problem}", file.display())
        }
    }
}
