"""docs/protocol.md is the whole wire reference: nothing points elsewhere, and it names every
message type, close code and error code the server uses."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from crealia import _errors, _protocol

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"

#: Where a reader of the project could follow a reference.
_SCANNED = ("README.md", "CHANGELOG.md", "docs", "deploy", "crealia", "tests", "examples",
            "benchmarks", "plugins", "scripts")  # fmt: skip
#: The outside contract this project no longer refers to (spelled in pieces so this file passes).
_FOREIGN = ("../" + "shared", "PROTOCOL" + ".md")

#: Pushes the server sends; those built with ``envelope("...")`` are found in the code as well.
_PUSHES = {
    "welcome", "ack", "error", "pong", "collaboration_event", "users_list", "conflict_detected",
    "conflict_resolved", "welcome_chunk", "webrtc_signal", "quality_change", "metrics_sample",
    "alert", "security_alert",
}  # fmt: skip

#: Every close code the server sends.
_CLOSE_CODES = (1001, 1007, 1009, 1011, 1013, 4400, 4401, 4408, 4409, 4429)


def _files() -> list[Path]:
    files: list[Path] = []
    for name in _SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file())
    return [
        p
        for p in files
        if p.resolve() != Path(__file__).resolve()
        and "__pycache__" not in p.parts
        and p.suffix not in {".pyc", ".sqlite3"}
    ]


def test_no_reference_outside_the_project() -> None:
    files = _files()
    assert any(p.name == "protocol.md" for p in files)  # the scan sees the docs
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()[:80]}"
        for p in files
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if any(word in line for word in _FOREIGN)
    ]
    assert not found, "references to the outside contract:\n" + "\n".join(found)


def _pushes_in_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "crealia").rglob("*.py"):
        found.update(re.findall(r'envelope\("([a-z_]+)"', path.read_text()))
    return found


def test_doc_names_every_message_type() -> None:
    text = DOC.read_text()
    pushes = _pushes_in_code()
    assert {"welcome", "welcome_chunk", "conflict_detected", "error"} <= pushes  # the scan works
    names = set(_protocol.CLIENT_MESSAGES) | _PUSHES | pushes
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"docs/protocol.md does not name: {missing}"


def test_doc_names_every_close_code() -> None:
    text = DOC.read_text()
    missing = [code for code in _CLOSE_CODES if not re.search(rf"(?<!\d){code}(?!\d)", text)]
    assert not missing, f"docs/protocol.md does not name close codes: {missing}"


def test_doc_names_every_error_code() -> None:
    text = DOC.read_text()
    codes = {
        cls.code
        for _, cls in inspect.getmembers(_errors, inspect.isclass)
        if isinstance(getattr(cls, "code", None), str)
    }
    assert {"bad_request", "internal", "overloaded", "unsupported"} <= codes  # the scan works
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert not missing, f"docs/protocol.md does not name error codes: {missing}"
