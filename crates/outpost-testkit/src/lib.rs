//! Helpers for Outpost's integration tests (a dev-dependency only).
//!
//! - [`Agent`]: the `outpost` binary as a child process with its own temporary config and
//!   data directory, killed when dropped.
//! - [`PyHl7Server`] and [`mllp_send`]: python-hl7's MLLP server (`peers/pyhl7_mllp_server.py`)
//!   and its `mllp_send` command-line sender, the reference peers.
//! - [`ScriptedDownstream`], [`SteadySender`] and [`send_with_retries`]: MLLP peers written
//!   here, for answers the Python peer cannot give and for senders that count their ACKs.
//! - [`Hub`] and [`HubApi`]: the hub as a child process (on SQLite or PostgreSQL, see
//!   [`HubBackend`] and [`on_both_hub_backends!`]), and a client for its data API pinned to
//!   the hub's CA; [`Hl7apyServer`]: hl7apy's MLLP server; [`Browser`]: headless Chromium
//!   over the DevTools protocol, for the dashboard.
//! - [`PgDatabase`]: a fresh database on a real PostgreSQL 15 on loopback, shared by the
//!   tests (and test processes) running at the same time.
//! - [`wait_until`]: polls with a deadline and fails with the last thing it saw; tests never
//!   sleep to wait for something.
//!
//! Every panic names what was expected and what happened, with the agent's and the peer's
//! log tails, so a failure can be understood without a rerun.

mod agent;
mod browser;
pub mod dicom;
pub mod firebird;
mod hl7apy;
mod hub;
pub mod jsonl;
pub mod mariadb;
mod mllp;
mod postgres;
mod process;
mod python;
pub mod samples;
mod shared_server;
pub mod support;

use std::fmt::Debug;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use agent::Agent;
pub use browser::{chromium, Browser};
pub use hl7apy::{require_hl7apy, Hl7apyServer};
pub use hub::{
    agent_config_for_hub, enrolled_agent_id, hub_sink_config, ApiResponse, Hub, HubApi, HubBackend,
};
pub use mllp::{
    ack_of, read_frame, send_with_retries, write_frame, DownstreamReply, ScriptedDownstream,
    SendReport, SteadySender,
};
pub use postgres::{skip_postgres_tests, PgDatabase};
pub use python::{mllp_send, python, require_python_hl7, skip_peer_tests, PyHl7Server};

/// Runs hub end-to-end scenarios once per [`HubBackend`]: for each `name;` it makes
/// `sqlite::name` and `postgres::name` `#[test]`s calling `name(HubBackend::…)`, a function
/// the test file defines (start its hubs with [`Hub::start_on`]). The PostgreSQL variant is
/// skipped, with a `SKIPPED` line, when `OUTPOST_PEERS=skip`.
///
/// ```ignore
/// outpost_testkit::on_both_hub_backends! {
///     enrollment_works_once;
///     the_dashboard_shows_the_agent;
/// }
///
/// fn enrollment_works_once(backend: HubBackend) {
///     let hub = Hub::start_on(BIN, backend);
///     // …
/// }
/// ```
#[macro_export]
macro_rules! on_both_hub_backends {
    ($($name:ident;)*) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::HubBackend::Sqlite);
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if $crate::skip_postgres_tests(concat!("postgres::", stringify!($name))) {
                        return;
                    }
                    super::$name($crate::HubBackend::Postgres);
                }
            )*
        }
    };
}

/// The workspace root: the nearest ancestor of this crate holding `peers/` and a
/// `Cargo.toml` with a `[workspace]` table.
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|dir| {
            dir.join("peers").is_dir()
                && std::fs::read_to_string(dir.join("Cargo.toml"))
                    .is_ok_and(|text| text.contains("[workspace]"))
        })
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!(
                "no ancestor of {} holds peers/ and a workspace Cargo.toml",
                here.display()
            )
        })
}

/// The `peers/` folder of the workspace (the Python MLLP servers).
pub fn peers_dir() -> PathBuf {
    workspace_root().join("peers")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux), from a counter that
