#!/usr/bin/env bash
# MariaDB 10.11 by hand (--no-defaults, ignores /etc/mysql) on 127.0.0.1:${MARIADB_PORT:-3307}; datadir,
# socket, error log under $DATA/mariadb; binlog in ROW format with full row images (change capture
# tests).  root@localhost has no password; user peer/peerpw owns DB peerdb.  The port it listens on is
# written to $DATA/mariadb/port (a server already running keeps its port).
# usage: start-mariadb.sh [DATA_DIR]   stop: stop-peer.sh mariadb [DATA_DIR]
source "$(dirname "$0")/common.sh" "$@"
PORT=${MARIADB_PORT:-3307}; D=$DATA/mariadb
ensure_apt mariadb-server mariadb-client
already_running "$D/mariadb.pid"
mkdir -p "$D"; chown mysql:mysql "$D"           # every parent dir must be traversable by mysql
if [ ! -d "$D/data/mysql" ]; then
  mariadb-install-db --no-defaults --user=mysql --datadir="$D/data" --auth-root-authentication-method=normal \
    --skip-test-db >"$D/install-db.log" 2>&1
fi
# Test speed over durability: the redo log and the binlog are not fsync'd on every commit.
spawn "$D/mariadb.pid" "$D/stdout.log" /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$D/data" \
  --bind-address=127.0.0.1 --port="$PORT" --socket="$D/mysqld.sock" --pid-file="$D/mariadbd.pid" \
  --log-error="$D/error.log" --skip-name-resolve --innodb-buffer-pool-size=64M \
  --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 --character-set-server=utf8mb4 \
  --log-bin="$D/data/binlog" --binlog-format=ROW --binlog-row-image=FULL --server-id=1
M() { mariadb --no-defaults -h127.0.0.1 -P"$PORT" -uroot "$@"; }
wait_for 30 "$D/mariadb.pid" mariadb-admin --no-defaults -h127.0.0.1 -P"$PORT" -uroot ping
M -e "create database if not exists peerdb; create user if not exists 'peer'@'127.0.0.1' identified by 'peerpw';
      grant all on peerdb.* to 'peer'@'127.0.0.1'; grant replication slave, replication client on *.* to 'peer'@'127.0.0.1';"
echo "$PORT" >"$D/port"
cat "$D/mariadb.pid"
