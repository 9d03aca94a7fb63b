//! `outpost hub …` (serve, tokens, agents, API keys) and `outpost agent enroll`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use outpost_agent::AgentConfig;
use outpost_hub::{secrets, HubConfig};

use crate::signals;

/// `outpost hub` actions; none means serve.
#[derive(Subcommand)]
pub enum HubAction {
    /// One-time enrollment tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Enrolled agents.
    Agent {
        #[command(subcommand)]
        action: HubAgentAction,
    },
    /// API keys for the vendor's apps (and the dashboard).
    Apikey {
        #[command(subcommand)]
        action: ApikeyAction,
    },
    /// Staff: the people who run support jobs and look at PHI, each with a personal token.
    Staff {
        #[command(subcommand)]
        action: StaffAction,
    },
}

/// Staff actions.
#[derive(Subcommand)]
pub enum StaffAction {
    /// Add a staff member; their personal token is printed once and stored only as a hash.
    Add {
        /// Their name as it appears in every job and audit entry, e.g. `alice@vendor.com`.
        name: String,
        /// `support` (jobs, audit trails) or `admin` (also the hub's access log).
        #[arg(long, value_parser = ["support", "admin"], default_value = "support")]
        role: String,
    },
    /// List staff members.
    List,
}

/// Token actions.
#[derive(Subcommand)]
pub enum TokenAction {
    /// Make a token for one site; it is printed once and works once.
    Create {
        /// The site's name, e.g. "Smith Pediatrics".
        #[arg(long)]
        name: String,
        /// How long it stays valid, e.g. `24h`, `7d`.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
}

/// Agent actions on the hub.
#[derive(Subcommand)]
pub enum HubAgentAction {
    /// List enrolled agents.
    List,
    /// Refuse every future session of an agent and end its current one.
    Revoke {
        /// The agent id (`agt_…`).
        id: String,
    },
}

/// API key actions.
#[derive(Subcommand)]
pub enum ApikeyAction {
    /// Make an API key; it is printed once and stored only as a hash.
    Create {
        /// Who or what uses it, e.g. "scheduling-app".
        #[arg(long)]
        name: String,
    },
}

/// `outpost agent` actions besides running.
#[derive(Subcommand)]
pub enum AgentAction {
    /// Enroll with a hub: make this agent's key pair and register it with a one-time token.
    Enroll {
        /// The hub's URL, e.g. `https://hub.example.com:8443`.
        #[arg(long)]
        hub: String,
        /// The one-time token from `outpost hub token create`.
        #[arg(long)]
        token: String,
        /// The hub's CA certificate to pin (printed path at hub start-up); without it the
        /// public roots are trusted.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

fn hub_config(path: Option<PathBuf>) -> anyhow::Result<HubConfig> {
    Ok(match path {
        Some(path) => HubConfig::load(&path)?,
        None => HubConfig::default(),
    })
}

/// Runs a hub action, or serves when there is none.
pub async fn run(config: Option<PathBuf>, action: Option<HubAction>) -> anyhow::Result<()> {
    let config = hub_config(config)?;
    let Some(action) = action else {
        return serve(config).await;
    };
    let store = outpost_hub::open_store(&config).await?;
    let now = outpost_hub::now_ms();
    match action {
        HubAction::Token {
            action: TokenAction::Create { name, expires },
        } => {
            let token = secrets::new_secret("opt_");
            let expires_at = now + expires.as_millis() as i64;
            store
                .create_token(&secrets::hash_secret(&token), &name, expires_at)
                .await?;
            println!("{token}");
            eprintln!(
                "one-time enrollment token for {name:?}, valid for {}",
                humantime::format_duration(expires)
            );
        }
        HubAction::Agent {
            action: HubAgentAction::List,
        } => {
            for agent in store.agents().await? {
                let state = if agent.revoked_at_ms.is_some() {
                    "revoked"
                } else {
                    "enrolled"
                };
                println!(
                    "{}  {:<30} {:<9} host {}",
                    agent.id, agent.name, state, agent.hostname
                );
            }
        }
        HubAction::Agent {
            action: HubAgentAction::Revoke { id },
        } => {
            if !store.revoke_agent(&id, now).await? {
                anyhow::bail!("no enrolled, unrevoked agent {id:?} (see `outpost hub agent list`)");
            }
            println!("agent {id} revoked; its sessions are refused from now on");
        }
        HubAction::Apikey {
            action: ApikeyAction::Create { name },
        } => {
            let key = secrets::new_secret("opk_");
            store
                .create_api_key(&secrets::hash_secret(&key), &name, now)
                .await?;
            println!("{key}");
            eprintln!("API key for {name:?}; send it as `Authorization: Bearer <key>`, or paste it into the dashboard");
        }
        HubAction::Staff {
            action: StaffAction::Add { name, role },
        } => {
            let name = name.trim().to_owned();
            if name.is_empty()
                || name.len() > 100
                || name.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                anyhow::bail!("staff name {name:?}: expected 1 to 100 characters without spaces, e.g. alice@vendor.com");
            }
            let token = secrets::new_secret("ops_");
            let staff = outpost_hub::store::StaffRecord {
                name: name.clone(),
                role: role.clone(),
                token_hash: secrets::hash_secret(&token),
                created_at_ms: now,
                disabled_at_ms: None,
            };
            if !store.insert_staff(&staff).await? {
                anyhow::bail!("a staff member named {name:?} already exists");
            }
            println!("{token}");
            eprintln!("staff token for {name} ({role}); use it with `outpost job run --token` (or OUTPOST_STAFF_TOKEN) and to sign in to the dashboard");
        }
        HubAction::Staff {
            action: StaffAction::List,
        } => {
            for staff in store.staff().await? {
                let state = if staff.disabled_at_ms.is_some() {
                    "disabled"
                } else {
                    "active"
                };
                println!("{:<40} {:<8} {state}", staff.name, staff.role);
            }
        }
    }
    Ok(())
}

async fn serve(config: HubConfig) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let hub = outpost_hub::start(config, shutdown.clone())
        .await
        .context("hub could not start")?;
    eprintln!("hub listening on https://{}", hub.addr);
    if let Some(ca) = &hub.ca_path {
        eprintln!(
            "agents pin this CA: {} (SHA-256 {})",
            ca.display(),
            hub.fingerprint
        );
    }
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signals::shutdown_requested().await;
        stop.cancel();
    });
    hub.wait().await;
    Ok(())
}

/// Runs an agent action.
pub async fn agent_action(config: &AgentConfig, action: AgentAction) -> anyhow::Result<()> {
    let AgentAction::Enroll { hub, token, ca } = action;
    let enrolled = outpost_uplink::enroll(&config.data_dir, &hub, &token, ca.as_deref()).await?;
    println!(
        "enrolled as agent {} ({}); start it with: outpost agent --config {}",
        enrolled.agent_id,
        enrolled.name,
        config.path.display()
    );
    Ok(())
}
