//! `outpost approvals`: the practice's side of jobs that wait for a local approval.

use clap::Subcommand;
use outpost_agent::jobs::approvals::Approvals;
use outpost_agent::AgentConfig;

/// `outpost approvals` actions.
#[derive(Subcommand)]
pub enum ApprovalsAction {
    /// Jobs waiting for a decision.
    List,
    /// Let a waiting job run.
    Approve {
        /// The job id (or its first characters).
        id: String,
        /// Who approves, for the audit log (default: the logged-in user).
        #[arg(long)]
        by: Option<String>,
    },
    /// Refuse a waiting job.
    Deny {
        /// The job id (or its first characters).
        id: String,
        /// Who denies, for the audit log (default: the logged-in user).
        #[arg(long)]
        by: Option<String>,
        /// Why, shown to the vendor's staff.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Runs an approvals action against the agent's data directory.
pub fn run(config: &AgentConfig, action: ApprovalsAction) -> anyhow::Result<()> {
    let approvals = Approvals::open(&config.data_dir)?;
    let now = outpost_queue::now_ms();
    match action {
        ApprovalsAction::List => {
            let waiting = approvals.in_state("waiting")?;
            if waiting.is_empty() {
                println!("no job is waiting for approval");
            }
            for job in waiting {
                let left = (job.expires_at_ms - now).max(0) / 1000;
                println!(
                    "{}  {:<18} from {:<24} expires in {}s  ({})\n    args {}",
                    job.job_id, job.capability, job.staff, left, job.rule, job.args
                );
            }
        }
        ApprovalsAction::Approve { id, by } => {
            let by = approver(by)?;
            let job = approvals.decide(&id, true, &by, None, now)?;
            println!(
                "approved {} ({} from {}) as {by}; the agent runs it within a second",
                job.job_id, job.capability, job.staff
            );
        }
        ApprovalsAction::Deny { id, by, reason } => {
            let by = approver(by)?;
            let job = approvals.decide(&id, false, &by, reason.as_deref(), now)?;
            println!(
                "denied {} ({} from {}) as {by}",
                job.job_id, job.capability, job.staff
            );
        }
    }
    Ok(())
}

fn approver(by: Option<String>) -> anyhow::Result<String> {
    let name = by
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("USERNAME").ok())
        .unwrap_or_else(|| "local".to_owned());
    let name = name.trim().to_owned();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        anyhow::bail!("--by: expected a name of 1 to 100 characters");
    }
    Ok(name)
}
