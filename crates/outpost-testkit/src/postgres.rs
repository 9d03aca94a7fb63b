//! A real PostgreSQL 15 for tests: the peer recipe (`peers/start-postgres.sh`,
//! `peers/stop-peer.sh`) run on 127.0.0.1 with its data under the cargo target dir
//! (`target/tmp/outpost-postgres`), and one fresh database per user ([`PgDatabase`]), dropped
//! `WITH (FORCE)` when that user is done.
//!
//! The server is shared by every test using it at the same time, in this process and in
//! others, and stopped by the last one to finish, with two `flock`s in the data dir: see
//! `shared_server.rs` for the design. A server left running by a killed run is reused (its
//! port is the fourth line of `postmaster.pid`), and its leftover `test_db_…` databases are
//! dropped, with their replication slots, by the next process that finds itself the only
//! user.

use std::path::Path;
use std::process::Command;

use crate::shared_server::{self, run_client, Lease, Server, ServerKind, SharedServer};

/// Test databases are named `test_db_<16 hex digits>`.
const DB_PREFIX: &str = "test_db_";

/// This process's use of the server.
static SERVER: SharedServer<Postgres> = SharedServer::new();

/// PostgreSQL 15 as a [`ServerKind`].
struct Postgres;

impl ServerKind for Postgres {
    const NAME: &'static str = "postgres";
    const TITLE: &'static str = "PostgreSQL 15";
    const PORT_ENV: &'static str = "PG_PORT";
    const LOG: &'static str = "postgres/postgres.log";
    const NEEDS: &'static str = "It needs root (it runs the server as the `postgres` user) and \
         the apt package `postgresql` (postgresql-15); install it with \
         `apt-get install -y postgresql`, or set OUTPOST_PEERS=skip to skip peer tests.";

    /// postmaster.pid's fourth line is the port the server listens on.
    fn running_port(data_dir: &Path) -> Option<u16> {
        let pid_file = data_dir.join("postgres/cluster/postmaster.pid");
        std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|text| text.lines().nth(3).and_then(|l| l.trim().parse().ok()))
    }

    fn drop_leftovers(server: &Server<Postgres>) {
        let listed = server.try_psql(
            "postgres",
            &format!("SELECT datname FROM pg_database WHERE datname LIKE '{DB_PREFIX}%'"),
        );
        for name in listed.unwrap_or_default().lines().map(str::trim) {
            if name.starts_with(DB_PREFIX) {
                server.drop_slots(name);
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                if let Err(err) = server.try_psql("postgres", &sql) {
                    eprintln!("could not drop leftover test database {name}: {err}");
                }
            }
        }
    }
}

/// Whether PostgreSQL tests are skipped on purpose (`OUTPOST_PEERS=skip`); says so with a
/// `SKIPPED <test>` line written straight to stderr, so that the test harness (which captures
/// `eprintln!` of passing tests) shows it.
pub fn skip_postgres_tests(test: &str) -> bool {
    shared_server::skip_tests::<Postgres>(test)
}

/// An empty database of its own on the shared server, dropped on drop.
pub struct PgDatabase {
    server: Lease<Postgres>,
    name: String,
}

impl PgDatabase {
    /// Starts the server if no test is using it, and creates a database with a random name.
    pub fn create() -> PgDatabase {
        let server = SERVER.acquire();
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
    /// Drops the database; then the lease (a field) releases the server.
    fn drop(&mut self) {
        // A database with a logical replication slot cannot be dropped: drop its slots first.
        self.server.drop_slots(&self.name);
        // WITH (FORCE) ends the connections of a hub or pool that may still be closing.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(err) = self.server.try_psql("postgres", &sql) {
            eprintln!("could not drop test database {}: {err}", self.name);
        }
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

impl Server<Postgres> {
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
        self.or_panic("psql", self.try_psql(db, sql))
    }

    fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut command = Command::new("psql");
        command
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
            .env("PGCONNECT_TIMEOUT", "10");
        run_client(&mut command, sql)
    }
}
