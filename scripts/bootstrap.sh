#!/bin/sh
# Set up everything crealia needs from this checkout: system packages (when missing), a venv,
# and the package with its test and dev extras. Safe to run again; it only does what is missing.
# With --test it also sees to what only the tests use: Debian's chromium for the browser tests,
# Debian's postgresql for the PostgreSQL backplane's tests and haproxy for the test that runs
# deploy/haproxy.cfg (each installed when root; otherwise those tests skip, and this says what
# to install).
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# System packages the test suite drives for real. Empty entries are skipped.
SYSTEM_PACKAGES="${CREALIA_SYSTEM_PACKAGES:-redis-server}"

TEST_PACKAGES=""
if [ "${1:-}" = "--test" ]; then
    TEST_PACKAGES="${CREALIA_TEST_PACKAGES:-chromium postgresql haproxy}"
fi

need_apt=""
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "crealia needs Python 3.11 or newer as '$PYTHON' (set PYTHON=...)." >&2
    exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    need_apt="$need_apt python3-venv"
fi
for pkg in $SYSTEM_PACKAGES; do
    case "$pkg" in
        redis-server) command -v redis-server >/dev/null 2>&1 || need_apt="$need_apt redis-server" ;;
        chromium) command -v chromium >/dev/null 2>&1 || need_apt="$need_apt chromium" ;;
        *) dpkg -s "$pkg" >/dev/null 2>&1 || need_apt="$need_apt $pkg" ;;
    esac
done
for pkg in $TEST_PACKAGES; do
    case "$pkg" in
        # Debian keeps PostgreSQL's binaries off PATH, in /usr/lib/postgresql/<major>/bin.
        postgresql) have=$(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null | head -n 1 || true)
                    tests="PostgreSQL" ;;
        # In /usr/sbin, which a user's PATH may lack.
        haproxy) have=$(command -v haproxy 2>/dev/null || ls /usr/sbin/haproxy 2>/dev/null || true)
                 tests="HAProxy" ;;
        *) have=$(command -v "$pkg" 2>/dev/null || true); tests="browser" ;;
    esac
    if [ -z "$have" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            need_apt="$need_apt $pkg"
        else
            echo "note: the $tests tests will be skipped: they need $pkg (sudo apt-get install -y $pkg)" >&2
        fi
    fi
done
if [ -n "$need_apt" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages:$need_apt"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need_apt
    else
        echo "crealia needs these system packages: $need_apt" >&2
        echo "install them with: sudo apt-get install -y$need_apt" >&2
        exit 1
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.crealia-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$VENV/bin/python" -m pip install -q -e '.[test,dev]'
    touch "$stamp"
fi
