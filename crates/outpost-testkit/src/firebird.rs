//! A real Firebird 3 for tests: the peer recipe (`peers/start-firebird.sh`,
//! `peers/stop-peer.sh`) run on 127.0.0.1 with its data under the cargo target dir
//! (`target/tmp/outpost-firebird`), and one fresh database file per user ([`FbDatabase`]),
//! dropped when that user is done.
//!
//! Same design as [`crate::PgDatabase`]: the server is shared by every test using it at the
//! same time, in this process and in others, and stopped by the last one to finish, with two
//! `flock`s in the data dir: see `shared_server.rs`. A server left running by a killed run is
//! reused (its port is read back from the `firebird.conf` the recipe wrote), and leftover
//! `test_*.fdb` files are removed by the next process that finds itself the only user.
//!
//! Needs root (the server runs as the `firebird` user) and the apt packages
//! `firebird3.0-server firebird3.0-utils` (the recipe installs them if missing, with
//! services kept from starting).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::shared_server::{self, output_text, Lease, Server, ServerKind, SharedServer};

/// The SYSDBA password the recipe sets.
pub const FB_PASSWORD: &str = "masterkey";

/// Test databases are named `test_<16 hex digits>.fdb`.
const DB_PREFIX: &str = "test_";

/// This process's use of the server.
static SERVER: SharedServer<Firebird> = SharedServer::new();

/// Firebird 3 as a [`ServerKind`].
struct Firebird;

impl ServerKind for Firebird {
    const NAME: &'static str = "firebird";
    const TITLE: &'static str = "Firebird 3";
    const PORT_ENV: &'static str = "FB_PORT";
    const START_ENV: &'static [(&'static str, &'static str)] = &[("FB_PASSWORD", FB_PASSWORD)];
    const LOG: &'static str = "firebird/server.log";
    const NEEDS: &'static str = "It needs root (it runs the server as the `firebird` user) and \
         the apt packages `firebird3.0-server firebird3.0-utils`; or set OUTPOST_PEERS=skip to \
         skip peer tests.";

    /// The port in the server's firebird.conf.
    fn running_port(data_dir: &Path) -> Option<u16> {
        let conf = data_dir.join("firebird/root/firebird.conf");
        std::fs::read_to_string(conf).ok().and_then(|text| {
            text.lines().find_map(|line| {
                let (key, value) = line.split_once('=')?;
                (key.trim() == "RemoteServicePort")
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })
        })
    }

