//! A real MariaDB 10.11 for tests: the peer recipe (`peers/start-mariadb.sh`,
//! `peers/stop-peer.sh`) run on 127.0.0.1 with its data under the cargo target dir
//! (`target/tmp/outpost-mariadb`), binlog in ROW format with full row images, and one fresh
//! database per user ([`MariaDb`]) with a user of its own holding only the grants change
//! capture needs (`SELECT` on the database, `REPLICATION SLAVE` and `REPLICATION CLIENT`).
//!
//! Shared exactly like the PostgreSQL server of `postgres.rs`: by every test using it at the
//! same time, in this process and in others, and stopped by the last one to finish. Across
//! processes this is arranged with two `flock`s in the data dir:
//!
//! - `server.lock`, held exclusively while a process starts the server or decides to stop
//!   it, so those steps never interleave;
//! - `users.lock`, held shared by every process that has a database on the server. A process
//!   whose last database is gone stops the server only if it can then take `users.lock`
//!   exclusively, i.e. no other process is using it.
//!
//! A server left running by a killed run is reused (its port is in `mariadb/port`), and its
//! leftover `test_db_…` databases and `test_u_…` users are dropped by the next process that
//! finds itself the only user.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use fs4::fs_std::FileExt;

use crate::{free_port, peers_dir};

/// Test databases are named `test_db_<16 hex digits>`, their users `test_u_<same digits>`.
const DB_PREFIX: &str = "test_db_";
const USER_PREFIX: &str = "test_u_";

/// This process's use of the server (see `postgres.rs`: the same scheme).
static SERVER: Mutex<Shared> = Mutex::new(Shared {
    server: None,
    users: 0,
    users_lock: None,
});

struct Shared {
    server: Option<Server>,
    /// How many [`MariaDb`]s of this process exist.
    users: usize,
    /// `users.lock`, held shared while `users > 0`.
    users_lock: Option<File>,
}

/// Whether MariaDB tests are skipped on purpose (`OUTPOST_PEERS=skip`); says so with a
/// `SKIPPED <test>` line written straight to stderr.
pub fn skip_mariadb_tests(test: &str) -> bool {
    let skip = std::env::var("OUTPOST_PEERS").is_ok_and(|v| v == "skip");
    if skip {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: OUTPOST_PEERS=skip (it needs MariaDB 10.11, started by peers/start-mariadb.sh)"
        );
    }
    skip
}

/// An empty database of its own on the shared server, with a user of its own; both dropped
/// on drop.
pub struct MariaDb {
    server: Server,
    name: String,
    user: String,
    password: String,
}

impl MariaDb {
    /// Starts the server if no test is using it, and creates a database with a random name
    /// and a user with only the grants change capture needs.
    pub fn create() -> MariaDb {
        let server = Server::acquire();
        let id = format!("{:016x}", rand::random::<u64>());
        // Made before CREATE DATABASE, so that a failure still releases the server on drop.
        let db = MariaDb {
            server,
            name: format!("{DB_PREFIX}{id}"),
            user: format!("{USER_PREFIX}{id}"),
            password: format!("pw-{id}-secret"),
        };
        db.server.sql(
            "",
            &format!(
                "CREATE DATABASE `{name}` CHARACTER SET utf8mb4; \
                 CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'; \
                 GRANT SELECT ON `{name}`.* TO '{user}'@'127.0.0.1'; \
                 GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'127.0.0.1';",
                name = db.name,
                user = db.user,
                password = db.password
            ),
        );
        db
    }

    /// The connection URL of the database's own (least-privilege) user.
    pub fn url(&self) -> String {
        format!(
            "mysql://{}:{}@127.0.0.1:{}/{}",
            self.user, self.password, self.server.port, self.name
        )
    }

    /// The password in [`MariaDb::url`], to check that it reaches no log.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// Runs SQL as root in this database with the `mariadb` client; returns its
    /// tab-separated output without column names.
    pub fn sql(&self, sql: &str) -> String {
        self.server.sql(&self.name, sql)
    }

    /// [`MariaDb::sql`] returning the error instead of panicking.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        self.server.try_sql(&self.name, sql)
    }

    /// The last lines of the server's error log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let sql = format!(
            "DROP DATABASE IF EXISTS `{}`; DROP USER IF EXISTS '{}'@'127.0.0.1';",
            self.name, self.user
        );
        if let Err(err) = self.server.try_sql("", &sql) {
            eprintln!("could not drop test database {}: {err}", self.name);
        }
        Server::release();
    }
}