/// starts at a random place per test process: a port the kernel handed out for `:0` can be
/// handed out again at once as the source port of any outgoing connection, which made
/// servers started on it fail with "address in use" under load.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().wrapping_mul(2_654_435_761);
        let _ = NEXT.compare_exchange(u32::MAX, seed % COUNT, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..COUNT {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 between {FIRST} and {}",
        FIRST + COUNT
    )
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` right now.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// What a [`wait_until`] check returns: `Some`/`Ok` when done; `None` or `Err(observation)`
/// while not, the observation being reported if the deadline passes.
pub trait Observation<T> {
    /// `Ok` when the wait is over, otherwise what was observed.
    fn into_outcome(self) -> Result<T, String>;
}

impl<T> Observation<T> for Option<T> {
    fn into_outcome(self) -> Result<T, String> {
        self.ok_or_else(|| "not yet (the check returned None)".to_owned())
    }
}

impl<T, E: Debug> Observation<T> for Result<T, E> {
    fn into_outcome(self) -> Result<T, String> {
        self.map_err(|err| format!("{err:?}"))
    }
}

/// Polls `check` (every 10 ms at first, backing off to 250 ms) until it returns `Some`/`Ok`
/// and returns that value; panics with `what` and the last observation once `deadline` has
/// passed.
pub fn wait_until<T, O: Observation<T>>(
    deadline: Duration,
    what: &str,
    check: impl FnMut() -> O,
) -> T {
    wait_until_explained(deadline, what, check, String::new)
}

/// [`wait_until`], adding `explain()` (e.g. log tails, queue counts) to the panic message.
pub fn wait_until_explained<T, O: Observation<T>>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> O,
    explain: impl FnOnce() -> String,
) -> T {
    let started = Instant::now();
    let mut pause = Duration::from_millis(10);
    let mut checks = 0u32;
    loop {
        checks += 1;
        let last = match check().into_outcome() {
            Ok(value) => return value,
            Err(observation) => observation,
        };
        if started.elapsed() >= deadline {
            panic!(
                "timed out after {deadline:?} ({checks} checks) waiting until {what}\nlast observation: {last}\n{}",
                explain()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// A config with one MLLP source `in` listening on 127.0.0.1:`listen`, one MLLP sink
/// `out` connecting to 127.0.0.1:`connect`, and a route between them; each `*_extra` is
/// added to its table (TOML lines).
pub fn one_route_config(
    listen: u16,
    connect: u16,
    source_extra: &str,
    sink_extra: &str,
    route_extra: &str,
) -> String {
    format!(
        "[[source]]\nname = \"in\"\nkind = \"mllp\"\nlisten = \"127.0.0.1:{listen}\"\n{source_extra}\n\n\
         [[sink]]\nname = \"out\"\nkind = \"mllp\"\nconnect = \"127.0.0.1:{connect}\"\n{sink_extra}\n\n\
         [[route]]\nfrom = \"in\"\nto = [\"out\"]\n{route_extra}\n"
    )
}

/// Sends each message over one connection to 127.0.0.1:`port`, waiting for each reply
/// before the next, and returns the replies. Panics if the connection fails.
pub fn send_each(port: u16, messages: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("tokio runtime: {err}"));
    runtime.block_on(async {
        let addr = format!("127.0.0.1:{port}");
        let mut client =
            outpost_mllp::MllpClient::connect(addr.as_str(), Duration::from_secs(5), 1024 * 1024)
                .await
                .unwrap_or_else(|err| panic!("connect {addr}: {err}"));
        let mut replies = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let reply = client
                .request(message, Duration::from_secs(30))
                .await
                .unwrap_or_else(|err| {
                    panic!(
                        "message {i} of {} to {addr} got no reply: {err}\nmessage: {:?}",
                        messages.len(),
                        String::from_utf8_lossy(message)
                    )
                });
            replies.push(reply.to_vec());
        }
        replies
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `text` without ANSI escape sequences (the agent's log colours its output even into a file).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A process's resident set size in KiB (`VmRSS` in `/proc/<pid>/status`; Linux only).
pub fn rss_kb(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmRSS:")
}

/// A process's peak resident set size in KiB (`VmHWM` in `/proc/<pid>/status`; Linux only).
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmHWM:")
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Turns CRLF and lone LF into CR, as the gateway does with segment endings.
pub fn normalize_segment_ends(raw: &[u8]) -> Vec<u8> {
    outpost_hl7::normalize_segment_terminators(raw).into_owned()
}

/// Runs `command`, panicking with the command line, exit status and output if it cannot be
/// started.
pub fn run(command: &mut std::process::Command) -> std::process::Output {
    command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"))
}

/// Describes a finished command for failure messages: its exit status, stdout and stderr.
pub fn describe_output(output: &std::process::Output) -> String {
    format!(
        "exit status: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        strip_ansi(&String::from_utf8_lossy(&output.stderr))
    )
}
