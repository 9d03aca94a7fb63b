//! `outpost bench cdc`: PostgreSQL 15 and then MariaDB 10.11 (the project's own
//! `peers/start-postgres.sh` and `peers/start-mariadb.sh`, on loopback, each in its own
//! temporary folder and on a free port) captured by a real agent in a child process (`kind =
//! "sql"` source, jsonl sink). `--databases` (`postgres,mariadb`, the default) picks the
//! rounds.
//!
//! - Snapshot: an N-row table read by the agent's snapshot, from the first row committed to
//!   the agent's queue to the last (`received_at` of the queue's items), beside a reference
//!   read of the same table on one connection: `COPY … TO STDOUT` (PostgreSQL), and for
//!   MariaDB (where `SELECT … INTO OUTFILE` needs the FILE privilege) `SELECT * FROM` the
//!   table streamed whole through mysql_async's text protocol, every row to this process.
//! - Stream: one writer commits single-row inserts at a steady rate for a bounded time;
//!   each commit's wall-clock time is recorded as the commit returns. The queue's items are
//!   in commit order, so the i-th stream item is the i-th insert: latency is its
//!   `received_at` (the queue's commit, in milliseconds) minus the commit time.
//!
//! The peer recipes run PostgreSQL with `fsync = off` and MariaDB with
//! `innodb_flush_log_at_trx_commit = 2`, `sync_binlog = 0`, so the database's commits are
//! cheap; the agent's queue fsyncs as always.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use super::{free_loopback_addr, stop, tail};

const START_POSTGRES: &str = include_str!("../../../../peers/start-postgres.sh");
const STOP_PEER: &str = include_str!("../../../../peers/stop-peer.sh");
const COMMON: &str = include_str!("../../../../peers/common.sh");
const START_MARIADB: &str = include_str!("../../../../peers/start-mariadb.sh");

/// The source's name in the agent config (and in the queue's `source` column).
const SOURCE: &str = "bench";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A database server started by its peer recipe (`peers/start-<name>.sh`) with its data
/// under the benchmark's folder, on a free loopback port; stopped on drop.
struct PeerDatabase {
    /// The recipe's name: `postgres` or `mariadb`.
    name: &'static str,
    peers: std::path::PathBuf,
    data: std::path::PathBuf,
    port: u16,
}

impl PeerDatabase {
    /// `port_variable` is the recipe's port setting; `needs` names what it installs.
    fn start(
        work: &Path,
        name: &'static str,
        port_variable: &str,
        needs: &str,
    ) -> anyhow::Result<PeerDatabase> {
        let peers = write_peers(work)?;
        let data = work.join(format!("{name}-data"));
        std::fs::create_dir_all(&data)?;
        // The server runs as its own system user: it must be able to reach its folder.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for dir in [work, data.as_path()] {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        let port = free_loopback_addr()?.port();
        let script = format!("start-{name}.sh");
        let out = Command::new("bash")
            .arg(peers.join(&script))
            .arg(&data)
            .env(port_variable, port.to_string())
            .output()
            .with_context(|| format!("running peers/{script}"))?;
        if !out.status.success() {
            bail!(
                "peers/{script} failed (it needs root and {needs}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(PeerDatabase {
            name,
            peers,
            data,
            port,
        })
    }

    fn postgres(work: &Path) -> anyhow::Result<PeerDatabase> {
        Self::start(work, "postgres", "PG_PORT", "postgresql-15")
    }

    fn mariadb(work: &Path) -> anyhow::Result<PeerDatabase> {
        Self::start(work, "mariadb", "MARIADB_PORT", "mariadb-server")
    }

    /// The recipes' superuser on loopback (they set no password) and their `peerdb`.
    fn url(&self) -> String {
        match self.name {
            "postgres" => format!("postgres://postgres@127.0.0.1:{}/peerdb", self.port),
            _ => format!("mysql://root@127.0.0.1:{}/peerdb", self.port),
        }
    }
}

impl Drop for PeerDatabase {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.peers.join("stop-peer.sh"))
            .arg(self.name)
            .arg(&self.data)
            .output();
    }
}

/// The peer recipes, copied into `work/peers`.
fn write_peers(work: &Path) -> anyhow::Result<std::path::PathBuf> {
    let peers = work.join("peers");
    std::fs::create_dir_all(&peers)?;
    for (name, text) in [
        ("start-postgres.sh", START_POSTGRES),
        ("start-mariadb.sh", START_MARIADB),
        ("stop-peer.sh", STOP_PEER),
        ("common.sh", COMMON),
    ] {
        std::fs::write(peers.join(name), text)?;
    }
    Ok(peers)
}

