//! `outpost`: parse the command line, set up logging, dispatch, turn the result into an
//! exit code.

#![forbid(unsafe_code)]

mod approvals;
mod audit;
mod bench;
mod demo;
mod dicom;
mod downstream;
mod hub;
mod inspect;
mod job;
mod samples;
mod signals;
mod sql_cmd;
mod sql_triggers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_agent::logbuf::LogBuffer;
use outpost_agent::AgentConfig;

/// Outpost: the on-premise gateway between a practice's systems and its vendors.
#[derive(Parser)]
#[command(name = "outpost", version, about)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `outpost_agent=debug` (RUST_LOG also works).
    /// Default: `info` for the agent, `warn` for the tools, whose output is the report.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or Ctrl-C.
    Agent {
        /// The agent's TOML config.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<hub::AgentAction>,
    },
    /// Run the hub (HTTPS API, agents' sessions, dashboard), or manage it.
    Hub {
        /// The hub's TOML config (default: built-in settings, data in ./outpost-hub).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<hub::HubAction>,
    },
    /// Run an agent, a downstream MLLP server and a sender on loopback, and show where the
    /// messages went.
    Demo {
        /// Stop by itself after this long, e.g. `30s` (default: run until Ctrl-C).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        run_for: Option<Duration>,
        /// Keep the demo's hub and agent data here (default: a temporary folder, removed
        /// at the end).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Inspect the queue: depth per sink, dead letters, retries.
    Queue {
        /// The agent's TOML config (its data_dir holds the queue).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: inspect::QueueAction,
    },
    /// DICOM tools: C-ECHO a node, C-STORE files to it.
    Dicom {
        #[command(subcommand)]
        action: dicom::DicomAction,
    },
    /// HL7 tools.
    Hl7 {
        #[command(subcommand)]
        action: inspect::Hl7Action,
    },
    /// Run support jobs on agents through the hub (as a staff member).
    Job {
        #[command(subcommand)]
        action: job::JobAction,
    },
    /// On the agent: list, approve or deny support jobs waiting for a local approval.
    Approvals {
        /// The agent's TOML config (its data_dir holds the approvals).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: approvals::ApprovalsAction,
    },
    /// Check an agent's tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        action: audit::AuditAction,
    },
    /// Database sync: least-privilege grants, a check of them, snapshot progress and lag.
    Sql {
        /// The agent's TOML config (its `kind = "sql"` sources and sinks).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: sql_triggers::SqlCommand,
    },
    /// End-to-end benchmarks that print figures beside a reference peer.
    Bench {
        #[command(subcommand)]
        target: bench::BenchTarget,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS implementation for every client and server in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let default_filter = match cli.command {
        Command::Agent { action: None, .. } | Command::Hub { action: None, .. } => "info",
        _ => "warn",
    };
    let logs = LogBuffer::default();
    init_logging(cli.log.as_deref().unwrap_or(default_filter), &logs);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, logs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, logs: LogBuffer) -> anyhow::Result<()> {
    match command {
        Command::Agent {
            config,
            action: None,
        } => run_agent(required(config)?, logs).await,
        Command::Agent {
            config,
            action: Some(action),
        } => hub::agent_action(&load_config(&required(config)?)?, action).await,
        Command::Hub { config, action } => hub::run(config, action).await,
        Command::Demo { run_for, data_dir } => demo::run(run_for, data_dir).await,
        Command::Queue { config, action } => {
            inspect::queue(&load_config(&required(config)?)?, action).await
        }
        Command::Hl7 { action } => inspect::hl7(action).await,
        Command::Dicom { action } => dicom::run(action).await,
        Command::Audit { action } => audit::run(action),
        Command::Job { action } => job::run(action).await,
        Command::Approvals { config, action } => {
            approvals::run(&load_config(&required(config)?)?, action)
        }
        Command::Sql { config, action } => sql_triggers::run(&required(config)?, action).await,
        Command::Bench { target } => bench::run(target).await,
    }
}

/// Runs the agent until a stop signal; after `config.propose` applied a new config, stops
/// it and starts it again with the new file.
async fn run_agent(config_path: PathBuf, logs: LogBuffer) -> anyhow::Result<()> {
    let stopping = tokio_util::sync::CancellationToken::new();
    let stop = stopping.clone();
    tokio::spawn(async move {
        signals::shutdown_requested().await;
        stop.cancel();
    });
    loop {
        let config = load_config(&config_path)?;
        let shutdown = stopping.child_token();
        let (reload, mut reloads) = outpost_agent::jobs::ReloadRequest::new();
        let extras = outpost_agent::AgentExtras {
            logs: logs.clone(),
            reload,
        };
        let agent = outpost_agent::start_with(config, shutdown.clone(), extras)
            .await
            .context("agent could not start")?;
        for (name, addr) in &agent.listeners {
            tracing::info!(source = %name, %addr, "listening");
        }
        // An agent without a hub drops the reload sender at once: that is no request.
        let reload_requested = tokio::select! {
            _ = stopping.cancelled() => false,
            true = async { reloads.changed().await.is_ok() } => true,
        };
        if reload_requested {
            // Let the job that asked report its result before the uplink goes.
            tokio::time::sleep(Duration::from_secs(1)).await;
            tracing::info!(config = %config_path.display(), "restarting with the new config");
        }
        shutdown.cancel();
        agent.wait().await;
        if !reload_requested {
            return Ok(());
        }
    }
}

/// The error and its causes on one line, each said once: our error types already put
/// their cause's text in their own message.
fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `--config` is global (so it may follow the action) and global arguments cannot be
/// required by clap itself.
fn required(config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    config.context("this command needs the agent's config: --config FILE")
}

fn load_config(path: &std::path::Path) -> anyhow::Result<AgentConfig> {
    Ok(AgentConfig::load(path)?)
}

/// Logs to stderr, and keeps recent lines in `logs` for the agent's `logs.*` jobs.
fn init_logging(filter: &str, logs: &LogBuffer) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and service logs must stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(logs.layer())
        .try_init();
}