    /// Removes the test databases of runs that were killed before they could.
    fn drop_leftovers(server: &Server<Firebird>) {
        let Ok(entries) = std::fs::read_dir(server.db_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(DB_PREFIX) && name.ends_with(".fdb") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Whether Firebird tests are skipped on purpose (`OUTPOST_PEERS=skip`); says so on stderr.
pub fn skip_firebird_tests(test: &str) -> bool {
    shared_server::skip_tests::<Firebird>(test)
}

/// An empty database (UTF8) of its own on the shared server, dropped on drop.
pub struct FbDatabase {
    server: Lease<Firebird>,
    path: PathBuf,
}

impl FbDatabase {
    /// Starts the server if no test is using it, and creates a database with a random name.
    pub fn create() -> FbDatabase {
        let server = SERVER.acquire();
        let path = server
            .db_dir()
            .join(format!("{DB_PREFIX}{:016x}.fdb", rand::random::<u64>()));
        let db = FbDatabase { server, path };
        let sql = format!(
            "CREATE DATABASE '{}' USER 'SYSDBA' PASSWORD '{FB_PASSWORD}' DEFAULT CHARACTER SET UTF8;\n",
            db.connection_string()
        );
        db.server
            .isql(None, &sql)
            .unwrap_or_else(|err| panic!("create test database: {err}"));
        db
    }

    /// `firebird://SYSDBA:masterkey@127.0.0.1:PORT//…/test_….fdb`.
    pub fn url(&self) -> String {
        format!(
            "firebird://SYSDBA:{FB_PASSWORD}@127.0.0.1:{}/{}",
            self.server.port,
            self.path.display()
        )
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `127.0.0.1/PORT:PATH`, as isql takes it.
    pub fn connection_string(&self) -> String {
        format!("127.0.0.1/{}:{}", self.server.port, self.path.display())
    }

    /// Runs a script with isql-fb (UTF8, stops at the first error) in this database;
    /// returns its output. Panics on failure.
    pub fn isql(&self, sql: &str) -> String {
        self.try_isql(sql)
            .unwrap_or_else(|err| panic!("isql failed: {err}"))
    }

    /// [`FbDatabase::isql`], returning the failure instead of panicking.
    pub fn try_isql(&self, sql: &str) -> Result<String, String> {
        self.server.isql(Some(&self.connection_string()), sql)
    }

    /// An isql-fb process kept open, to hold a transaction open while others commit.
    pub fn isql_session(&self) -> IsqlSession {
        let child = self
            .server
            .isql_command(Some(&self.connection_string()))
            .spawn()
            .unwrap_or_else(|err| panic!("running isql-fb: {err}"));
        IsqlSession { child: Some(child) }
    }

    /// The single value a one-column, one-row query returns (isql's `SET LIST ON` form).
    pub fn value(&self, query: &str) -> String {
        let out = self.isql(&format!("SET LIST ON;\n{query};\n"));
        out.lines()
            .find_map(|line| {
                let line = line.trim();
                (!line.is_empty()).then(|| {
                    line.split_once(char::is_whitespace)
                        .map_or(String::new(), |(_, v)| v.trim().to_owned())
                })
            })
            .unwrap_or_default()
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }
}

impl Drop for FbDatabase {
    /// Drops the database; then the lease (a field) releases the server.
    fn drop(&mut self) {
        let sql = "DROP DATABASE;\n";
        if self.try_isql(sql).is_err() {
            // Still attached (a killed agent): the file goes with the next cleanup.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl std::fmt::Debug for FbDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbDatabase")
            .field("path", &self.path)
            .field("port", &self.server.port)
            .finish()
    }
}

/// A running isql-fb reading statements as they are sent (see
/// [`FbDatabase::isql_session`]).
pub struct IsqlSession {
    child: Option<std::process::Child>,
}

impl IsqlSession {
    /// Sends statements (each ending in `;`); isql runs them as it reads them.
    pub fn send(&mut self, sql: &str) {
        let stdin = self
            .child
            .as_mut()
            .and_then(|child| child.stdin.as_mut())
            .unwrap_or_else(|| panic!("isql stdin closed"));
        stdin
            .write_all(sql.as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|err| panic!("writing to isql-fb: {err}"));
    }

    /// Closes its input and waits for it; panics if it failed.
    pub fn finish(mut self) -> String {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("isql session already finished"));
        drop(child.stdin.take());
        let out = child
            .wait_with_output()
            .unwrap_or_else(|err| panic!("waiting for isql-fb: {err}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.contains("Statement failed") {
            panic!("isql-fb session failed: {}", output_text(&out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for IsqlSession {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Server<Firebird> {
    fn db_dir(&self) -> PathBuf {
        self.data_dir.join("firebird/db")
    }

    /// isql-fb connected to `database` if given (as SYSDBA, UTF8), all pipes taken.
    fn isql_command(&self, database: Option<&str>) -> Command {
        let mut command = Command::new("isql-fb");
        command
            .arg("-q")
            .arg("-b")
            .arg("-ch")
            .arg("UTF8")
            .env("FIREBIRD", self.data_dir.join("firebird/root"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(database) = database {
            command
                .arg("-user")
                .arg("SYSDBA")
                .arg("-password")
                .arg(FB_PASSWORD)
                .arg(database);
        }
        command
    }

    /// Runs `sql` with isql-fb, connected to `database` if given (as SYSDBA, UTF8).
    fn isql(&self, database: Option<&str>, sql: &str) -> Result<String, String> {
        let mut child = self
            .isql_command(database)
            .spawn()
            .map_err(|err| format!("running isql-fb: {err}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(|err| format!("writing to isql-fb: {err}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|err| format!("running isql-fb: {err}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !stderr.contains("Statement failed") {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "isql-fb exited with {}: {}\nscript:\n{sql}",
                out.status,
                output_text(&out)
            ))
        }
    }
}
