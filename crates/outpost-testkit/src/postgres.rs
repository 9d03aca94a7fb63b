//! A real PostgreSQL 15 for tests: the peer recipe (`peers/start-postgres.sh`,
//! `peers/stop-peer.sh`) run on 127.0.0.1 with its data under the cargo target dir
//! (`target/tmp/outpost-postgres`), and one fresh database per user ([`PgDatabase`]), dropped
//! `WITH (FORCE)` when that user is done.
//!
//! The server is shared by every test using it at the same time, in this process and in
//! others (two `cargo test` runs, the store tests and the hub end-to-end tests), and stopped
//! by the last one to finish; a later test starts it again, which takes a fraction of a
//! second. Across processes this is arranged with two `flock`s in the data dir:
//!
//! - `server.lock`, held exclusively while a process starts the server or decides to stop
//!   it, so those steps never interleave;
//! - `users.lock`, held shared by every process that has a database on the server. A process
//!   whose last database is gone stops the server only if it can then take `users.lock`
//!   exclusively, i.e. no other process is using it.
//!
//! The kernel drops both locks of a killed process. A server left running by a killed run is
//! reused, and its leftover `test_db_…` databases are dropped by the next process that finds
//! itself the only user.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use fs4::fs_std::FileExt;

use crate::{free_port, peers_dir};

/// Test databases are named `test_db_<16 hex digits>`.
const DB_PREFIX: &str = "test_db_";

/// This process's use of the server. Starting, counting and stopping all happen under this
/// one lock, so a test never finds a server that is on its way down.
static SERVER: Mutex<Shared> = Mutex::new(Shared {
    server: None,
    users: 0,
    users_lock: None,
});

struct Shared {
    server: Option<Server>,
    /// How many [`PgDatabase`]s of this process exist.
    users: usize,
    /// `users.lock`, held shared while `users > 0`.
    users_lock: Option<File>,
}

/// Whether PostgreSQL tests are skipped on purpose (`OUTPOST_PEERS=skip`); says so with a
/// `SKIPPED <test>` line written straight to stderr, so that the test harness (which captures
/// `eprintln!` of passing tests) shows it.
pub fn skip_postgres_tests(test: &str) -> bool {
    let skip = std::env::var("OUTPOST_PEERS").is_ok_and(|v| v == "skip");
    if skip {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: OUTPOST_PEERS=skip (it needs PostgreSQL 15, started by peers/start-postgres.sh)"
        );
    }
    skip
}

/// An empty database of its own on the shared server, dropped on drop.
pub struct PgDatabase {
    server: Server,
    name: String,
}

impl PgDatabase {
    /// Starts the server if no test is using it, and creates a database with a random name.
    pub fn create() -> PgDatabase {
        let server = Server::acquire();
        let name = format!("{DB_PREFIX}{:016x}", rand::random::<u64>());
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

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
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
        // A database with a logical replication slot cannot be dropped: drop its slots first.
        self.server.drop_slots(&self.name);
        // WITH (FORCE) ends the connections of a hub or pool that may still be closing.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(err) = self.server.try_psql("postgres", &sql) {
            eprintln!("could not drop test database {}: {err}", self.name);
        }
        Server::release();
    }
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase")
            .field("name", &self.name)
            .field("port", &self.server.port)
            .finish()
    }
}

#[derive(Clone)]
struct Server {
    data_dir: PathBuf,
    port: u16,
}

impl Server {
    /// The running server, started if no test (of any process) is using it.
    fn acquire() -> Server {
        let mut shared = SERVER.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(server) = &shared.server {
            let server = server.clone();
            shared.users += 1;
            return server;
        }
        let data_dir = data_dir();
        std::fs::create_dir_all(&data_dir)
            .unwrap_or_else(|err| panic!("create {}: {err}", data_dir.display()));
        let server_lock = lock_file(&data_dir, "server.lock");
        flock(&server_lock, "server.lock", FileExt::lock_exclusive);
        let users_lock = lock_file(&data_dir, "users.lock");
        // Alone: nobody else has a database there, so any test database is a leftover.
        let alone = FileExt::try_lock_exclusive(&users_lock).unwrap_or_else(|err| {
            panic!("flock {}/users.lock: {err}", data_dir.display());
        });
        let server = Server::start(data_dir);
        if alone {
            server.drop_leftover_databases();
        }
        // Converts our exclusive lock, if we had it, into a shared one.
        flock(&users_lock, "users.lock", FileExt::lock_shared);
        drop(server_lock);
        shared.server = Some(server.clone());
        shared.users = 1;
        shared.users_lock = Some(users_lock);
        server
    }

