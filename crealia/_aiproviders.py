"""The operator's allow-list of AI providers: the only endpoints the ``ai`` strategy may call.

An outbound endpoint and its key are the operator's to choose, never a project's: a project's
``ai`` options may only *name* one of these providers and tune its model (among the provider's
``models``) and temperature (within ``0..max_temperature``). So no project owner can point the
server at an address of their choosing (SSRF) or have the operator's key sent there.

Configured as ``Config.ai_providers``, a mapping of name to settings, e.g. in the TOML file::

    [ai_providers.default]
    url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    models = ["gpt-4o-mini", "gpt-4o"]     # what a project may pick (default: [model])
    api_key_env = "OPENAI_API_KEY"          # or api_key = "..." (keep the file private)
    temperature = 0                         # the default, 0..max_temperature
    max_temperature = 1                     # what a project may ask for, 0..2

``CREALIA_AI_URL``/``CREALIA_AI_MODEL``/``CREALIA_AI_API_KEY`` define the provider ``default``
(when the table has none). The name ``offline`` is the built-in offline provider and cannot be
configured. Keys are kept out of ``repr``; nothing in crealia sends them anywhere but to their
provider's URL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from ._errors import ConfigurationError

#: The built-in provider that needs no configuration (and no network).
OFFLINE = "offline"
#: The offline provider's trained model: the file in the data dir that ``crealia strategies
#: train`` writes and the ``ai`` strategy loads (when there is none, the shipped one).
OFFLINE_MODEL_FILE = "ai-offline-model.json"
#: The provider CREALIA_AI_URL/_MODEL/_API_KEY define.
DEFAULT = "default"
#: The widest temperature range a provider may allow (OpenAI's).
TEMPERATURE_RANGE = (0.0, 2.0)

ENV_URL = "CREALIA_AI_URL"
ENV_MODEL = "CREALIA_AI_MODEL"
ENV_API_KEY = "CREALIA_AI_API_KEY"

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_MODEL = re.compile(r"[\x21-\x7e]{1,128}")
_KEYS = {"url", "model", "models", "api_key", "api_key_env", "temperature", "max_temperature"}


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (where keys hide), for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@attrs.frozen(kw_only=True)
class AIProviderSettings:
    """One allowed provider: an OpenAI-compatible chat-completions API."""

    name: str
    #: The API's base URL; requests go to ``{url}/chat/completions``.
    url: str = attrs.field(repr=redact_url)
    #: The model used unless a project picks another of ``models``.
    model: str
    #: The models a project may pick (``model`` is always one).
    models: tuple[str, ...]
    #: Sent as ``Authorization: Bearer <key>``; never shown.
    api_key: str | None = attrs.field(default=None, repr=False)
    temperature: float = 0.0
    #: The highest temperature a project may ask for.
    max_temperature: float = 1.0


def _number(name: str, key: str, raw: Any, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not low <= raw <= high:
        raise ConfigurationError(f"ai_providers.{name}.{key} must be a number in {low}..{high}")
    return float(raw)


def _one(name: str, raw: Any, environ: Mapping[str, str]) -> AIProviderSettings:
    if isinstance(raw, AIProviderSettings):
        return raw
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"ai_providers: provider names are 1..64 of a-z, 0-9, _ and -, got {str(name)[:40]!r}"
        )
    if name == OFFLINE:
        raise ConfigurationError(f"ai_providers: {OFFLINE!r} is the built-in offline provider")
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"ai_providers.{name} must be a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigurationError(
            f"ai_providers.{name}: unknown settings {', '.join(map(str, unknown))}; "
            f"known: {', '.join(sorted(_KEYS))}"
        )
    url = raw.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"ai_providers.{name}.url must be an http(s) URL")
    model = raw.get("model")
    if not isinstance(model, str) or not _MODEL.fullmatch(model):
        raise ConfigurationError(f"ai_providers.{name}.model must be a model name")
    models = raw.get("models", [model])
    if not isinstance(models, list | tuple) or not all(
        isinstance(m, str) and _MODEL.fullmatch(m) for m in models
    ):
        raise ConfigurationError(f"ai_providers.{name}.models must be a list of model names")
    if "api_key" in raw and "api_key_env" in raw:
        raise ConfigurationError(f"ai_providers.{name}: give api_key or api_key_env, not both")
    api_key = raw.get("api_key")
    if "api_key_env" in raw:
        variable = raw["api_key_env"]
        if not isinstance(variable, str) or not variable:
            raise ConfigurationError(f"ai_providers.{name}.api_key_env must name a variable")
        api_key = environ.get(variable)
        if not api_key:
            raise ConfigurationError(f"ai_providers.{name}.api_key_env: {variable} is not set")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ConfigurationError(f"ai_providers.{name}.api_key must be a non-empty string")
    high = _number(name, "max_temperature", raw.get("max_temperature", 1.0), *TEMPERATURE_RANGE)
    return AIProviderSettings(
        name=name,
        url=url.rstrip("/"),  # type: ignore[union-attr]
        model=model,
        models=tuple(dict.fromkeys([model, *models])),
        api_key=api_key,
        temperature=_number(name, "temperature", raw.get("temperature", 0.0), 0.0, high),
        max_temperature=high,
    )


def parse_ai_providers(
    raw: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> dict[str, AIProviderSettings]:
    """The allow-list from its configured form (settings objects pass through).

    ``api_key_env`` is read from ``environ`` (default: the process environment).

    Raises:
        ConfigurationError: a bad name, an unknown setting, a missing or bad url or model, a
            key variable that is not set; the message names the provider and the setting, never
            a key.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError("ai_providers must be a table of provider name to settings")
    env = os.environ if environ is None else environ
    return {name: _one(name, value, env) for name, value in raw.items()}


def default_from_env(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The ``default`` provider CREALIA_AI_URL/_MODEL/_API_KEY define, if the URL is set.

    Raises:
        ConfigurationError: CREALIA_AI_URL is set without CREALIA_AI_MODEL.
    """
    url = environ.get(ENV_URL)
    if not url:
        return None
    model = environ.get(ENV_MODEL)
    if not model:
        raise ConfigurationError(f"{ENV_URL} is set: {ENV_MODEL} must name the model")
    settings: dict[str, Any] = {"url": url, "model": model}
    if environ.get(ENV_API_KEY):
        settings["api_key"] = environ[ENV_API_KEY]
    return settings
