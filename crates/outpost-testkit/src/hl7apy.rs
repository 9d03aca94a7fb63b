//! hl7apy's MLLP server (`peers/hl7apy_mllp_server.py`) as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;

use tempfile::TempDir;

use crate::{describe_output, python, tail};

/// `peers/hl7apy_mllp_server.py` on 127.0.0.1:`port`: built on `hl7apy.mllp.MLLPServer`, it
/// answers ORU^R01 with AA (and appends the message to `received.hl7`, segments on their
/// own lines) and anything else with AR. Dropping it kills it.
pub struct Hl7apyServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

/// Panics, naming the install command, unless the Python interpreter can import hl7apy.
pub fn require_hl7apy() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        let python = python();
        match Command::new(&python)
            .args(["-c", "import hl7apy.mllp"])
            .output()
        {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "`{python} -c 'import hl7apy.mllp'` failed: hl7apy is missing. Install it with \
                 `python3 -m pip install hl7apy` (or OUTPOST_PEERS=skip to skip peer tests)\n{}",
                describe_output(&output)
            )),
            Err(err) => Err(format!(
                "cannot run `{python}` ({err}): the hl7apy peer needs python3 with hl7apy"
            )),
        }
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

impl Hl7apyServer {
    /// Starts the server and waits until its port accepts connections.
    pub fn start(port: u16) -> Hl7apyServer {
        require_hl7apy();
        let (dir, child) = crate::python::spawn_peer(
            "hl7apy_mllp_server.py",
            port,
            "the peer needs `python3 -m pip install hl7apy`",
        );
        Hl7apyServer {
            port,
            dir,
            child: Some(child),
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The file it appends received ORU^R01 messages to.
    pub fn received_path(&self) -> PathBuf {
        self.dir.path().join("received.hl7")
    }

    /// Every ORU^R01 received so far, in arrival order, with CR segment ends (the server
    /// writes each segment on its own line).
    pub fn received(&self) -> Vec<Vec<u8>> {
        let text = std::fs::read_to_string(self.received_path()).unwrap_or_default();
        let mut messages: Vec<String> = Vec::new();
        for line in text.lines() {
            if line.starts_with("MSH") || messages.is_empty() {
                messages.push(String::new());
            }
            if line.is_empty() {
                continue;
            }
            if let Some(current) = messages.last_mut() {
                if !current.is_empty() {
                    current.push('\r');
                }
                current.push_str(line);
            }
        }
        messages
            .into_iter()
            .filter(|m| !m.is_empty())
            .map(String::into_bytes)
            .collect()
    }

    /// The last `n` lines of its stdout and stderr.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read(self.dir.path().join("server.log")).unwrap_or_default();
        tail(&String::from_utf8_lossy(&log), n)
    }

    /// Its temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Hl7apyServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- hl7apy server on 127.0.0.1:{} log tail ---\n{}\n---",
                self.port,
                self.log_tail(20)
            );
        }
    }
}