    /// Stops the server when the last test using it, in every process, is done.
    fn release() {
        let mut shared = SERVER.lock().unwrap_or_else(|p| p.into_inner());
        shared.users = shared.users.saturating_sub(1);
        if shared.users > 0 {
            return;
        }
        let (Some(server), Some(users_lock)) = (shared.server.take(), shared.users_lock.take())
        else {
            return;
        };
        let server_lock = lock_file(&server.data_dir, "server.lock");
        flock(&server_lock, "server.lock", FileExt::lock_exclusive);
        // Drops our shared lock and takes the exclusive one only if no other process holds
        // `users.lock`; under `server.lock` no process can start using the server meanwhile.
        if FileExt::try_lock_exclusive(&users_lock).unwrap_or(false) {
            server.stop();
        }
        drop(users_lock);
        drop(server_lock);
    }

    /// Runs the start script (which does nothing when the server already runs) and learns
    /// the port it listens on.
    fn start(data_dir: PathBuf) -> Server {
        let script = peers_dir().join("start-postgres.sh");
        let port = free_port();
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
                tail_file(&log, 20)
            );
        }
        // A server already running (left by an interrupted run, or started by another
        // process) is reused; postmaster.pid's fourth line is the port it listens on.
        let pid_file = data_dir.join("postgres/cluster/postmaster.pid");
        let port = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().nth(3).and_then(|l| l.trim().parse().ok()))
            .unwrap_or(port);
        Server { data_dir, port }
    }

    /// Drops the test databases of runs that were killed before they could.
    fn drop_leftover_databases(&self) {
        let listed = self.try_psql(
            "postgres",
            &format!("SELECT datname FROM pg_database WHERE datname LIKE '{DB_PREFIX}%'"),
        );
        for name in listed.unwrap_or_default().lines().map(str::trim) {
            if name.starts_with(DB_PREFIX) {
                self.drop_slots(name);
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                if let Err(err) = self.try_psql("postgres", &sql) {
                    eprintln!("could not drop leftover test database {name}: {err}");
                }
            }
        }
    }

    /// Drops the replication slots of database `name` (ending the sessions using them), so
    /// that the database can be dropped. `name` is one of our `test_db_…` names.
    fn drop_slots(&self, name: &str) {
        let sql = format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE database = '{name}' AND active_pid IS NOT NULL; \
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE database = '{name}' AND NOT active; \
             SELECT count(*) FROM pg_replication_slots WHERE database = '{name}'"
        );
        // A terminated session lets go of its slot a moment later: try again until none is left.
        for _ in 0..50 {
            match self.try_psql("postgres", &sql) {
                Ok(out) if out.lines().last().map(str::trim) == Some("0") => return,
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                Err(err) => {
                    eprintln!("could not drop the replication slots of {name}: {err}");
                    return;
                }
            }
        }
        eprintln!("replication slots of {name} were still in use after 5 s");
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
        tail_file(&self.data_dir.join("postgres/postgres.log"), lines)
    }

    /// Stops only the postmaster whose PID the start script recorded.
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

/// `<target dir>/tmp/outpost-postgres`, the target dir being the one holding the running
/// test binary (`<target>/<profile>/deps/<test>-<hash>`), so that every test binary of the
/// workspace shares one server.
fn data_dir() -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|dir| dir.file_name().is_some_and(|name| name == "deps"))
                .and_then(|deps| deps.parent()?.parent())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    target.join("tmp").join("outpost-postgres")
}

fn lock_file(dir: &Path, name: &str) -> File {
    let path = dir.join(name);
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|err| panic!("open {}: {err}", path.display()))
}

fn flock(file: &File, name: &str, lock: fn(&File) -> std::io::Result<()>) {
    lock(file).unwrap_or_else(|err| panic!("flock {name}: {err}"));
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

fn tail_file(path: &Path, lines: usize) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| format!("({}: {err})", path.display()));
    crate::tail(&text, lines)
}
