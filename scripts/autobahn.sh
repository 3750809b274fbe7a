#!/bin/sh
# Install Autobahn|Testsuite's wstest for `make test-autobahn` (tests/test_autobahn.py), outside
# the tests (they run on a loopback-only network). wstest runs only on Python 2.7: CREALIA_PYTHON2
# names one, else python2.7 on PATH, else pyenv's 2.7. The package goes into
# test-artifacts/autobahn/py27 with that Python's pip (never into the project's venv); the
# Python found is written to test-artifacts/autobahn/python2 for the test. Safe to run again.
set -eu
cd "$(dirname "$0")/.."
DIR=test-artifacts/autobahn
PACKAGE="autobahntestsuite==25.10.1"

is_27() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; }

PY2=""
for candidate in "${CREALIA_PYTHON2:-}" "$(command -v python2.7 || true)" $HOME/.pyenv/versions/2.7*/bin/python; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && is_27 "$candidate"; then
        PY2="$candidate"
        break
    fi
done
if [ -z "$PY2" ]; then
    echo "test-autobahn needs a Python 2.7 for wstest: set CREALIA_PYTHON2, or install one" \
        "(pyenv install 2.7.18)." >&2
    exit 1
fi
mkdir -p "$DIR"
echo "$PY2" > "$DIR/python2"
if [ ! -f "$DIR/py27/autobahntestsuite/wstest.py" ]; then
    echo "installing $PACKAGE for $PY2 into $DIR/py27"
    "$PY2" -m pip install --disable-pip-version-check --quiet --target "$DIR/py27" "$PACKAGE"
fi
