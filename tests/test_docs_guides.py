"""The documentation set stays true to the code: the README links it, the user guide names every
setting, docs/api-reference.md is what its generator renders from the OpenAPI document, and the
metric names and log messages the guides tell operators to look for are the server's own."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import attrs
import httpx
import trio

from crealia import Config, _openapi, open_server
from crealia._config import _ENV

from .conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDE = DOCS / "user-guide.md"
TROUBLESHOOTING = DOCS / "troubleshooting.md"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "api_reference", ROOT / "scripts" / "api_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_what_the_generator_renders() -> None:
    rendered = _generator().render(_openapi.document())
    page = (DOCS / "api-reference.md").read_text()
    assert page == rendered, "docs/api-reference.md is stale: run python scripts/api_reference.py"


def test_api_reference_has_a_section_per_operation() -> None:
    page = (DOCS / "api-reference.md").read_text()
    operations = [f"### {method.upper()} {path}"
                  for path, item in _openapi.document()["paths"].items()
                  for method in item]  # fmt: skip
    assert len(operations) >= 18
    missing = [op for op in operations if op not in page.splitlines()]
    assert not missing, missing


def test_readme_links_the_documentation() -> None:
    readme = (ROOT / "README.md").read_text()
    links = set(re.findall(r"\]\(([^)#\s]+)\)", readme))
    wanted = {"docs/user-guide.md", "docs/troubleshooting.md", "docs/api-reference.md",
              "CHANGELOG.md", "docs/protocol.md", "docs/security.md"}  # fmt: skip
    assert wanted <= links, f"README.md does not link: {sorted(wanted - links)}"
    assert all((ROOT / link).is_file() for link in wanted)


def test_docs_links_point_to_files() -> None:
    for page in [*DOCS.glob("*.md"), ROOT / "README.md", ROOT / "CHANGELOG.md"]:
        for link in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links {link}, which is missing"


def test_user_guide_names_every_setting() -> None:
    text = GUIDE.read_text()
    fields = [f.name for f in attrs.fields(Config)]
    assert len(fields) > 60  # the scan sees the settings
    missing = [name for name in fields if f"`{name}`" not in text]
    assert not missing, f"docs/user-guide.md does not name: {missing}"


def test_user_guide_names_every_environment_variable() -> None:
    text = GUIDE.read_text()
    missing = sorted({var for var, _field, _kind in _ENV if f"`{var}`" not in text})
    assert not missing, f"docs/user-guide.md does not name: {missing}"


async def test_docs_name_only_metrics_the_server_exports(tmp_path: Path) -> None:
    async with open_server(make_config(tmp_path / "d")) as server, httpx.AsyncClient() as http:
        with trio.fail_after(10):
            exposition = (await http.get(f"{server.http_url}/metrics")).text
    families = set(re.findall(r"^# TYPE (\w+) ", exposition, re.MULTILINE))
    assert "crealia_fanout_latency_seconds" in families  # the scrape works
    exported = families | {f"{name}{suffix}" for name in families
                           for suffix in ("_total", "_bucket", "_sum", "_count")}  # fmt: skip
    for page in (TROUBLESHOOTING, GUIDE, ROOT / "README.md"):
        named = set(re.findall(r"\b((?:crealia|process)_[a-z_]+[a-z])\b", page.read_text()))
        unknown = sorted(named - exported)
        assert not unknown, f"{page.name} names metrics the server does not export: {unknown}"
    assert len(re.findall(r"\bcrealia_[a-z_]+", TROUBLESHOOTING.read_text())) > 30


def _templates() -> list[re.Pattern[str]]:
    """Every string the code could log or answer, as a pattern: each literal (adjacent ones are
    one) and f-string, ``%s``-style and ``{}`` placeholders matching anything."""
    placeholder = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfi]")
    patterns = []
    for path in (ROOT / "crealia").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = placeholder.split(node.value)
                patterns.append(".*".join(re.escape(p.replace("%%", "%")) for p in parts))
            elif isinstance(node, ast.JoinedStr):
                patterns.append("".join(
                    re.escape(v.value) if isinstance(v, ast.Constant) else ".*"
                    for v in node.values))  # fmt: skip
    # A template of placeholders and punctuation ("%s: %s") would match any message.
    worded = [p for p in patterns if len(re.sub(r"\.\*|\\.|\W", "", p)) >= 4]
    return [re.compile(p, re.DOTALL) for p in worded]


def _log_spans(text: str) -> list[str]:
    """The quoted log messages of troubleshooting.md: what is quoted in an "In the logs" list."""
    spans, in_logs = [], False
    for line in text.splitlines():
        if line.startswith("In the logs"):
            in_logs = True
        elif line.startswith(("In the audit log", "What to do", "#")):
            in_logs = False
        elif in_logs:
            spans += re.findall(r"`([^`]+)`", line)
    return spans


def test_troubleshooting_quotes_log_messages_the_code_writes() -> None:
    spans = _log_spans(TROUBLESHOOTING.read_text())
    assert len(spans) > 25  # the scan sees the quoted messages
    templates = _templates()
    assert not any(t.fullmatch("a message no code writes") for t in templates)
    # "…" stands for what the message fills in: the code's placeholder may match it empty.
    unknown = [span for span in spans
               if not any(t.fullmatch(span.replace("…", "")) for t in templates)]  # fmt: skip
    assert not unknown, f"docs/troubleshooting.md quotes messages the code never writes: {unknown}"


def test_troubleshooting_explains_every_close_code() -> None:
    text = TROUBLESHOOTING.read_text()
    for code in (1001, 1006, 1007, 1008, 1009, 1011, 1013, 4400, 4401, 4408, 4409, 4429):
        assert f"| {code} |" in text, code


def test_user_guide_config_file_example_loads(tmp_path: Path) -> None:
    (example,) = re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    path = tmp_path / "crealia.toml"
    path.write_text(example)
    config = Config.from_env({"OPENAI_API_KEY": "sk-test"}, config_file=path)
    assert config.alert_options["latency"] == {"warning": 150, "critical": 400}
    assert config.rate_limits == {"edit": "3000/500"}
    assert set(config.ai_providers) == {"default"}
