//! One database server (PostgreSQL, MariaDB, Firebird) shared by many tests: the machinery
//! behind [`crate::PgDatabase`], [`crate::mariadb::MariaDb`] and
//! [`crate::firebird::FbDatabase`]. Each database supplies only what differs, as a
//! [`ServerKind`]: its name, start script and environment, log, how to read back the port of
//! a server already running, and how to drop leftover test databases; it creates and drops
//! its per-test databases itself, holding a [`Lease`] on the server meanwhile.
//!
//! The server runs the peer recipe (`peers/start-<name>.sh`, `peers/stop-peer.sh`) on
//! 127.0.0.1 with its data under the cargo target dir (`target/tmp/outpost-<name>`). It is
//! shared by every test using it at the same time, in this process and in others (two
//! `cargo test` runs, the store tests and the hub end-to-end tests), and stopped by the last
//! one to finish; a later test starts it again. Across processes this is arranged with two
//! `flock`s in the data dir:
//!
//! - `server.lock`, held exclusively while a process starts the server or decides to stop
//!   it, so those steps never interleave;
//! - `users.lock`, held shared by every process that has a database on the server. A process
//!   whose last database is gone stops the server only if it can then take `users.lock`
//!   exclusively, i.e. no other process is using it.
//!
//! The kernel drops both locks of a killed process. A server left running by a killed run is
//! reused (the start script does nothing when it already runs, and [`ServerKind::running_port`]
//! reads back its port), and its leftover test databases are dropped by the next process that
//! finds itself the only user ([`ServerKind::drop_leftovers`]).

use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use fs4::fs_std::FileExt;

use crate::{free_port, peers_dir};

/// What one kind of database server supplies to [`SharedServer`].
pub(crate) trait ServerKind: Sized + 'static {
    /// The recipe's name: `peers/start-<NAME>.sh`, `stop-peer.sh <NAME>`, the data dir
    /// `target/tmp/outpost-<NAME>` and the server's files under `<data dir>/<NAME>/`.
    const NAME: &'static str;
    /// The server and its version, for messages (`PostgreSQL 15`).
    const TITLE: &'static str;
    /// The start script's environment variable taking the port to listen on.
    const PORT_ENV: &'static str;
    /// More environment for the start script.
    const START_ENV: &'static [(&'static str, &'static str)] = &[];
    /// The server's log, relative to the data dir.
    const LOG: &'static str;
    /// What the server needs, told when it does not start (ends with a full stop).
    const NEEDS: &'static str;

    /// The port of the server running from `data_dir`, if the start script found one already
    /// running (left by an interrupted run, or started by another process).
    fn running_port(data_dir: &Path) -> Option<u16>;

    /// Drops the test databases (and whatever goes with them) of runs that were killed
    /// before they could; called only by a process that is the server's only user.
    fn drop_leftovers(server: &Server<Self>);
}

/// A running server of kind `K`: where its data is and the port it listens on.
pub(crate) struct Server<K> {
    pub(crate) data_dir: PathBuf,
    pub(crate) port: u16,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Server<K> {
    fn clone(&self) -> Self {
        Server {
            data_dir: self.data_dir.clone(),
            port: self.port,
            kind: PhantomData,
        }
    }
}

impl<K: ServerKind> Server<K> {
    /// `result`'s output, or a panic naming `client`, the error and the server's log tail.
    pub(crate) fn or_panic(&self, client: &str, result: Result<String, String>) -> String {
        result.unwrap_or_else(|err| {
            panic!(
                "{client} on 127.0.0.1:{} failed: {err}\nserver log tail:\n{}",
                self.port,
                self.log_tail(20)
            )
        })
    }

    /// The last lines of the server's log, for failure messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.data_dir.join(K::LOG), lines)
    }

    /// Runs the start script (which does nothing when the server already runs) and learns
    /// the port it listens on.
    fn start(data_dir: PathBuf) -> Server<K> {
        let script = peers_dir().join(format!("start-{}.sh", K::NAME));
        let port = free_port();
        let out = Command::new("bash")
            .arg(&script)
            .arg(&data_dir)
            .env(K::PORT_ENV, port.to_string())
            .envs(K::START_ENV.iter().copied())
            .output()
            .unwrap_or_else(|err| panic!("running {}: {err}", script.display()));
        if !out.status.success() {
            panic!(
                "{} did not start: {} {} exited with {}.\n{}\n{}\nserver log tail:\n{}",
                K::TITLE,
                script.display(),
                data_dir.display(),
                out.status,
                K::NEEDS,
                output_text(&out),
                tail_file(&data_dir.join(K::LOG), 20)
            );
        }
        let port = K::running_port(&data_dir).unwrap_or(port);
        Server {
            data_dir,
            port,
            kind: PhantomData,
        }
    }

