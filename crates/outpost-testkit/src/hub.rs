//! The hub as a child process (`outpost hub --config …`), and a small client for its data
//! API that pins the hub's own CA.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::postgres::PgDatabase;
use crate::{describe_output, free_port, port_accepts, run, strip_ansi};

/// How long a hub gets to make its CA, open its store and listen.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Where a [`Hub`] keeps its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubBackend {
    /// The default: SQLite in the hub's `data` folder.
    Sqlite,
    /// A fresh database of its own on the shared test PostgreSQL 15 (see [`PgDatabase`]),
    /// kept across restarts and dropped with the hub.
    Postgres,
}

impl HubBackend {
    /// `"sqlite"` or `"postgres"`.
    pub fn name(self) -> &'static str {
        match self {
            HubBackend::Sqlite => "sqlite",
            HubBackend::Postgres => "postgres",
        }
    }
}

/// A running `outpost hub` with its own temporary folder holding `hub.toml`, the `data`
/// folder (store, `tls/ca.pem`) and `hub.log` (stdout and stderr, kept across restarts).
/// It listens on a free loopback port with `heartbeat_secs = 1`. With
/// [`HubBackend::Postgres`] its store is a database of its own (`database = "postgres://…"`).
/// Dropping it kills it (and prints the log tail if the test is failing), then drops its
/// database.
pub struct Hub {
    bin: PathBuf,
    backend: HubBackend,
    /// Dropped after the hub process is killed (`Drop` runs before the fields drop).
    database: Option<PgDatabase>,
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    port: u16,
    heartbeat: Duration,
    child: Option<Child>,
    pid: u32,
}

impl Hub {
    /// Starts a hub on SQLite with a heartbeat of one second.
    pub fn start(bin: impl AsRef<Path>) -> Hub {
        Hub::start_on_with(bin, HubBackend::Sqlite, "")
    }

    /// Starts a hub on SQLite with `extra_toml` added to its config (e.g. `webhook_url = …`).
    pub fn start_with(bin: impl AsRef<Path>, extra_toml: &str) -> Hub {
        Hub::start_on_with(bin, HubBackend::Sqlite, extra_toml)
    }

    /// Starts a hub with a heartbeat of one second, storing its data in `backend`.
    pub fn start_on(bin: impl AsRef<Path>, backend: HubBackend) -> Hub {
        Hub::start_on_with(bin, backend, "")
    }

