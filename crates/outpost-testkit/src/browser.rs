//! Headless Chromium driven over the DevTools protocol (a WebSocket on loopback): enough to
//! set a cookie, open a page, read its text as shown, and take a screenshot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::tail;

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The install command named when Chromium is missing.
const INSTALL: &str = "apt-get install -y chromium";

/// The Chromium binary: `$OUTPOST_CHROMIUM`, or the first of `chromium`,
/// `chromium-browser`, `google-chrome` found on PATH (or in /usr/bin).
pub fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("OUTPOST_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .collect();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// A headless Chromium with one page, killed when dropped.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    child: Child,
    dir: TempDir,
}

impl Browser {
    /// Starts Chromium (ignoring certificate errors, since the hub's CA is its own) with a
    /// 1280×800 window and opens a blank page. Panics, naming the install command, when
    /// Chromium is missing.
    pub fn start() -> Browser {
        let binary = chromium().unwrap_or_else(|| {
            panic!("no Chromium found (chromium, chromium-browser, google-chrome or $OUTPOST_CHROMIUM): install it with `{INSTALL}`")
        });
        let dir = tempfile::Builder::new()
            .prefix("outpost-chromium-")
            .tempdir()
            .unwrap_or_else(|err| panic!("create a profile folder for Chromium: {err}"));
        let profile = dir.path().join("profile");
        let log_path = dir.path().join("chromium.log");
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|err| panic!("create {}: {err}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|err| panic!("clone the log file handle: {err}"));
        let mut command = Command::new(&binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--ignore-certificate-errors",
                "--window-size=1280,800",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("start {command:?}: {err} (install it with `{INSTALL}`)"));
        // Chromium writes its DevTools port and path here once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let started = Instant::now();
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "Chromium ({}) exited with {status} before opening DevTools\nlog:\n{}",
                    binary.display(),
                    log_tail(&log_path)
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!(
                    "Chromium ({}) did not open DevTools within 30 s\nlog:\n{}",
                    binary.display(),
                    log_tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|err| panic!("tokio runtime: {err}"));
        let socket = runtime
            .block_on(tokio_tungstenite::connect_async(url.as_str()))
            .unwrap_or_else(|err| panic!("connect to Chromium's DevTools at {url}: {err}"))
            .0;
        let mut browser = Browser {
            runtime,
            socket,
            session: String::new(),
            next_id: 0,
            child,
            dir,
        };
        let target = browser.browser_command("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().unwrap_or_default().to_owned();
        let attached = browser.browser_command(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        browser.command("Page.enable", json!({}));
        browser.command("Network.enable", json!({}));
        browser
    }

    /// Sets a cookie for `url` (secure, HTTP-only) as a signed-in browser would hold it.
    pub fn set_cookie(&mut self, url: &str, name: &str, value: &str) {
        let result = self.command(
            "Network.setCookie",
            json!({"url": url, "name": name, "value": value, "secure": true, "httpOnly": true, "path": "/"}),
        );
        assert!(
            result["success"].as_bool().unwrap_or(true),
            "Chromium refused the cookie {name} for {url}: {result}"
        );
    }

    /// Opens `url` in the page (returns once navigation started; poll [`Browser::text`]).
    pub fn navigate(&mut self, url: &str) {
        let result = self.command("Page.navigate", json!({"url": url}));
        if let Some(error) = result.get("errorText").and_then(|e| e.as_str()) {
            panic!("Chromium could not open {url}: {error}");
        }
    }

    /// The page's address now (after redirects).
    pub fn location(&mut self) -> String {
        self.evaluate("location.href")
    }

    /// The page's visible text (`document.body.innerText`).
    pub fn text(&mut self) -> String {
        self.evaluate("document.body ? document.body.innerText : ''")
    }

    /// Evaluates `expression` in the page; its value as text.
    pub fn evaluate(&mut self, expression: &str) -> String {
        let result = self.command(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        match &result["result"]["value"] {
            Value::String(text) => text.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }

    /// Saves a PNG screenshot of the page to `path` (making its folder).
    pub fn screenshot(&mut self, path: &Path) {
        let result = self.command("Page.captureScreenshot", json!({"format": "png"}));
        let data = result["data"].as_str().unwrap_or_default();
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|err| panic!("Chromium's screenshot is not base64: {err}"));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|err| panic!("create {}: {err}", parent.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    }

    /// The last lines of Chromium's own output.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("chromium.log"))
    }

    fn browser_command(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// Runs a DevTools command in the page's session and returns its result.
    pub fn command(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(session))
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            request["sessionId"] = Value::String(session);
        }
        let socket = &mut self.socket;
        let outcome = self.runtime.block_on(async {
            socket
                .send(Message::Text(request.to_string().into()))
                .await
                .map_err(|err| format!("send: {err}"))?;
            let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
            loop {
                let frame = tokio::time::timeout_at(deadline, socket.next())
                    .await
                    .map_err(|_| format!("no answer within {COMMAND_TIMEOUT:?}"))?;
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => return Err(format!("DevTools connection: {err}")),
                    None => return Err("DevTools connection closed".to_owned()),
                };
                let answer: Value = serde_json::from_str(&text)
                    .map_err(|err| format!("DevTools sent non-JSON ({err}): {text}"))?;
                if answer["id"].as_u64() != Some(id) {
                    continue; // an event
                }
                if let Some(error) = answer.get("error") {
                    return Err(format!("error {error}"));
                }
                return Ok(answer["result"].clone());
            }
        });
        outcome.unwrap_or_else(|err| {
            panic!(
                "DevTools command {method} failed: {err}\nChromium log:\n{}",
                self.log_tail()
            )
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    tail(
        &String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()),
        20,
    )
}