/// The connection that commits the stream's single-row transactions.
enum Writer<'a> {
    Postgres(&'a tokio_postgres::Client, tokio_postgres::Statement),
    Mariadb(mysql_async::Conn),
}

impl Writer<'_> {
    /// Inserts row `n` into `bench_stream` in a transaction of its own (autocommit).
    async fn insert(&mut self, n: i64) -> anyhow::Result<()> {
        match self {
            Writer::Postgres(client, statement) => {
                client.execute(&*statement, &[&n]).await?;
            }
            Writer::Mariadb(conn) => {
                use mysql_async::prelude::Queryable;
                conn.exec_drop("INSERT INTO bench_stream (id, note) VALUES (?, 'x')", (n,))
                    .await?;
            }
        }
        Ok(())
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to the bench PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Items of the bench source in the agent's queue whose type is `msg_type`, in id order:
/// `received_at` and how many events each holds (a snapshot chunk's control id says
/// `<n> events`; a single event holds one).
fn queued(queue: &Path, msg_type: &str) -> anyhow::Result<Vec<(i64, usize)>> {
    if !queue.exists() {
        return Ok(Vec::new());
    }
    let db =
        rusqlite::Connection::open_with_flags(queue, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    db.busy_timeout(Duration::from_secs(5))?;
    let mut statement = db.prepare(
        "SELECT received_at, control_id FROM items WHERE source = ?1 AND msg_type = ?2 ORDER BY id",
    )?;
    let rows = statement
        .query_map(rusqlite::params![SOURCE, msg_type], |row| {
            let control_id: Option<String> = row.get(1)?;
            Ok((row.get(0)?, events_in(control_id.as_deref())))
        })?
        .collect::<Result<Vec<(i64, usize)>, _>>()?;
    Ok(rows)
}

fn events_in(control_id: Option<&str>) -> usize {
    control_id
        .and_then(|id| id.strip_suffix(" events"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

fn count(queue: &Path, msg_type: &str) -> usize {
    queued(queue, msg_type)
        .map(|items| items.iter().map(|(_, n)| n).sum())
        .unwrap_or(0)
}

fn bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

/// Waits until `want` items of `msg_type` are queued, showing progress.
async fn wait_queued(
    queue: &Path,
    msg_type: &str,
    want: usize,
    limit: Duration,
    agent: &mut std::process::Child,
) -> anyhow::Result<()> {
    let progress = bar(want as u64, "queued");
    let deadline = Instant::now() + limit;
    loop {
        let n = count(queue, msg_type);
        progress.set_position(n as u64);
        if n >= want {
            progress.finish_and_clear();
            return Ok(());
        }
        if let Some(status) = agent.try_wait()? {
            bail!("the agent exited with {status}");
        }
        if Instant::now() > deadline {
            progress.finish_and_clear();
            bail!(
                "{n} of {want} {msg_type} events queued after {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs the benchmark on `databases` (comma-separated: `postgres`, `mariadb`), in that
/// order, and prints the figures, the last line holding all of them.
pub async fn run(rate: u32, seconds: u64, rows: u64, databases: &str) -> anyhow::Result<()> {
    let mut postgres = false;
    let mut mariadb = false;
    for name in databases
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        match name.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" | "pg" => postgres = true,
            "mariadb" | "mysql" => mariadb = true,
            other => bail!("--databases: {other:?} is not one of postgres, mariadb"),
        }
    }
    if !postgres && !mariadb {
        bail!("--databases: name postgres, mariadb or both");
    }
    let mut parts = Vec::new();
    if postgres {
        parts.push(postgres_round(rate, seconds, rows).await?);
    }
    if mariadb {
        parts.push(mariadb_round(rate, seconds, rows).await?);
    }
    println!("cdc: {}", parts.join(" | "));
    Ok(())
}

/// Starts the agent on `url` in `work`, measures, stops it.
async fn agent_round(
    work: &Path,
    url: &str,
    writer: &mut Writer<'_>,
    rate: u32,
    seconds: u64,
    rows: u64,
) -> anyhow::Result<Figures> {
    let config = work.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[[source]]\nname = \"{SOURCE}\"\nkind = \"sql\"\nurl = \"{url}\"\nmode = \"cdc\"\n\
             tables = [ {{ name = \"bench_snap\", key = [\"id\"] }}, {{ name = \"bench_stream\", key = [\"id\"] }} ]\n\
             [[sink]]\nname = \"out\"\nkind = \"jsonl\"\npath = \"events.jsonl\"\n[[route]]\nfrom = \"{SOURCE}\"\nto = [\"out\"]\n"
        ),
    )?;
    let log = work.join("agent.log");
    let mut agent = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "agent", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting the agent")?;
    let queue = work.join("data").join(outpost_queue::QUEUE_FILE);
    let result = measure(writer, &queue, &mut agent, rate, seconds, rows).await;
    stop(&mut agent);
    result.with_context(|| format!("agent log: {}", tail(&log)))
}

fn print_stream(figures: &Figures, rows: u64) {
    println!(
        "agent snapshot: {rows} rows queued; {} of them in {:.2} s from the first commit to the queue to the last",
        figures.snapshot_rows, figures.snapshot_secs
    );
    println!(
        "agent stream: {} inserts committed in {:.1} s ({:.0}/s achieved); all queued; latency commit -> queue p50 {} ms p90 {} ms p99 {} ms max {} ms",
        figures.writes,
        figures.write_secs,
        figures.writes as f64 / figures.write_secs.max(1e-6),
        figures.p50,
        figures.p90,
        figures.p99,
        figures.max
    );
}

async fn postgres_round(rate: u32, seconds: u64, rows: u64) -> anyhow::Result<String> {
    let work = tempfile::tempdir()?;
    eprintln!("starting PostgreSQL 15 with peers/start-postgres.sh…");
    let pg = PeerDatabase::postgres(work.path())?;
    let client = connect(&pg.url()).await?;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_snap, bench_stream;
             CREATE TABLE bench_snap (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2),
                                      born date, created timestamptz NOT NULL);
             INSERT INTO bench_snap SELECT g, 'Patient ' || g, (g % 10000) / 100.0,
                    DATE '1950-01-01' + (g % 20000), now() FROM generate_series(1, {rows}) g;
             CREATE TABLE bench_stream (id bigint PRIMARY KEY, note text);
             ANALYZE bench_snap;"
        ))
        .await
        .context("create the bench tables")?;

    // The reference: COPY of the same table, every row to this process.
    let started = Instant::now();
    let stream = client
        .copy_out("COPY bench_snap TO STDOUT")
        .await
        .context("COPY bench_snap TO STDOUT")?;
    let mut stream = std::pin::pin!(stream);
    let mut copy_bytes = 0usize;
    let mut copy_rows = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        copy_bytes += chunk.len();
        copy_rows += chunk.iter().filter(|b| **b == b'\n').count();
    }
    let copy_secs = started.elapsed().as_secs_f64();
    if copy_rows as u64 != rows {
        bail!("COPY gave {copy_rows} rows of {rows}");
    }

    let insert = client
        .prepare("INSERT INTO bench_stream (id, note) VALUES ($1, 'x')")
        .await?;
    let mut writer = Writer::Postgres(&client, insert);
    let figures = agent_round(work.path(), &pg.url(), &mut writer, rate, seconds, rows).await?;

    let copy_rate = copy_rows as f64 / copy_secs.max(1e-6);
    println!(
        "COPY bench_snap TO STDOUT: {copy_rows} rows, {:.1} MB in {copy_secs:.2} s",
        copy_bytes as f64 / 1e6
    );
    print_stream(&figures, rows);
    let snapshot_rate = figures.snapshot_rows as f64 / figures.snapshot_secs.max(1e-3);
    Ok(format!(
        "postgres {rate} changes/s for {seconds} s | p50 {} ms p99 {} ms | snapshot {:.0} rows/s vs COPY {:.0} rows/s | ratio {:.2}",
        figures.p50,
        figures.p99,
        snapshot_rate,
        copy_rate,
        snapshot_rate / copy_rate.max(1e-6)
    ))
}

async fn mariadb_round(rate: u32, seconds: u64, rows: u64) -> anyhow::Result<String> {
    use mysql_async::prelude::Queryable;

    let work = tempfile::tempdir()?;
    eprintln!("starting MariaDB 10.11 with peers/start-mariadb.sh…");
    let db = PeerDatabase::mariadb(work.path())?;
    let opts = mysql_async::Opts::from_url(&db.url())
        .map_err(|err| anyhow::anyhow!("the bench MariaDB URL: {err}"))?;
    let mut conn = mysql_async::Conn::new(opts.clone())
        .await
        .context("connect to the bench MariaDB")?;
    conn.query_drop(format!(
        "DROP TABLE IF EXISTS bench_snap, bench_stream;
         CREATE TABLE bench_snap (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL,
                                  amount DECIMAL(12,2), born DATE, created DATETIME(6) NOT NULL);
         INSERT INTO bench_snap SELECT seq, CONCAT('Patient ', seq), (seq % 10000) / 100.0,
                DATE '1950-01-01' + INTERVAL (seq % 20000) DAY, NOW(6) FROM seq_1_to_{rows};
         CREATE TABLE bench_stream (id BIGINT PRIMARY KEY, note TEXT);
         ANALYZE TABLE bench_snap;"
    ))
    .await
    .context("create the bench tables")?;

    // The reference: the whole table streamed to this process over one connection.
    let started = Instant::now();
    let mut dump_rows = 0u64;
    let mut dump_bytes = 0usize;
    {
        let mut result = conn
            .query_iter("SELECT * FROM bench_snap")
            .await
            .context("SELECT * FROM bench_snap")?;
        let mut stream = result
            .stream::<mysql_async::Row>()
            .await?
            .ok_or_else(|| anyhow::anyhow!("SELECT * FROM bench_snap returned no result set"))?;
        while let Some(row) = stream.next().await {
            let row = row?;
            dump_rows += 1;
            dump_bytes += (0..row.len())
                .map(|i| match row.as_ref(i) {
                    Some(mysql_async::Value::Bytes(b)) => b.len() + 1,
                    _ => 1,
                })
                .sum::<usize>();
        }
    }
    let dump_secs = started.elapsed().as_secs_f64();
    if dump_rows != rows {
        bail!("SELECT * gave {dump_rows} rows of {rows}");
    }

    let mut writer = Writer::Mariadb(conn);
    let figures = agent_round(work.path(), &db.url(), &mut writer, rate, seconds, rows).await?;
    if let Writer::Mariadb(conn) = writer {
        let _ = conn.disconnect().await;
    }

    let dump_rate = dump_rows as f64 / dump_secs.max(1e-6);
    println!(
        "MariaDB dump reference (SELECT * FROM bench_snap streamed by mysql_async, text protocol): {dump_rows} rows, {:.1} MB in {dump_secs:.2} s",
        dump_bytes as f64 / 1e6
    );
    print_stream(&figures, rows);
    let snapshot_rate = figures.snapshot_rows as f64 / figures.snapshot_secs.max(1e-3);
    Ok(format!(
        "mariadb {rate} changes/s for {seconds} s | p50 {} ms p99 {} ms | snapshot {:.0} rows/s vs dump (SELECT * via mysql_async) {:.0} rows/s | ratio {:.2}",
        figures.p50,
        figures.p99,
        snapshot_rate,
        dump_rate,
        snapshot_rate / dump_rate.max(1e-6)
    ))
}

struct Figures {
    snapshot_secs: f64,
    /// Rows committed after the first chunk (the clock starts at the first commit).
    snapshot_rows: usize,
    writes: usize,
    write_secs: f64,
    p50: i64,
    p90: i64,
    p99: i64,
    max: i64,
}

async fn measure(
    writer: &mut Writer<'_>,
    queue: &Path,
    agent: &mut std::process::Child,
    rate: u32,
    seconds: u64,
    rows: u64,
) -> anyhow::Result<Figures> {
    eprintln!("agent snapshot of {rows} rows…");
    wait_queued(
        queue,
        "bench_snap.snapshot",
        rows as usize,
        Duration::from_secs(600),
        agent,
    )
    .await?;
    let snap = queued(queue, "bench_snap.snapshot")?;
    // From the first chunk committed to the last: the rows after the first chunk.
    let (first, last) = (
        snap.first().map_or(0, |(at, _)| *at),
        snap.last().map_or(0, |(at, _)| *at),
    );
    let after_first: usize = snap.iter().skip(1).map(|(_, n)| n).sum();
    let snapshot_secs = ((last - first) as f64 / 1000.0).max(0.001);
    // Let the source switch to streaming before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;

    eprintln!("writing {rate} changes/s for {seconds} s…");
    let total = (u64::from(rate) * seconds) as usize;
    let progress = bar(total as u64, "written");
    let mut commits = Vec::with_capacity(total);
    let started = Instant::now();
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        writer.insert(n as i64).await?;
        commits.push(now_ms());
        progress.inc(1);
    }
    let write_secs = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    wait_queued(
        queue,
        "bench_stream.insert",
        total,
        Duration::from_secs(120),
        agent,
    )
    .await?;
    let received: Vec<i64> = queued(queue, "bench_stream.insert")?
        .into_iter()
        .map(|(at, _)| at)
        .collect();
    if received.len() != total {
        bail!(
            "{} stream events queued for {total} inserts",
            received.len()
        );
    }
    let mut latencies: Vec<i64> = received
        .iter()
        .zip(&commits)
        .map(|(queued, committed)| (queued - committed).max(0))
        .collect();
    latencies.sort_unstable();
    Ok(Figures {
        snapshot_secs,
        snapshot_rows: after_first,
        writes: total,
        write_secs,
        p50: percentile(&latencies, 50.0),
        p90: percentile(&latencies, 90.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or(0),
    })
}