    /// Starts a hub storing its data in `backend`, with `extra_toml` added to its config.
    pub fn start_on_with(bin: impl AsRef<Path>, backend: HubBackend, extra_toml: &str) -> Hub {
        let database = match backend {
            HubBackend::Sqlite => None,
            HubBackend::Postgres => Some(PgDatabase::create()),
        };
        let database_line = database
            .as_ref()
            .map(|db| format!("database = \"{}\"\n", db.url()))
            .unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix("outpost-hub-")
            .tempdir()
            .unwrap_or_else(|err| panic!("create a temporary folder for the hub: {err}"));
        let port = free_port();
        let config_path = dir.path().join("hub.toml");
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\nheartbeat_secs = 1\n{database_line}{extra_toml}\n"
        );
        std::fs::write(&config_path, &text)
            .unwrap_or_else(|err| panic!("write {}: {err}", config_path.display()));
        let mut hub = Hub {
            bin: bin.as_ref().to_owned(),
            backend,
            database,
            log_path: dir.path().join("hub.log"),
            config_path,
            dir,
            port,
            heartbeat: Duration::from_secs(1),
            child: None,
            pid: 0,
        };
        hub.spawn();
        if let Some(db) = &hub.database {
            // The hub opens its store before it listens: its tables must be there by now,
            // or the test would silently be running on something else.
            let tables = db.psql(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            );
            assert!(
                tables.parse::<u32>().is_ok_and(|n| n > 0),
                "the hub listens but database {} has {tables:?} tables: is it using PostgreSQL?\nhub log tail:\n{}",
                db.name(),
                hub.log_tail(30)
            );
        }
        hub
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
            .arg("hub")
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
        while !port_accepts(self.port) {
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "the hub exited with {status} before 127.0.0.1:{} accepted connections\nhub log tail:\n{}",
                    self.port,
                    self.log_tail(30)
                );
            }
            if started.elapsed() > START_DEADLINE {
                panic!(
                    "127.0.0.1:{} did not accept connections within {START_DEADLINE:?} of starting the hub (pid {})\nhub log tail:\n{}",
                    self.port,
                    self.pid,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the hub again with the same config, port and data after it stopped or was
    /// killed, and waits until it listens.
    pub fn restart(&mut self) {
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(Some(_)) => {}
                other => panic!(
                    "restart: the hub (pid {}) has not exited ({other:?}); stop it first\nhub log tail:\n{}",
                    self.pid,
                    self.log_tail(30)
                ),
            }
        }
        self.child = None;
        self.spawn();
    }

    /// Kills the hub with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        crate::process::kill9(self.child.as_mut(), "hub", self.pid);
    }

    /// Asks the hub to stop with SIGTERM.
    #[cfg(unix)]
    pub fn terminate(&self) {
        crate::process::terminate(self.pid);
    }

    /// Waits for the hub to exit; panics with the log tail after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let log_path = self.log_path.clone();
        crate::process::wait_exit(self.child.as_mut(), "hub", self.pid, timeout, move || {
            crate::process::log_tail(&log_path, 30)
        })
    }

    /// Where it stores its data.
    pub fn backend(&self) -> HubBackend {
        self.backend
    }

    /// Its PostgreSQL database ([`HubBackend::Postgres`] only).
    pub fn database(&self) -> Option<&PgDatabase> {
        self.database.as_ref()
    }

    /// The current (or last) hub process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The heartbeat period agents are told to use.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// The hub's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The CA the hub made on first start (agents pin it).
    pub fn ca_path(&self) -> PathBuf {
        self.data_dir().join("tls").join("ca.pem")
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The hub's temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `outpost hub --config <this config> <args…>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(&self.bin)
            .arg("hub")
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env_remove("RUST_LOG"))
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "`outpost hub --config {} {}` failed\n{}\nhub log tail:\n{}",
            self.config_path.display(),
            args.join(" "),
            describe_output(&output),
            self.log_tail(20)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `outpost hub token create --name <name> --expires <expires>`: the one-time token.
    pub fn token(&self, name: &str, expires: &str) -> String {
        let token = self
            .cli_ok(&["token", "create", "--name", name, "--expires", expires])
            .trim()
            .to_owned();
        assert!(
            token.starts_with("opt_"),
            "`token create` printed {token:?}, expected a token starting with opt_"
        );
        token
    }

    /// `outpost hub apikey create --name <name>`: the API key.
    pub fn apikey(&self, name: &str) -> String {
        let key = self
            .cli_ok(&["apikey", "create", "--name", name])
            .trim()
            .to_owned();
        assert!(
            key.starts_with("opk_"),
            "`apikey create` printed {key:?}, expected a key starting with opk_"
        );
        key
    }

    /// `outpost hub staff add <name> --role <role>`: the staff member's token.
    pub fn staff(&self, name: &str, role: &str) -> String {
        let token = self
            .cli_ok(&["staff", "add", name, "--role", role])
            .trim()
            .to_owned();
        assert!(
            token.starts_with("ops_"),
            "`staff add` printed {token:?}, expected a token starting with ops_"
        );
        token
    }

    /// `outpost job …` against this hub as the staff member with `token`, e.g.
    /// `["run", "--agent", id, "health"]`.
    pub fn job_cli(&self, token: &str, args: &[&str]) -> Output {
        let mut command = Command::new(&self.bin);
        command
            .arg("job")
            .args(args)
            .env("OUTPOST_HUB", self.url())
            .env("OUTPOST_STAFF_TOKEN", token)
            .env("OUTPOST_HUB_CA", self.ca_path());
        command
            .output()
            .unwrap_or_else(|err| panic!("running outpost job: {err}"))
    }

    /// `outpost hub agent revoke <id>`; panics unless it succeeds. Returns its stdout.
    pub fn revoke(&self, agent_id: &str) -> String {
        self.cli_ok(&["agent", "revoke", agent_id])
    }

    /// The whole log so far (all runs), without colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &std::fs::read(&self.log_path).unwrap_or_default(),
        ))
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::process::log_tail(&self.log_path, n)
    }

    /// Waits until the log has a line containing every one of `parts`, and returns it.
    pub fn wait_for_log_line(&self, deadline: Duration, parts: &[&str]) -> String {
        crate::wait_until_explained(
            deadline,
            &format!("the hub log has a line containing all of {parts:?}"),
            || {
                self.log()
                    .lines()
                    .find(|line| parts.iter().all(|part| line.contains(part)))
                    .map(str::to_owned)
            },
            || format!("hub log tail:\n{}", self.log_tail(30)),
        )
    }

    /// A data API client pinned to this hub's CA, sending `key` as a bearer token.
    pub fn api(&self, key: Option<&str>) -> HubApi {
        HubApi::new(&self.url(), &self.ca_path(), key)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- hub {} ({}) log tail ({}) ---\n{}\n---",
                self.pid,
                self.backend.name(),
                self.log_path.display(),
                self.log_tail(40)
            );
            if let Some(db) = &self.database {
                eprintln!(
                    "--- PostgreSQL log tail ({}) ---\n{}\n---",
                    db.name(),
                    db.log_tail(20)
                );
            }
        }
    }
}

