//! `outpost sql install-triggers`: Firebird has no change log, so change capture needs a
//! change table and triggers in the practice's database. This prints the exact script
//! (`--print`, to read or hand to the practice's IT first) or runs it, for each Firebird
//! source of an agent config (or the one named by `--source`).
//!
//! Joined to the other `outpost sql …` actions by flattening them into [`SqlCommand`], so
//! neither file has to know the other's variants.

use std::path::Path;

use anyhow::{bail, Context};
use clap::Subcommand;
use outpost_agent::connectors::SourceKind;
use outpost_sql::{redact_url, Target};

/// `outpost sql …`: the shared actions plus `install-triggers`.
#[derive(Subcommand)]
pub enum SqlCommand {
    /// Firebird: print (`--print`) or install the change table and capture triggers for
    /// each Firebird source.
    InstallTriggers {
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Print the script instead of running it; nothing is changed.
        #[arg(long)]
        print: bool,
    },
    #[command(flatten)]
    Other(crate::sql_cmd::SqlAction),
}

/// Runs `outpost sql …`.
pub async fn run(config: &Path, command: SqlCommand) -> anyhow::Result<()> {
    match command {
        SqlCommand::Other(action) => crate::sql_cmd::run(config, action).await,
        SqlCommand::InstallTriggers { source, print } => {
            install_triggers(config, source.as_deref(), print).await
        }
    }
}

async fn install_triggers(path: &Path, only: Option<&str>, print: bool) -> anyhow::Result<()> {
    let config = outpost_agent::AgentConfig::load(path)?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let mut found = 0usize;
    for entry in &config.sources {
        let SourceKind::Sql(source) = &entry.kind else {
            continue;
        };
        if only.is_some_and(|only| only != entry.name.as_str()) {
            continue;
        }
        if source.target(base)? != Target::Firebird {
            if only.is_some() {
                bail!(
                    "source {}: {} is not a Firebird database; only Firebird needs triggers",
                    entry.name,
                    redact_url(&source.url)
                );
            }
            continue;
        }
        found += 1;
        let url = redact_url(&source.url);
        if print {
            let script = outpost_sql::firebird::install_script(source)
                .await
                .with_context(|| format!("source {} ({url})", entry.name))?;
            println!("-- source {} ({url})\n{script}", entry.name);
        } else {
            let statements = outpost_sql::firebird::install(source)
                .await
                .with_context(|| format!("source {} ({url})", entry.name))?;
            println!(
                "source {} ({url}): change capture installed ({} statements run)",
                entry.name,
                statements.len()
            );
        }
    }
    if found == 0 {
        match only {
            Some(name) => bail!(
                "no source named {name:?} with kind = \"sql\" in {}",
                path.display()
            ),
            None => bail!(
                "no Firebird source (kind = \"sql\", url = \"firebird://…\") in {}",
                path.display()
            ),
        }
    }
    Ok(())
}