impl std::fmt::Debug for MariaDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MariaDb")
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
        let alone = FileExt::try_lock_exclusive(&users_lock).unwrap_or_else(|err| {
            panic!("flock {}/users.lock: {err}", data_dir.display());
        });
        let server = Server::start(data_dir);
        if alone {
            server.drop_leftovers();
        }
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
        if FileExt::try_lock_exclusive(&users_lock).unwrap_or(false) {
            server.stop();
        }
        drop(users_lock);
        drop(server_lock);
    }

    /// Runs the start script (which does nothing when the server already runs) and learns
    /// the port it listens on.
    fn start(data_dir: PathBuf) -> Server {
        let script = peers_dir().join("start-mariadb.sh");
        let port = free_port();
        let out = Command::new("bash")
            .arg(&script)
            .arg(&data_dir)
            .env("MARIADB_PORT", port.to_string())
            .output()
            .unwrap_or_else(|err| panic!("running {}: {err}", script.display()));
        let log = data_dir.join("mariadb/error.log");
        if !out.status.success() {
            panic!(
                "MariaDB did not start: {} {} exited with {}.\n\
                 It needs root (it runs the server as the `mysql` user) and the apt packages \
                 `mariadb-server mariadb-client`; install them with \
                 `apt-get install -y mariadb-server mariadb-client`, or set OUTPOST_PEERS=skip \
                 to skip peer tests.\n{}\nserver log tail:\n{}",
                script.display(),
                data_dir.display(),
                out.status,
                output_text(&out),
                tail_file(&log, 20)
            );
        }
        // A server already running (left by an interrupted run, or started by another
        // process) is reused; the script wrote the port it was started on.
        let port = std::fs::read_to_string(data_dir.join("mariadb/port"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(port);
        Server { data_dir, port }
    }

    /// Drops the test databases and users of runs that were killed before they could.
    fn drop_leftovers(&self) {
        let databases = self.try_sql(
            "",
            &format!(
                "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE '{DB_PREFIX}%'"
            ),
        );
        for name in databases.unwrap_or_default().lines().map(str::trim) {
            if name.starts_with(DB_PREFIX) {
                if let Err(err) = self.try_sql("", &format!("DROP DATABASE IF EXISTS `{name}`")) {
                    eprintln!("could not drop leftover test database {name}: {err}");
                }
            }
        }
        let users = self.try_sql(
            "",
            &format!("SELECT user FROM mysql.user WHERE user LIKE '{USER_PREFIX}%'"),
        );
        for user in users.unwrap_or_default().lines().map(str::trim) {
            if user.starts_with(USER_PREFIX) {
                let _ = self.try_sql("", &format!("DROP USER IF EXISTS '{user}'@'127.0.0.1'"));
            }
        }
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        self.try_sql(db, sql).unwrap_or_else(|err| {
            panic!(
                "mariadb on 127.0.0.1:{} failed: {err}\nserver log tail:\n{}",
                self.port,
                self.log_tail(20)
            )
        })
    }

    fn try_sql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut command = Command::new("mariadb");
        command
            .args([
                "--no-defaults",
                "-h",
                "127.0.0.1",
                "-P",
                &self.port.to_string(),
            ])
            .args([
                "-u",
                "root",
                "--connect-timeout=10",
                "--default-character-set=utf8mb4",
            ])
            .args(["-N", "-B", "-e", sql]);
        if !db.is_empty() {
            command.args(["-D", db]);
        }
        let out = command
            .output()
            .map_err(|err| format!("running mariadb: {err}"))?;
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
        tail_file(&self.data_dir.join("mariadb/error.log"), lines)
    }

    /// Stops only the server whose PID the start script recorded.
    fn stop(&self) {
        let script = peers_dir().join("stop-peer.sh");
        let stopped = Command::new("bash")
            .arg(&script)
            .arg("mariadb")
            .arg(&self.data_dir)
            .output();
        match stopped {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("{} mariadb: {}", script.display(), output_text(&out)),
            Err(err) => eprintln!("running {}: {err}", script.display()),
        }
    }
}

/// `<target dir>/tmp/outpost-mariadb`, the target dir being the one holding the running
/// test binary, so that every test binary of the workspace shares one server.
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
    target.join("tmp").join("outpost-mariadb")
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