/// An HTTP answer: status, content type and body (parsed as JSON when it is JSON).
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: String,
    /// The body as text.
    pub text: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub json: serde_json::Value,
}

impl ApiResponse {
    /// `json[key]` as a string, or "".
    pub fn str(&self, key: &str) -> &str {
        self.json.get(key).and_then(|v| v.as_str()).unwrap_or("")
    }
}

/// A blocking client for the hub's HTTPS API (it runs its own small runtime), trusting
/// only the hub's CA.
pub struct HubApi {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl HubApi {
    /// A client for `base` (`https://127.0.0.1:port`) pinned to the CA in `ca_pem`.
    pub fn new(base: &str, ca_pem: &Path, key: Option<&str>) -> HubApi {
        let pem = std::fs::read(ca_pem)
            .unwrap_or_else(|err| panic!("read the hub CA {}: {err}", ca_pem.display()));
        let ca = reqwest::Certificate::from_pem(&pem)
            .unwrap_or_else(|err| panic!("parse the hub CA {}: {err}", ca_pem.display()));
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|err| panic!("build an HTTPS client: {err}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|err| panic!("tokio runtime: {err}"));
        HubApi {
            runtime,
            client,
            base: base.trim_end_matches('/').to_owned(),
            key: key.map(str::to_owned),
        }
    }

    /// The same client with another key (or none).
    pub fn with_key(&self, key: Option<&str>) -> HubApi {
        HubApi {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|err| panic!("tokio runtime: {err}")),
            client: self.client.clone(),
            base: self.base.clone(),
            key: key.map(str::to_owned),
        }
    }

    /// `GET <path>`; `Err` when the request could not be made (hub down).
    pub fn try_get(&self, path: &str) -> Result<ApiResponse, String> {
        self.send(self.client.get(format!("{}{path}", self.base)))
    }

    /// `GET <path>`; panics when the request could not be made.
    pub fn get(&self, path: &str) -> ApiResponse {
        self.try_get(path)
            .unwrap_or_else(|err| panic!("GET {}{path}: {err}", self.base))
    }

