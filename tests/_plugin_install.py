"""Installing the example plugins of ``plugins/`` into this venv, for the tests that discover
them through their entry points."""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def plugin_metadata(plugin: Path) -> tuple[str, str]:
    parser = configparser.ConfigParser()
    parser.read(plugin / "setup.cfg")
    return parser["metadata"]["name"], parser["metadata"]["version"]


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def can_build_without_isolation() -> bool:
    """setuptools builds wheels by itself from 70.1 on; before that it needs ``wheel``."""
    version = installed_version("setuptools") or "0.0"
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def install_plugin(plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """pip-install the plugin package at ``plugin`` (unless this version is installed already):
    its (distribution name, version)."""
    name, version = plugin_metadata(plugin)
    if installed_version(name) != version:
        # Build from a copy so the work tree gets no build/ or *.egg-info.
        source = tmp_path_factory.mktemp("plugin") / plugin.name
        shutil.copytree(
            plugin, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        )
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "-q"]
        if can_build_without_isolation():
            command.append("--no-build-isolation")
        result = subprocess.run(
            [*command, str(source)], capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
        importlib.invalidate_caches()
        assert installed_version(name) == version
    return name, version
