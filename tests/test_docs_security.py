"""docs/security.md names every limit a server enforces: a new limit without a line there fails."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from crealia import Config

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"

#: Config fields that bound what a client, an owner or an attacker can make the server do.
_LIMIT = re.compile(
    r"^(max_|allowed_|preauth_|wal_|ops_|cluster_rate_|audit_)|_(timeout|bytes|chars)$"
    r"|^(outbox_|abuse_|history_|rate_limit|hello_)"
)


def test_security_doc_names_every_limit_setting() -> None:
    text = DOC.read_text()
    limits = [f.name for f in attrs.fields(Config) if _LIMIT.search(f.name)]
    assert len(limits) > 30  # the pattern still finds the limits
    missing = [name for name in limits if f"`{name}`" not in text]
    assert not missing, f"docs/security.md does not name: {missing}"


def test_security_doc_names_every_limit_environment_variable() -> None:
    from crealia._config import _ENV

    text = DOC.read_text()
    fields = {f.name for f in attrs.fields(Config) if _LIMIT.search(f.name)}
    missing = [var for var, field, _ in _ENV if field in fields and f"`{var}`" not in text]
    assert not missing, f"docs/security.md does not name: {missing}"