    /// `GET <path>` for a binary body; panics unless it answers 200.
    pub fn get_bytes(&self, path: &str) -> Vec<u8> {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        self.runtime.block_on(async {
            let response = request
                .send()
                .await
                .unwrap_or_else(|err| panic!("GET {}{path}: {err}", self.base));
            let status = response.status();
            let body = response
                .bytes()
                .await
                .unwrap_or_else(|err| panic!("GET {}{path}: reading the body: {err}", self.base));
            assert!(
                status.is_success(),
                "GET {}{path}: {status}: {}",
                self.base,
                String::from_utf8_lossy(&body)
            );
            body.to_vec()
        })
    }

    /// `POST <path>` with a JSON body.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> ApiResponse {
        self.send(self.client.post(format!("{}{path}", self.base)).json(body))
            .unwrap_or_else(|err| panic!("POST {}{path}: {err}", self.base))
    }

    /// `POST <path>` with a raw body and content type.
    pub fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> ApiResponse {
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body),
        )
        .unwrap_or_else(|err| panic!("POST {}{path}: {err}", self.base))
    }

    fn send(&self, request: reqwest::RequestBuilder) -> Result<ApiResponse, String> {
        let request = match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        self.runtime.block_on(async {
            let response = request.send().await.map_err(|err| describe_error(&err))?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let text = response.text().await.map_err(|err| describe_error(&err))?;
            let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            Ok(ApiResponse {
                status,
                content_type,
                text,
                json,
            })
        })
    }

    /// Every message in the stream (`GET /api/v1/messages` page by page from cursor 0,
    /// with payloads), or why not.
    pub fn all_messages(&self) -> Result<Vec<serde_json::Value>, String> {
        let mut all = Vec::new();
        let mut after = 0i64;
        loop {
            let page = self.try_get(&format!(
                "/api/v1/messages?after={after}&limit=1000&payload=true"
            ))?;
            if page.status != 200 {
                return Err(format!("status {}: {}", page.status, page.text));
            }
            let messages = page
                .json
                .get("messages")
                .and_then(|m| m.as_array())
                .cloned()
                .unwrap_or_default();
            if messages.is_empty() {
                return Ok(all);
            }
            after = page
                .json
                .get("next_cursor")
                .and_then(|c| c.as_i64())
                .ok_or_else(|| format!("page without next_cursor: {}", page.text))?;
            all.extend(messages);
        }
    }
}

fn describe_error(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// The agent id an enrolled agent keeps in `<data_dir>/agent.json`.
pub fn enrolled_agent_id(data_dir: &Path) -> String {
    let path = data_dir.join("agent.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    let record: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}\n{text}", path.display()));
    record
        .get("agent_id")
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("{} has no agent_id: {text}", path.display()))
        .to_owned()
}

/// An agent config that enrolls with `hub` on its first start (`[hub]` with the URL, the
/// one-time `token` and the hub's CA), with an MLLP source `lab-in` on 127.0.0.1:`listen`
/// routed to a hub sink `vendor`. `extra_toml` is appended (more sinks, say).
pub fn agent_config_for_hub(hub: &Hub, token: &str, listen: u16, extra_toml: &str) -> String {
    format!(
        "[hub]\nurl = \"{url}\"\ntoken = \"{token}\"\nca_file = {ca:?}\n\n{body}\n{extra_toml}\n",
        url = hub.url(),
        ca = hub.ca_path().display().to_string(),
        body = hub_sink_config(listen)
    )
}

/// An MLLP source `lab-in` on 127.0.0.1:`listen` routed to a hub sink `vendor` (no `[hub]`
/// table: for agents enrolled with `outpost agent enroll`).
pub fn hub_sink_config(listen: u16) -> String {
    format!(
        "[[source]]\nname = \"lab-in\"\nkind = \"mllp\"\nlisten = \"127.0.0.1:{listen}\"\n\n\
         [[sink]]\nname = \"vendor\"\nkind = \"hub\"\n\n\
         [[route]]\nfrom = \"lab-in\"\nto = [\"vendor\"]\n"
    )
}
