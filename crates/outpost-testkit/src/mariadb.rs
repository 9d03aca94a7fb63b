//! A real MariaDB 10.11 for tests: the peer recipe (`peers/start-mariadb.sh`,
//! `peers/stop-peer.sh`) run on 127.0.0.1 with its data under the cargo target dir
//! (`target/tmp/outpost-mariadb`), binlog in ROW format with full row images, and one fresh
//! database per user ([`MariaDb`]) with a user of its own holding only the grants change
//! capture needs (`SELECT` on the database, `REPLICATION SLAVE` and `REPLICATION CLIENT`).
//!
//! Shared exactly like the PostgreSQL server: by every test using it at the same time, in
//! this process and in others, and stopped by the last one to finish, with two `flock`s in
//! the data dir: see `shared_server.rs` for the design. A server left running by a killed run
//! is reused (its port is in `mariadb/port`), and its leftover `test_db_…` databases and
//! `test_u_…` users are dropped by the next process that finds itself the only user.

use std::path::Path;
use std::process::Command;

use crate::shared_server::{self, run_client, Lease, Server, ServerKind, SharedServer};

/// Test databases are named `test_db_<16 hex digits>`, their users `test_u_<same digits>`.
const DB_PREFIX: &str = "test_db_";
const USER_PREFIX: &str = "test_u_";

/// This process's use of the server.
static SERVER: SharedServer<Mariadb> = SharedServer::new();

/// MariaDB 10.11 as a [`ServerKind`].
struct Mariadb;

impl ServerKind for Mariadb {
    const NAME: &'static str = "mariadb";
    const TITLE: &'static str = "MariaDB 10.11";
    const PORT_ENV: &'static str = "MARIADB_PORT";
    const LOG: &'static str = "mariadb/error.log";
    const NEEDS: &'static str = "It needs root (it runs the server as the `mysql` user) and the \
         apt packages `mariadb-server mariadb-client`; install them with \
         `apt-get install -y mariadb-server mariadb-client`, or set OUTPOST_PEERS=skip \
         to skip peer tests.";

    /// The start script wrote the port it was started on.
    fn running_port(data_dir: &Path) -> Option<u16> {
        std::fs::read_to_string(data_dir.join("mariadb/port"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// Drops the test databases and users of runs that were killed before they could.
    fn drop_leftovers(server: &Server<Mariadb>) {
        let databases = server.try_sql(
            "",
            &format!(
                "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE '{DB_PREFIX}%'"
            ),
        );
        for name in databases.unwrap_or_default().lines().map(str::trim) {
            if name.starts_with(DB_PREFIX) {
                if let Err(err) = server.try_sql("", &format!("DROP DATABASE IF EXISTS `{name}`")) {
                    eprintln!("could not drop leftover test database {name}: {err}");
                }
            }
        }
        let users = server.try_sql(
            "",
            &format!("SELECT user FROM mysql.user WHERE user LIKE '{USER_PREFIX}%'"),
        );
        for user in users.unwrap_or_default().lines().map(str::trim) {
            if user.starts_with(USER_PREFIX) {
                let _ = server.try_sql("", &format!("DROP USER IF EXISTS '{user}'@'127.0.0.1'"));
            }
        }
    }
}

/// Whether MariaDB tests are skipped on purpose (`OUTPOST_PEERS=skip`); says so with a
/// `SKIPPED <test>` line written straight to stderr.
pub fn skip_mariadb_tests(test: &str) -> bool {
    shared_server::skip_tests::<Mariadb>(test)
}

/// An empty database of its own on the shared server, with a user of its own; both dropped
/// on drop.
pub struct MariaDb {
    server: Lease<Mariadb>,
    name: String,
    user: String,
    password: String,
}

impl MariaDb {
    /// Starts the server if no test is using it, and creates a database with a random name
    /// and a user with only the grants change capture needs.
    pub fn create() -> MariaDb {
        let server = SERVER.acquire();
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
    /// Drops the database and its user; then the lease (a field) releases the server.
    fn drop(&mut self) {
        let sql = format!(
            "DROP DATABASE IF EXISTS `{}`; DROP USER IF EXISTS '{}'@'127.0.0.1';",
            self.name, self.user
        );
        if let Err(err) = self.server.try_sql("", &sql) {
            eprintln!("could not drop test database {}: {err}", self.name);
        }
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

impl Server<Mariadb> {
    fn sql(&self, db: &str, sql: &str) -> String {
        self.or_panic("mariadb", self.try_sql(db, sql))
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
        run_client(&mut command, sql)
    }
}
