//! A real PostgreSQL 15 for the store tests: our copy of the peer recipe
//! (`peers/start-postgres.sh`, `peers/stop-peer.sh`) run on 127.0.0.1 with its data under the
//! cargo target dir, and one fresh database per test, dropped when the test ends.
//!
//! The server is shared by the tests that run at the same time and stopped by the last one
//! to finish (a later test starts it again, which takes a fraction of a second).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use outpost_testkit::peers_dir;

/// The server and how many test databases use it. Starting, counting and stopping all happen
/// under this one lock, so a test never finds a server that is on its way down.
static SERVER: Mutex<Shared> = Mutex::new(Shared {
    server: None,
    users: 0,
});

struct Shared {
    server: Option<Server>,
    users: usize,
}

/// Whether peer tests are skipped on purpose (`OUTPOST_PEERS=skip`); says so on stderr.
pub fn skip_peer_tests(test: &str) -> bool {
    let skip = std::env::var("OUTPOST_PEERS").is_ok_and(|v| v == "skip");
    if skip {
        eprintln!("SKIPPED {test}: OUTPOST_PEERS=skip (it needs PostgreSQL 15, started by peers/start-postgres.sh)");
    }
    skip
}

/// An empty database of its own on the shared server, dropped on drop.
pub struct PgDatabase {
    server: Server,
    name: String,
}

impl PgDatabase {
    /// Starts the server if no other test has, and creates a database with a random name.
    pub fn create() -> PgDatabase {
        let server = Server::acquire();
        let name = format!("hub_test_{:016x}", rand::random::<u64>());
        // Made before CREATE DATABASE, so that a failure still releases the server on drop.
        let db = PgDatabase { server, name };
        db.server
            .psql("postgres", &format!("CREATE DATABASE \"{}\"", db.name));
        db
    }

    /// The connection URL (trust auth: the password is there to exercise redaction only).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:not-checked-pw@127.0.0.1:{}/{}",
            self.server.port, self.name
        )
    }

    /// Runs SQL with psql in this database; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        self.server.psql(&self.name, sql)
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // WITH (FORCE) ends the pool's connections, which may still be closing.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(err) = self.server.try_psql("postgres", &sql) {
            eprintln!("could not drop test database {}: {err}", self.name);
        }
        Server::release();
    }
}

#[derive(Clone)]
struct Server {
    data_dir: PathBuf,
    port: u16,
}

impl Server {
    /// The running server, started if no test is using it.
    fn acquire() -> Server {
        let mut shared = SERVER.lock().unwrap_or_else(|p| p.into_inner());
        let server = match &shared.server {
            Some(server) => server.clone(),
            None => Server::start(),
        };
        shared.server = Some(server.clone());
        shared.users += 1;
        server
    }

    /// Stops the server when the last test using it is done.
    fn release() {
        let mut shared = SERVER.lock().unwrap_or_else(|p| p.into_inner());
        shared.users = shared.users.saturating_sub(1);
        if shared.users == 0 {
            if let Some(server) = shared.server.take() {
                server.stop();
            }
        }
    }

    fn start() -> Server {
        let data_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("peers-hub-store");
        let script = peers_dir().join("start-postgres.sh");
        let port = outpost_testkit::free_port();
        let out = Command::new("bash")
            .arg(&script)
            .arg(&data_dir)
            .env("PG_PORT", port.to_string())
            .output()
            .unwrap_or_else(|err| panic!("running {}: {err}", script.display()));
        let log = data_dir.join("postgres/postgres.log");
        if !out.status.success() {
            panic!(
                "PostgreSQL 15 did not start: {} {} exited with {}.\n\
                 It needs root (it runs the server as the `postgres` user) and the apt package \
                 `postgresql` (postgresql-15); install it with `apt-get install -y postgresql`, \
                 or set OUTPOST_PEERS=skip to skip peer tests.\n{}\nserver log tail:\n{}",
                script.display(),
                data_dir.display(),
                out.status,
                output_text(&out),
                tail(&log, 20)
            );
        }
        // A server left running by an interrupted run is reused; postmaster.pid's fourth line
        // is the port it actually listens on.
        let pid_file = data_dir.join("postgres/cluster/postmaster.pid");
        let port = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().nth(3).and_then(|l| l.trim().parse().ok()))
            .unwrap_or(port);
        Server { data_dir, port }
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql).unwrap_or_else(|err| {
            panic!(
                "psql on 127.0.0.1:{} failed: {err}\nserver log tail:\n{}",
                self.port,
                self.log_tail(20)
            )
        })
    }

    fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-Atqc",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .map_err(|err| format!("running psql: {err}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "`{sql}` exited with {}: {}",
                out.status,
                output_text(&out)
            ))
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        tail(&self.data_dir.join("postgres/postgres.log"), lines)
    }

    /// Stops only the postmaster whose PID our start script recorded.
    fn stop(&self) {
        let script = peers_dir().join("stop-peer.sh");
        let stopped = Command::new("bash")
            .arg(&script)
            .arg("postgres")
            .arg(&self.data_dir)
            .output();
        match stopped {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("{} postgres: {}", script.display(), output_text(&out)),
            Err(err) => eprintln!("running {}: {err}", script.display()),
        }
    }
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

fn tail(path: &Path, lines: usize) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| format!("({}: {err})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
