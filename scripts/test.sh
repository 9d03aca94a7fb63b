#!/usr/bin/env bash
# The whole test suite, from a fresh clone on Debian with Rust installed:
#   installs what the tests need (Python and the python-hl7 / hl7apy peers, in a venv under
#   target/), then runs fmt, clippy and every test, including the real-peer and kill -9 tests.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[test.sh] $*" >&2; }

# Real peers the tests start on loopback: Python (python-hl7, hl7apy) in a venv of ours,
# because Debian's own python3 is "externally managed"; PostgreSQL for the hub store and
# change capture; Chromium for the dashboard; dcmtk, Orthanc and pydicom/pynetdicom for
# the DICOM gateway; MariaDB and Firebird for change capture.
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null && command -v psql >/dev/null || need_apt+=(postgresql)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/storescp ] && [ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
[ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc orthanc-dicomweb)
command -v cc >/dev/null || need_apt+=(gcc)   # peers/bindlo.c keeps dcmtk's listeners on loopback
# Practice databases for change capture: MariaDB (binlog) and Firebird 3 (triggers).
[ -x /usr/sbin/mariadbd ] && command -v mariadb >/dev/null || need_apt+=(mariadb-server mariadb-client)
[ -x /usr/sbin/firebird ] && command -v isql-fb >/dev/null || need_apt+=(firebird3.0-server firebird3.0-utils)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  # Packages must not start services (they would listen on all interfaces).
  tmp_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    tmp_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  [ -z "$tmp_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

VENV=target/peers-venv
if ! "$VENV/bin/python" -c 'import hl7, hl7apy, pydicom, pynetdicom' 2>/dev/null; then
  log "creating $VENV with python-hl7, hl7apy, pydicom and pynetdicom"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'hl7==0.4.5' 'hl7apy==1.3.5' \
    'pydicom==3.0.2' 'pynetdicom==3.0.4'
fi
export OUTPOST_PYTHON="$PWD/$VENV/bin/python"
export PATH="$PWD/$VENV/bin:$PATH"   # python-hl7's mllp_send

# A one-shot build gains nothing from incremental state, which would double target/.
export CARGO_INCREMENTAL=0

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo test"
cargo test --workspace "$@"
