//! The `outpost` binary as a child process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{describe_output, port_accepts, run, strip_ansi};

/// How long an agent gets to open its listeners.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running `outpost agent` with its own temporary folder holding `outpost.toml`, the
/// `data` folder and `agent.log` (stdout and stderr, kept across restarts). Dropping it
/// kills the process (and prints the log tail if the test is failing).
pub struct Agent {
    bin: PathBuf,
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    listen_ports: Vec<u16>,
    child: Option<Child>,
    pid: u32,
}

impl Agent {
    /// Writes `config_toml` to a fresh temporary folder (with `data_dir = "data"` in front
    /// unless the text sets `data_dir`), starts `<bin> agent --config <file>`, and waits
    /// until every `listen = "ip:port"` address in the config accepts TCP.
    pub fn start(bin: impl AsRef<Path>, config_toml: &str) -> Agent {
        let mut agent = Agent::prepare(bin, config_toml);
        agent.spawn();
        agent
    }

    /// Like [`Agent::start`] but without starting the process: the config is written, so
    /// that one-off commands (e.g. `outpost agent enroll`) can run first. Start it with
    /// [`Agent::launch`].
    pub fn prepare(bin: impl AsRef<Path>, config_toml: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("outpost-agent-")
            .tempdir()
            .unwrap_or_else(|err| panic!("create a temporary folder for the agent: {err}"));
        let config_path = dir.path().join("outpost.toml");
        let has_data_dir = config_toml
            .lines()
            .any(|line| line.trim_start().starts_with("data_dir"));
        let text = if has_data_dir {
            config_toml.to_owned()
        } else {
            format!("data_dir = \"data\"\n{config_toml}")
        };
        std::fs::write(&config_path, &text)
            .unwrap_or_else(|err| panic!("write {}: {err}", config_path.display()));
        Agent {
            bin: bin.as_ref().to_owned(),
            log_path: dir.path().join("agent.log"),
            listen_ports: listen_ports(&text),
            config_path,
            dir,
            child: None,
            pid: 0,
        }
    }

    /// Starts an agent made with [`Agent::prepare`] and waits for its listeners.
    pub fn launch(&mut self) {
        assert!(
            self.child.is_none(),
            "launch: the agent (pid {}) was started already; use restart",
            self.pid
        );
        self.spawn();
    }

    /// Starts the agent again with the same config and data, after it stopped or was
    /// killed, and waits for its listeners.
    pub fn restart(&mut self) {
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(Some(_)) => {}
                other => panic!(
                    "restart: the agent (pid {}) has not exited ({other:?}); stop it first\nagent log tail:\n{}",
                    self.pid,
                    self.log_tail(30)
                ),
            }
        }
        self.child = None;
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|err| panic!("open {}: {err}", self.log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|err| panic!("clone the log file handle: {err}"));
        let mut command = Command::new(&self.bin);
        command
            .arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("start {command:?}: {err}"));
        self.pid = child.id();
        self.child = Some(child);
        let started = Instant::now();
        for &port in &self.listen_ports.clone() {
            loop {
                if port_accepts(port) {
                    break;
                }
                if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten())
                {
                    panic!(
                        "the agent exited with {status} before 127.0.0.1:{port} accepted connections\nconfig {}:\n{}\nagent log tail:\n{}",
                        self.config_path.display(),
                        std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                        self.log_tail(30)
                    );
                }
                if started.elapsed() > START_DEADLINE {
                    panic!(
                        "127.0.0.1:{port} did not accept connections within {START_DEADLINE:?} of starting the agent (pid {})\nagent log tail:\n{}",
                        self.pid,
                        self.log_tail(30)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The current (or last) agent process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The ports the config listens on, in config order.
    pub fn listen_ports(&self) -> &[u16] {
        &self.listen_ports
    }

    /// The first listen port.
    pub fn port(&self) -> u16 {
        *self
            .listen_ports
            .first()
            .unwrap_or_else(|| panic!("the agent's config has no listen address"))
    }

    /// Kills the agent with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        crate::process::kill9(self.child.as_mut(), "agent", self.pid);
    }

    /// Asks the agent to stop with SIGTERM (`kill -TERM <pid>`).
    #[cfg(unix)]
    pub fn terminate(&self) {
        crate::process::terminate(self.pid);
    }

    /// Waits for the agent to exit and returns its status; panics with the log tail after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let log_path = self.log_path.clone();
        crate::process::wait_exit(self.child.as_mut(), "agent", self.pid, timeout, move || {
            crate::process::log_tail(&log_path, 30)
        })
    }

    /// The whole log so far (all runs), without colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&self.raw_log())
    }

    /// The whole log so far, exactly as the agent wrote it.
    pub fn raw_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::process::log_tail(&self.log_path, n)
    }

    /// Waits until the log has a line containing every one of `parts`, and returns it.
    pub fn wait_for_log_line(&self, deadline: Duration, parts: &[&str]) -> String {
        crate::wait_until_explained(
            deadline,
            &format!("the agent log has a line containing all of {parts:?}"),
            || {
                self.log()
                    .lines()
                    .find(|line| parts.iter().all(|part| line.contains(part)))
                    .map(str::to_owned)
            },
            || format!("agent log tail:\n{}", self.log_tail(30)),
        )
    }

    /// The agent's data directory (`data` beside the config).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The agent's temporary folder (config, data, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the `outpost` binary with `args` as given (e.g. `["queue", "--config", …]`).
    pub fn run_cli(&self, args: &[&str]) -> Output {
        run(Command::new(&self.bin).args(args).env_remove("RUST_LOG"))
    }

    /// Runs `outpost queue --config <this config> <action…>`; panics unless it succeeds,
    /// and returns its stdout.
    pub fn queue(&self, action: &[&str]) -> String {
        let config = self.config_path.to_string_lossy().into_owned();
        let mut args = vec!["queue", "--config", config.as_str()];
        args.extend_from_slice(action);
        self.cli_ok(&args)
    }

    /// Runs `outpost hl7 search --config <this config> <args…>`; panics unless it
    /// succeeds, and returns its stdout.
    pub fn search(&self, args: &[&str]) -> String {
        let config = self.config_path.to_string_lossy().into_owned();
        let mut all = vec!["hl7", "search", "--config", config.as_str()];
        all.extend_from_slice(args);
        self.cli_ok(&all)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.run_cli(args);
        assert!(
            output.status.success(),
            "`outpost {}` failed\n{}\nagent log tail:\n{}",
            args.join(" "),
            describe_output(&output),
            self.log_tail(20)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `(pending, dead, delivered)` for `sink` from `outpost queue status` (zeros when the
    /// sink has no row yet), and the status text itself.
    pub fn sink_counts(&self, sink: &str) -> ((u64, u64, u64), String) {
        let status = self.queue(&["status"]);
        let counts = status
            .lines()
            .find_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                (cols.first() == Some(&sink) && cols.len() >= 5).then(|| {
                    let n = |i: usize| cols[i].parse::<u64>().unwrap_or(u64::MAX);
                    (n(1), n(3), n(4))
                })
            })
            .unwrap_or((0, 0, 0));
        (counts, status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent {} log tail ({}) ---\n{}\n---",
                self.pid,
                self.log_path.display(),
                self.log_tail(40)
            );
        }
    }
}

/// The ports of every `listen = "ip:port"` line.
fn listen_ports(config: &str) -> Vec<u16> {
    config
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            if key.trim() != "listen" {
                return None;
            }
            value
                .trim()
                .trim_matches('"')
                .rsplit_once(':')?
                .1
                .parse()
                .ok()
        })
        .collect()
}
