"""Plugin registries built from entry points when a server starts (no import-time globals).

``crealia.strategies`` holds conflict strategies (see :mod:`crealia._strategy`); the built-ins
register through the same group, in crealia's own setup.cfg, as third-party plugins do. The
entry-point name is the public identifier; its object is a factory called with the strategy's
options mapping. A plugin that fails to load is kept out and reported with its distribution.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._errors import ConfigurationError
from ._strategy import ConflictStrategy

log = logging.getLogger("crealia.plugins")

STRATEGY_GROUP = "crealia.strategies"

StrategyFactory = Callable[[Mapping[str, Any]], ConflictStrategy]


@attrs.frozen(kw_only=True)
class PluginInfo:
    """One discovered plugin: where it came from and whether it loaded."""

    name: str
    group: str
    target: str
    distribution: str
    version: str
    error: str | None = None


@attrs.define(eq=False)
class StrategyRegistry:
    """The strategies this server can use, by name."""

    factories: dict[str, StrategyFactory]
    plugins: list[PluginInfo]

    @classmethod
    def discover(cls, extra: Mapping[str, StrategyFactory] | None = None) -> StrategyRegistry:
        """Load every ``crealia.strategies`` entry point, then add ``extra`` (programmatic
        registrations of an embedding program; they win over entry points of the same name)."""
        factories: dict[str, StrategyFactory] = {}
        plugins: list[PluginInfo] = []
        for ep in sorted(importlib.metadata.entry_points(group=STRATEGY_GROUP),
                         key=lambda e: e.name):  # fmt: skip
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                factory = ep.load()
            except Exception as exc:  # a broken plugin must not stop the server
                error = f"{type(exc).__name__}: {exc}"
                log.error("strategy %r from %s %s failed to load: %s", ep.name, dist, version,
                          error)  # fmt: skip
                plugins.append(
                    PluginInfo(
                        name=ep.name,
                        group=STRATEGY_GROUP,
                        target=ep.value,
                        distribution=dist,
                        version=version,
                        error=error,
                    )
                )
                continue
            if not callable(factory):
                error = f"{ep.value} is not callable"
                plugins.append(
                    PluginInfo(
                        name=ep.name,
                        group=STRATEGY_GROUP,
                        target=ep.value,
                        distribution=dist,
                        version=version,
                        error=error,
                    )
                )
                continue
            factories[ep.name] = factory
            plugins.append(PluginInfo(name=ep.name, group=STRATEGY_GROUP, target=ep.value,
                                      distribution=dist, version=version))  # fmt: skip
        for name, factory in (extra or {}).items():
            factories[name] = factory
            target = (
                f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', '?')}"
            )
            plugins.append(
                PluginInfo(
                    name=name,
                    group=STRATEGY_GROUP,
                    target=target,
                    distribution="(registered in code)",
                    version="-",
                )
            )
        return cls(factories=factories, plugins=plugins)

    def names(self) -> list[str]:
        return sorted(self.factories)

    def check(self, names: list[str]) -> None:
        """Raises:
        ConfigurationError: a name is not a loaded strategy (the message lists the known ones).
        """
        for name in names:
            if name not in self.factories:
                broken = [p for p in self.plugins if p.name == name and p.error]
                why = f" (it failed to load: {broken[0].error})" if broken else ""
                raise ConfigurationError(
                    f"unknown strategy {name!r}{why}; known: {', '.join(self.names())}"
                )

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> ConflictStrategy:
        """A new instance of strategy ``name`` with ``options``.

        Raises:
            ConfigurationError: unknown name, or the factory refused the options.
        """
        self.check([name])
        try:
            strategy = self.factories[name](dict(options or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"strategy {name!r}: {exc}") from exc
        if not isinstance(strategy, ConflictStrategy):
            raise ConfigurationError(f"strategy {name!r}: factory did not return a strategy")
        strategy.name = name
        return strategy
