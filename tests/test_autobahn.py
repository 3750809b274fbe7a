"""Autobahn|Testsuite's ``fuzzingclient`` against both WebSocket endpoints: the reference RFC
6455 and RFC 7692 conformance run, through the conformance echo.

Opt-in, it takes 52 minutes on a 2-core machine for every case: ``make test-autobahn``
(``CREALIA_AUTOBAHN=1``, marker ``autobahn``). ``tests/test_rfc6455.py`` is the fast version
of the same categories in the default suite.

- **Python 2.7.** ``wstest`` runs only on Python 2.7: ``CREALIA_PYTHON2`` names one, else
  ``python2.7`` on ``PATH`` or pyenv's 2.7 (``~/.pyenv/versions/2.7*``). ``scripts/autobahn.sh``
  (run by ``make test-autobahn`` before pytest, which runs on a loopback-only network) installs
  ``autobahntestsuite`` 25.10.1 (with its own pins: Twisted 19.10, autobahn 0.10.9) with that
  Python's pip into ``test-artifacts/autobahn/py27``, never into the project's virtualenv.
  (Its docker image, ``crossbario/autobahn-testsuite``, would do where a docker daemon runs;
  this machine has the client and no daemon.)
- **The server.** ``crealia serve --conformance-echo`` with ``max_frame_bytes`` at its largest,
  16 MiB (cases 9.x send messages up to that), both endpoints of one process:
  ``ws://127.0.0.1:WS_PORT/conformance/echo`` (the fast path) and
  ``ws://127.0.0.1:HTTP_PORT/conformance/echo`` (hypercorn).
- **The verdict.** Every case of both agents must be rated ``OK``, ``NON-STRICT`` or
  ``INFORMATIONAL`` for its behaviour and its close (Autobahn's passes); ``FAILED``,
  ``WRONG CODE``, ``UNCLEAN`` or ``UNIMPLEMENTED`` fail the test, named. ``CREALIA_AUTOBAHN_CASES``
  picks cases (comma-separated, Autobahn's wildcards, e.g. ``1.*,7.*``; default every case).
  Autobahn's HTML reports go to ``test-artifacts/autobahn/reports/`` (``index.html``), the counts
  per agent to ``test-artifacts/autobahn/summary.json``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from crealia._echo import ECHO_PATH

from ._echoserver import echo_server

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "autobahn"
#: The largest ``max_frame_bytes``: 9.x sends messages of up to 16 MiB.
MAX_FRAME_BYTES = 16 << 20
#: Seconds the whole run may take (``CREALIA_AUTOBAHN_TIMEOUT``).
TIMEOUT = float(os.environ.get("CREALIA_AUTOBAHN_TIMEOUT", "7200"))
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}

pytestmark = [
    pytest.mark.autobahn,
    pytest.mark.skipif(
        os.environ.get("CREALIA_AUTOBAHN") != "1",
        reason="Autobahn|Testsuite runs with CREALIA_AUTOBAHN=1 (make test-autobahn)",
    ),
]


def wstest() -> tuple[str, Path]:
    """The Python 2.7 and the directory ``scripts/autobahn.sh`` installed wstest for (the
    tests run on a loopback-only network: nothing can be installed from here).

    Raises:
        pytest.fail.Exception: not installed (run ``make test-autobahn``, which installs it).
    """
    python = os.environ.get("CREALIA_PYTHON2") or _read(ARTIFACTS / "python2")
    site = ARTIFACTS / "py27"
    if not python or not (site / "autobahntestsuite" / "wstest.py").exists():
        pytest.fail("wstest is not installed: run make test-autobahn (scripts/autobahn.sh "
                    "installs it for a Python 2.7 first)")  # fmt: skip
    return python, site


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def test_autobahn_fuzzingclient_passes_on_both_endpoints(tmp_path: Path) -> None:
    python, site = wstest()
    reports = ARTIFACTS / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    cases = [c.strip() for c in os.environ.get("CREALIA_AUTOBAHN_CASES", "*").split(",")]
    with echo_server(tmp_path, MAX_FRAME_BYTES) as server:
        agents = {"crealia-fast-path": server.ws_port, "crealia-hypercorn": server.http_port}
        spec = {
            "outdir": str(reports),
            "servers": [
                {"agent": agent, "url": f"ws://127.0.0.1:{port}{ECHO_PATH}"}
                for agent, port in agents.items()
            ],
            "cases": cases,
            "exclude-cases": [],
            "exclude-agent-cases": {},
        }
        spec_path = tmp_path / "fuzzingclient.json"
        spec_path.write_text(json.dumps(spec))
        # site.addsitedir, not PYTHONPATH: zope.interface is a namespace package (a .pth file).
        script = ("import site, sys; site.addsitedir(sys.argv[1]); "
                  "sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', sys.argv[2]]; "
                  "from autobahntestsuite import wstest; wstest.run()")  # fmt: skip
        log = ARTIFACTS / "wstest.log"
        with log.open("w") as out:
            run = subprocess.run([python, "-c", script, str(site), str(spec_path)], cwd=tmp_path,
                                 stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT)  # fmt: skip
        assert run.returncode == 0, f"wstest exited {run.returncode}: see {log}"
    index = json.loads((reports / "index.json").read_text())
    assert sorted(index) == sorted(agents), index.keys()
    summary: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    for agent, results in sorted(index.items()):
        counted = collections.Counter(r["behavior"] for r in results.values())
        summary[agent] = {"cases": len(results), **counted}
        for name, result in sorted(results.items(), key=lambda item: _key(item[0])):
            if result["behavior"] not in PASSING or result["behaviorClose"] not in PASSING:
                code = result.get("remoteCloseCode")
                failures.append(f"{agent} {name}: {result['behavior']}, close "
                                f"{result['behaviorClose']} (code {code})")  # fmt: skip
    (ARTIFACTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("Autobahn|Testsuite:", json.dumps(summary))
    assert len({counts["cases"] for counts in summary.values()}) == 1, summary
    assert not failures, "\n".join(failures)


def _key(name: str) -> list[int]:
    return [int(part) for part in name.split(".")]