    /// Stops only the server whose PID the start script recorded.
    fn stop(&self) {
        let script = peers_dir().join("stop-peer.sh");
        let stopped = Command::new("bash")
            .arg(&script)
            .arg(K::NAME)
            .arg(&self.data_dir)
            .output();
        match stopped {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("{} {}: {}", script.display(), K::NAME, output_text(&out)),
            Err(err) => eprintln!("running {}: {err}", script.display()),
        }
    }
}

/// This process's use of the server of kind `K`, kept in a `static` of the database's
/// module. Starting, counting and stopping all happen under this one lock, so a test never
/// finds a server that is on its way down.
pub(crate) struct SharedServer<K> {
    state: Mutex<State<K>>,
}

struct State<K> {
    server: Option<Server<K>>,
    /// How many [`Lease`]s of this process exist.
    users: usize,
    /// `users.lock`, held shared while `users > 0`.
    users_lock: Option<File>,
}

impl<K> SharedServer<K> {
    pub(crate) const fn new() -> Self {
        SharedServer {
            state: Mutex::new(State {
                server: None,
                users: 0,
                users_lock: None,
            }),
        }
    }
}

impl<K: ServerKind> SharedServer<K> {
    /// The running server, started if no test (of any process) is using it; released when
    /// the lease is dropped.
    pub(crate) fn acquire(&'static self) -> Lease<K> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(server) = &state.server {
            let server = server.clone();
            state.users += 1;
            return Lease {
                shared: self,
                server,
            };
        }
        let data_dir = data_dir(K::NAME);
        std::fs::create_dir_all(&data_dir)
            .unwrap_or_else(|err| panic!("create {}: {err}", data_dir.display()));
        let server_lock = lock_file(&data_dir, "server.lock");
        flock(&server_lock, "server.lock", FileExt::lock_exclusive);
        let users_lock = lock_file(&data_dir, "users.lock");
        // Alone: nobody else has a database there, so any test database is a leftover.
        let alone = FileExt::try_lock_exclusive(&users_lock).unwrap_or_else(|err| {
            panic!("flock {}/users.lock: {err}", data_dir.display());
        });
        let server = Server::<K>::start(data_dir);
        if alone {
            K::drop_leftovers(&server);
        }
        // Converts our exclusive lock, if we had it, into a shared one.
        flock(&users_lock, "users.lock", FileExt::lock_shared);
        drop(server_lock);
        state.server = Some(server.clone());
        state.users = 1;
        state.users_lock = Some(users_lock);
        Lease {
            shared: self,
            server,
        }
    }

    /// Stops the server when the last test using it, in every process, is done.
    fn release(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.users = state.users.saturating_sub(1);
        if state.users > 0 {
            return;
        }
        let (Some(server), Some(users_lock)) = (state.server.take(), state.users_lock.take())
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
}

/// One user's hold on the shared server (see [`SharedServer::acquire`]); dereferences to the
/// [`Server`], and releases it when dropped. A database keeps it as a field, so that its own
/// `Drop` (dropping the test database) runs before the release.
pub(crate) struct Lease<K: ServerKind> {
    shared: &'static SharedServer<K>,
    server: Server<K>,
}

impl<K: ServerKind> Deref for Lease<K> {
    type Target = Server<K>;

    fn deref(&self) -> &Server<K> {
        &self.server
    }
}

impl<K: ServerKind> Drop for Lease<K> {
    fn drop(&mut self) {
        self.shared.release();
    }
}

/// Whether the tests needing the server of kind `K` are skipped on purpose
/// (`OUTPOST_PEERS=skip`); says so with a `SKIPPED <test>` line written straight to stderr,
/// so that the test harness (which captures `eprintln!` of passing tests) shows it.
pub(crate) fn skip_tests<K: ServerKind>(test: &str) -> bool {
    let skip = std::env::var("OUTPOST_PEERS").is_ok_and(|v| v == "skip");
    if skip {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: OUTPOST_PEERS=skip (it needs {}, started by peers/start-{}.sh)",
            K::TITLE,
            K::NAME
        );
    }
    skip
}

/// `<target dir>/tmp/outpost-<name>`, the target dir being the one holding the running test
/// binary (`<target>/<profile>/deps/<test>-<hash>`), so that every test binary of the
/// workspace shares one server.
fn data_dir(name: &str) -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|dir| dir.file_name().is_some_and(|name| name == "deps"))
                .and_then(|deps| deps.parent()?.parent())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    target.join("tmp").join(format!("outpost-{name}"))
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

/// Runs a database's command-line client `command`, which runs `sql`: its stdout, trimmed,
/// or why it failed.
pub(crate) fn run_client(command: &mut Command, sql: &str) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|err| format!("running {}: {err}", command.get_program().to_string_lossy()))?;
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

/// A finished command's stdout and stderr, trimmed, for error messages.
pub(crate) fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

/// The last `lines` lines of the file at `path`, or why it could not be read.
pub(crate) fn tail_file(path: &Path, lines: usize) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| format!("({}: {err})", path.display()));
    crate::tail(&text, lines)
}
