//! The Python reference peers: python-hl7's MLLP server and its `mllp_send` sender.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{describe_output, peers_dir, port_accepts, run, tail};

/// The install command named when python-hl7 is missing.
const INSTALL: &str = "python3 -m pip install hl7 hl7apy";

/// The Python interpreter: `$OUTPOST_PYTHON`, or `python3`.
pub fn python() -> String {
    std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Whether peer tests are skipped on purpose (`OUTPOST_PEERS=skip`); says so on stderr.
/// Tests that need a Python peer start with `if skip_peer_tests("name") { return; }`.
pub fn skip_peer_tests(test: &str) -> bool {
    let skip = std::env::var("OUTPOST_PEERS").is_ok_and(|v| v == "skip");
    if skip {
        eprintln!("SKIPPED {test}: OUTPOST_PEERS=skip (it needs the Python MLLP peers)");
    }
    skip
}

/// Panics, naming the install command, unless the Python interpreter can import `hl7`.
pub fn require_python_hl7() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        let python = python();
        match Command::new(&python).args(["-c", "import hl7, hl7.mllp, hl7.client"]).output() {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "`{python} -c 'import hl7'` failed: python-hl7 is missing. Install it with `{INSTALL}` \
                 (or set OUTPOST_PYTHON, or OUTPOST_PEERS=skip to skip peer tests)\n{}",
                describe_output(&output)
            )),
            Err(err) => Err(format!(
                "cannot run `{python}` ({err}): the Python peers need python3 with `{INSTALL}` \
                 (or set OUTPOST_PYTHON, or OUTPOST_PEERS=skip to skip peer tests)"
            )),
        }
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// `peers/pyhl7_mllp_server.py` on 127.0.0.1:`port`, a persistent-connection MLLP server
/// that answers each message with python-hl7's `create_ack("AA")` and appends it to
/// `received.hl7` in its own temporary folder. Dropping it kills it.
pub struct PyHl7Server {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl PyHl7Server {
    /// Starts the server and waits until its port accepts connections.
    pub fn start(port: u16) -> PyHl7Server {
        require_python_hl7();
        let (dir, child) = spawn_peer(
            "pyhl7_mllp_server.py",
            port,
            &format!("the peer needs `{INSTALL}`"),
        );
        PyHl7Server {
            port,
            dir,
            child: Some(child),
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The file it appends received messages to.
    pub fn received_path(&self) -> PathBuf {
        self.dir.path().join("received.hl7")
    }

    /// Every message received so far, byte for byte, in arrival order (a message still
    /// being written is left out).
    pub fn received(&self) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(self.received_path()).unwrap_or_default();
        split_received(&bytes)
    }

    /// The MSH-10 of every message received so far, in arrival order.
    pub fn received_control_ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|raw| {
                outpost_hl7::Message::parse(raw)
                    .ok()
                    .and_then(|m| m.control_id())
                    .unwrap_or_else(|| format!("<unparsable: {}>", String::from_utf8_lossy(raw)))
            })
            .collect()
    }

    /// Stops the server (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
}

impl Drop for PyHl7Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- python-hl7 server on 127.0.0.1:{} log tail ---\n{}\n---",
                self.port,
                self.log_tail(20)
            );
        }
    }
}

/// Splits `received.hl7`: each message is followed by the separator 0x1C 0x0A.
fn split_received(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.windows(2).position(|w| w == [0x1c, b'\n']) {
        messages.push(rest[..end].to_vec());
        rest = &rest[end + 2..];
    }
    messages
}

/// Runs python-hl7's `mllp_send --loose -p <port> -f <file> 127.0.0.1` (or `python3 -m
/// hl7.client …` when the console script is not on PATH) and returns its output: one
/// framed ACK per message on stdout, each followed by a newline. Panics if it fails.
pub fn mllp_send(port: u16, file: &Path) -> Output {
    require_python_hl7();
    let args = [
        "--loose".to_owned(),
        "-p".to_owned(),
        port.to_string(),
        "-f".to_owned(),
        file.to_string_lossy().into_owned(),
        "127.0.0.1".to_owned(),
    ];
    // The console script when it is on PATH and no interpreter was chosen; otherwise the
    // chosen interpreter's module, which is the same tool.
    let script = match std::env::var("OUTPOST_PYTHON") {
        Ok(_) => None,
        Err(_) => Command::new("mllp_send").args(&args).output().ok(),
    };
    let (output, program) = match script {
        Some(output) => (output, "mllp_send".to_owned()),
        None => {
            let python = python();
            let output = run(Command::new(&python).args(["-m", "hl7.client"]).args(&args));
            (output, format!("{python} -m hl7.client"))
        }
    };
    assert!(
        output.status.success(),
        "`{program} {}` failed\n{}",
        args.join(" "),
        describe_output(&output)
    );
    output
}

/// Starts `peers/<script> <port> <dir>` with its output in `<dir>/server.log`, and waits
/// (up to 20 s) until 127.0.0.1:`port` accepts connections. `hint` is added when the
/// interpreter cannot start at all.
pub(crate) fn spawn_peer(script: &str, port: u16, hint: &str) -> (TempDir, Child) {
    let dir = tempfile::Builder::new()
        .prefix("outpost-peer-")
        .tempdir()
        .unwrap_or_else(|err| panic!("create a temporary folder for {script}: {err}"));
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path)
        .unwrap_or_else(|err| panic!("create {}: {err}", log_path.display()));
    let log_err = log
        .try_clone()
        .unwrap_or_else(|err| panic!("clone the log file handle: {err}"));
    let mut command = Command::new(python());
    command
        .arg(peers_dir().join(script))
        .arg(port.to_string())
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("start {command:?}: {err} ({hint})"));
    let log_tail = || {
        tail(
            &String::from_utf8_lossy(&std::fs::read(&log_path).unwrap_or_default()),
            30,
        )
    };
    let started = Instant::now();
    while !port_accepts(port) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{command:?} exited with {status} before listening on 127.0.0.1:{port}\nlog:\n{}",
                log_tail()
            );
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!(
                "{command:?} did not listen on 127.0.0.1:{port} within 20 s\nlog:\n{}",
                log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (dir, child)
}

#[cfg(test)]
mod tests {
    use super::split_received;

    #[test]
    fn received_file_is_split_on_its_separator_and_an_unfinished_tail_is_left_out() {
        let file = b"MSH|a\rPID|1\x1c\nMSH|b\x1c\nMSH|c";
        assert_eq!(
            split_received(file),
            vec![b"MSH|a\rPID|1".to_vec(), b"MSH|b".to_vec()]
        );
    }
}
