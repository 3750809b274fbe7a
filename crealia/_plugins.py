"""Plugin registries built from entry points when a server starts (no import-time globals).

Three groups, one mechanism:

- ``crealia.strategies`` holds conflict strategies (see :mod:`crealia._strategy`);
- ``crealia.alert_rules`` holds alert rules (see :mod:`crealia._alerts`);
- ``crealia.backplanes`` holds backplane factories (see :class:`crealia.abc.BackplaneFactory`),
  chosen by the scheme of ``Config.backplane_url``.

The built-ins register through the same groups, in crealia's own setup.cfg, as third-party plugins
do. The entry-point name is the public identifier; a strategy's or rule's object is a factory
called with the plugin's options mapping, a backplane's one called with the URL and the config.
A plugin that fails to load is kept out and reported with its distribution.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar, cast
from urllib.parse import urlsplit

import attrs

from ._alerts import AlertRule
from ._backplane import Backplane, BackplaneFactory
from ._errors import ConfigurationError
from ._strategy import ConflictStrategy

if TYPE_CHECKING:
    from ._config import Config

log = logging.getLogger("crealia.plugins")

STRATEGY_GROUP = "crealia.strategies"
ALERT_RULE_GROUP = "crealia.alert_rules"
BACKPLANE_GROUP = "crealia.backplanes"

#: The backplane of a server whose config names none: SQLite in ``Config.data_dir``.
DEFAULT_BACKPLANE_URL = "sqlite:"

StrategyFactory = Callable[[Mapping[str, Any]], ConflictStrategy]
AlertRuleFactory = Callable[[Mapping[str, Any]], AlertRule]

T = TypeVar("T", ConflictStrategy, AlertRule)


@attrs.frozen(kw_only=True)
class PluginInfo:
    """One discovered plugin: where it came from and whether it loaded."""

    name: str
    group: str
    target: str
    distribution: str
    version: str
    error: str | None = None


def load_entry_points(
    group: str, kind: str
) -> tuple[dict[str, Callable[[Mapping[str, Any]], Any]], list[PluginInfo]]:
    """Load every entry point of ``group`` (sorted by name): the callable ones as factories, and
    a :class:`PluginInfo` for each, with ``error`` set for those that failed to load or are not
    callable (``kind`` names the plugin in the log, e.g. ``"strategy"``). Never raises for a
    broken plugin: it must not stop the server."""
    factories: dict[str, Callable[[Mapping[str, Any]], Any]] = {}
    plugins: list[PluginInfo] = []
    for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        error: str | None = None
        try:
            factory = ep.load()
        except Exception as exc:  # a broken plugin must not stop the server
            error = f"{type(exc).__name__}: {exc}"
        else:
            if callable(factory):
                factories[ep.name] = factory
            else:
                error = f"{ep.value} is not callable"
        if error is not None:
            log.error("%s %r from %s %s failed to load: %s", kind, ep.name, dist, version, error)
        plugins.append(
            PluginInfo(
                name=ep.name,
                group=group,
                target=ep.value,
                distribution=dist,
                version=version,
                error=error,
            )
        )
    return factories, plugins


@attrs.define(eq=False)
class _Registry(Generic[T]):
    """Factories by public name, from one entry-point group and from code."""

    factories: dict[str, Callable[[Mapping[str, Any]], T]]
    plugins: list[PluginInfo]

    #: The entry-point group, what a plugin is called in messages, and what factories return.
    group: ClassVar[str]
    kind: ClassVar[str]
    product: ClassVar[type[Any]]

    @classmethod
    def discover(cls, extra: Mapping[str, Callable[[Mapping[str, Any]], T]] | None = None) -> Self:
        """Load every entry point of the registry's group, then add ``extra`` (programmatic
        registrations of an embedding program; they win over entry points of the same name)."""
        factories, plugins = load_entry_points(cls.group, cls.kind)
        for name, factory in (extra or {}).items():
            factories[name] = factory
            target = (
                f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', '?')}"
            )
            plugins.append(
                PluginInfo(
                    name=name,
                    group=cls.group,
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
        ConfigurationError: a name is not a loaded plugin (the message lists the known ones).
        """
        for name in names:
            if name not in self.factories:
                broken = [p for p in self.plugins if p.name == name and p.error]
                why = f" (it failed to load: {broken[0].error})" if broken else ""
                raise ConfigurationError(
                    f"unknown {self.kind} {name!r}{why}; known: {', '.join(self.names())}"
                )

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> T:
        """A new instance of plugin ``name`` with ``options``; its ``name`` is set to ``name``.

        Raises:
            ConfigurationError: unknown name, or the factory refused the options.
        """
        self.check([name])
        try:
            made: T = self.factories[name](dict(options or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{self.kind} {name!r}: {exc}") from exc
        # Not narrowed: isinstance against type[Any] would turn `made` into Any for mypy.
        is_product = isinstance(made, self.product)
        if not is_product:
            raise ConfigurationError(f"{self.kind} {name!r}: factory did not return a {self.kind}")
        made.name = name
        return made


@attrs.define(eq=False)
class StrategyRegistry(_Registry[ConflictStrategy]):
    """The conflict strategies this server can use, by name (group ``crealia.strategies``)."""

    group = STRATEGY_GROUP
    kind = "strategy"
    product = ConflictStrategy


@attrs.define(eq=False)
class AlertRuleRegistry(_Registry[AlertRule]):
    """The alert rules this server can evaluate, by name (group ``crealia.alert_rules``).

    A factory is called with the rule's options mapping (``Config.alert_options[name]``, or an
    empty one) and must return an :class:`~crealia._alerts.AlertRule`.
    """

    group = ALERT_RULE_GROUP
    kind = "alert rule"
    product = AlertRule

    def create_all(self, options: Mapping[str, Mapping[str, Any]] | None = None) -> list[AlertRule]:
        """One instance of every loaded rule, sorted by name, each with its ``options``.

        Raises:
            ConfigurationError: ``options`` names an unknown rule, or a factory refused its
                options.
        """
        options = options or {}
        self.check(sorted(options))
        return [self.create(name, options.get(name)) for name in self.names()]


@attrs.define(eq=False)
class BackplaneRegistry:
    """The backplanes this server can open, by URL scheme (group ``crealia.backplanes``).

    An entry point's name is the scheme it serves (``sqlite``, ``redis``); its factory may list
    more in a ``schemes`` attribute (``redis``: ``rediss``, ``unix``). An entry point's own
    name wins over another's listed scheme. Built when the server starts: nothing is loaded at
    import time.
    """

    factories: dict[str, BackplaneFactory]
    plugins: list[PluginInfo]
    #: Every known URL scheme and the entry point serving it.
    schemes: dict[str, str]

    @classmethod
    def discover(cls) -> Self:
        """Load every entry point of ``crealia.backplanes`` (a broken one is logged, kept out
        and reported when its scheme is asked for)."""
        loaded, plugins = load_entry_points(BACKPLANE_GROUP, "backplane")
        factories = cast(dict[str, BackplaneFactory], loaded)
        schemes = {name: name for name in factories}
        for plugin in plugins:
            schemes.setdefault(plugin.name, plugin.name)
        for name, factory in factories.items():
            for scheme in getattr(factory, "schemes", ()):
                schemes.setdefault(str(scheme).lower(), name)
        return cls(factories=factories, plugins=plugins, schemes=schemes)

    def resolve(self, url: str) -> str:
        """The entry point serving ``url``.

        Raises:
            ConfigurationError: ``url`` has no scheme or an unknown one (the message lists the
                known ones), or its plugin failed to load (the message names its distribution).
        """
        scheme = urlsplit(url).scheme.lower()
        known = ", ".join(sorted(self.schemes))
        if not scheme:
            raise ConfigurationError(
                f"backplane URL {url!r} has no scheme (the part before the colon, as in "
                f"sqlite:); known: {known}"
            )
        name = self.schemes.get(scheme)
        if name is None:
            raise ConfigurationError(
                f"backplane URL {url!r}: unknown scheme {scheme!r}; known: {known}"
            )
        if name not in self.factories:
            plugin = next(p for p in self.plugins if p.name == name)
            raise ConfigurationError(
                f"backplane {name!r} from {plugin.distribution} {plugin.version} failed to "
                f"load: {plugin.error}"
            )
        return name

    @asynccontextmanager
    async def open(self, url: str | None, config: Config) -> AsyncIterator[Backplane]:
        """Open the backplane ``url`` names (:data:`DEFAULT_BACKPLANE_URL` for ``None`` or an
        empty URL) for the ``async with`` block: its factory owns it, and closes it on exit.

        Raises:
            ConfigurationError: see :meth:`resolve`; or the factory refused the URL, or gave
                something that is not a :class:`~crealia.abc.Backplane`.
            TransportError, Overloaded: what the factory raises for a store it cannot reach.
        """
        url = url or DEFAULT_BACKPLANE_URL
        name = self.resolve(url)
        try:
            opening = self.factories[name](url, config)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"backplane {name!r}: {exc}") from exc
        async with opening as backplane:
            if not isinstance(backplane, Backplane):
                raise ConfigurationError(
                    f"backplane {name!r}: its factory gave a {type(backplane).__name__}, not a "
                    "crealia.abc.Backplane"
                )
            yield backplane
