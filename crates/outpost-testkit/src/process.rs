//! Stopping and waiting for the `outpost` processes the helpers start (agent and hub alike).

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use std::path::Path;

use crate::{describe_output, run, strip_ansi, tail};

/// Kills `what` with SIGKILL (no chance to clean up) and reaps it.
pub(crate) fn kill9(child: Option<&mut Child>, what: &str, pid: u32) {
    if let Some(child) = child {
        child
            .kill()
            .unwrap_or_else(|err| panic!("SIGKILL the {what} (pid {pid}): {err}"));
        let _ = child.wait();
    }
}

/// Asks a process to stop with SIGTERM (`kill -TERM <pid>`).
#[cfg(unix)]
pub(crate) fn terminate(pid: u32) {
    let output = run(Command::new("kill").arg("-TERM").arg(pid.to_string()));
    assert!(
        output.status.success(),
        "kill -TERM {pid} failed\n{}",
        describe_output(&output)
    );
}

/// Waits for `what` to exit; panics with `log_tail()` after `timeout`.
pub(crate) fn wait_exit(
    child: Option<&mut Child>,
    what: &str,
    pid: u32,
    timeout: Duration,
    log_tail: impl FnOnce() -> String,
) -> ExitStatus {
    let Some(child) = child else {
        panic!("wait_exit: the {what} was never started");
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => panic!(
                "the {what} (pid {pid}) did not exit within {timeout:?}\n{what} log tail:\n{}",
                log_tail()
            ),
            Err(err) => panic!("wait for the {what} (pid {pid}): {err}"),
        }
    }
}

/// The last `n` lines of a process's log file, without colour codes.
pub(crate) fn log_tail(log_path: &Path, n: usize) -> String {
    let raw = std::fs::read(log_path).unwrap_or_default();
    tail(&strip_ansi(&String::from_utf8_lossy(&raw)), n)
}
