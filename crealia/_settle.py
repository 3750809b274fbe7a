"""Running a project's strategy chain on its conflicts.

The :class:`Settler` keeps each project's chain (from the project's settings, else the server's
config) and runs it on a conflict in the room's nursery: each strategy under a deadline, a
decline or a failure handing on to the next, a deferral waiting for a person (and handing on
after the deferring strategy's ``timeout``, if it has one). A resolution is committed with the
version the strategy saw; if the property moved meanwhile the backplane detects the conflict
again and the chain runs once more on the new one (a few times at most).

What a project's owner may set is bounded: at most :data:`MAX_CHAIN` strategies, each once, a
deferring strategy without a timeout only last, at most :data:`MAX_OPTIONS_BYTES` of options
(each strategy refuses unknown options and values outside its documented ranges).

No strategy's answer is trusted blindly (a plugin's or a model's): :meth:`Settler.check` holds a
resolution to what a client's own write must hold (a JSON value within the protocol's depth and
a frame's size, of the kind of the two sides; ``current``/``incoming`` the side's own value) and
makes its explanation length-capped plain text. A resolution that fails is a decline: the next
strategy tries.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import orjson
import trio

from . import _wire
from ._audit import AuditLog
from ._backplane import Backplane
from ._config import Config
from ._document import ConflictSpec
from ._errors import BadRequest, ConfigurationError, NotFound, ProtocolError, TooLarge
from ._model import Conflict, Resolution, settings_changed
from ._plugins import StrategyRegistry
from ._room import Room
from ._sequencing import new_conflict
from ._strategy import (
    DECLINE,
    DEFER,
    MAX_PARTS,
    ConflictStrategy,
    Part,
    Participant,
    ResolutionContext,
    Split,
    plain_text,
)

log = logging.getLogger("crealia.strategies")

#: How many times a conflict may be detected again while being settled before it is left to a
#: person.
MAX_REDETECTIONS = 3
#: Most strategies in a chain.
MAX_CHAIN = 8
#: Largest options of a chain, all strategies together, as JSON bytes.
MAX_OPTIONS_BYTES = 16 * 1024
#: Longest explanation kept from a strategy, in characters (longer ones are clipped).
MAX_EXPLANATION_CHARS = 1000

_KINDS = {str: "text", bool: "boolean", int: "number", float: "number", dict: "object",
          list: "array", type(None): "null"}  # fmt: skip


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


#: Strategies' resolutions under this confidence are marked for review. Measured on a corpus of
#: real edits, clean merges between 0.8 and 0.9 were right 83 % of the time, above 0.9 99 %.
REVIEW_BELOW = 0.9


def needs_review(conflict: Conflict, resolution: Resolution) -> bool:
    """Whether a person should look at a strategy's resolution: its confidence is under
    :data:`REVIEW_BELOW`, or it is ``priority`` picking a side between two different values
    (a pick is one side verbatim: right only when the other side did not matter)."""
    if resolution.confidence < REVIEW_BELOW:
        return True
    disagree = not _same_json(conflict.current.get("value"), conflict.incoming.get("value"))
    return resolution.strategy == "priority" and disagree


def custom_value_problem(conflict: Conflict, value: Any) -> str | None:
    """Why ``value`` cannot settle ``conflict`` as a custom value, by a strategy or a person:
    it must be of the kind of one of the two sides (for a conflicting delete: null or an
    object). None when it can."""
    if conflict.op == "delete":
        kinds = {"null", "object"}
    else:
        kinds = {_kind(conflict.current.get("value")), _kind(conflict.incoming.get("value"))}
    if _kind(value) in kinds:
        return None
    return f"must be {' or '.join(sorted(kinds))} like the two sides, got {_kind(value)}"


@attrs.frozen(kw_only=True)
class Chain:
    """A project's strategies, in order, with their options."""

    names: list[str]
    options: dict[str, dict[str, Any]]
    strategies: list[ConflictStrategy]
    #: "Ask a person when unsure": a strategy's resolution that needs review is not applied;
    #: the conflict waits for a person instead.
    ask_when_unsure: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"strategies": self.names, "options": self.options,
                "ask_when_unsure": self.ask_when_unsure}  # fmt: skip


def build_chain(
    registry: StrategyRegistry,
    config: Config,
    names: list[str],
    options: Mapping[str, Mapping[str, Any]],
    *,
    ask_when_unsure: bool = False,
) -> Chain:
    """A chain of new strategy instances from ``registry`` (the server's options in ``config``
    under the chain's own). Pure: checking a configuration (``crealia check-config``) needs no
    running server.

    Raises:
        ConfigurationError: an unknown strategy, or options a strategy refuses.
    """
    if not names:
        raise ConfigurationError("a strategy chain needs at least one strategy")
    if len(names) > MAX_CHAIN:
        raise ConfigurationError(
            f"a strategy chain holds at most {MAX_CHAIN} strategies, got {len(names)}"
        )
    registry.check(names)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigurationError(f"a strategy may appear once in a chain: {', '.join(twice)}")
    stray = sorted(set(options) - set(names))
    if stray:
        raise ConfigurationError(f"options given for strategies not in the chain: {stray}")
    try:
        size = len(orjson.dumps(dict(options)))
    except TypeError as exc:
        raise ConfigurationError(f"options must be JSON: {exc}") from None
    if size > MAX_OPTIONS_BYTES:
        raise ConfigurationError(
            f"options are {size} bytes of JSON, over the limit of {MAX_OPTIONS_BYTES}"
        )
    merged = {
        name: {**config.strategy_options.get(name, {}), **options.get(name, {})} for name in names
    }
    strategies = [registry.create(name, merged[name]) for name in names]
    for name, strategy in zip(names, strategies, strict=True):
        try:
            strategy.configure(config)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"strategy {name!r}: {exc}") from None
    for name, strategy in zip(names[:-1], strategies[:-1], strict=True):
        if strategy.defers and strategy.timeout is None:
            raise ConfigurationError(
                f"strategy {name!r} waits for a person without a timeout, so the strategies "
                f"after it would never run: give it a timeout or put it last"
            )
    return Chain(names=list(names), options={k: dict(v) for k, v in options.items()},
                 strategies=strategies, ask_when_unsure=ask_when_unsure)  # fmt: skip


async def _close_chains(chains: list[Chain]) -> None:
    """Release what the chains' strategies hold (the ``ai`` strategy's HTTP client); bounded
    and shielded, failures logged."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        for chain in chains:
            for strategy in chain.strategies:
                close = getattr(strategy, "aclose", None)
                if close is not None:
                    try:
                        await close()
                    except Exception:
                        log.exception("closing strategy %s", strategy.name)


@attrs.define(eq=False)
class Settler:
    """Builds chains from the registry and runs them on conflicts."""

    registry: StrategyRegistry
    backplane: Backplane
    config: Config
    #: Where strategies' resolutions are audited (set by the server).
    audit: AuditLog | None = None
    _chains: dict[str, Chain] = attrs.Factory(dict)
    #: Forgotten chains holding something to release (an ``ai`` strategy's HTTP client):
    #: closed at the settler's next use of a chain, so at most the few forgotten since.
    _retired: list[Chain] = attrs.Factory(list)
    #: Names this settler in the "settings changed" notices it publishes (it ignores its own).
    token: str = attrs.Factory(lambda: secrets.token_hex(8))
    #: Times a cached chain was dropped because another process changed it, or its room closed.
    forgotten: int = 0

    def build(
        self,
        names: list[str],
        options: Mapping[str, Mapping[str, Any]],
        *,
        ask_when_unsure: bool = False,
    ) -> Chain:
        """A chain of new strategy instances (:func:`build_chain`).

        Raises:
            ConfigurationError: an unknown strategy, or options a strategy refuses.
        """
        return build_chain(self.registry, self.config, names, options,
                           ask_when_unsure=ask_when_unsure)  # fmt: skip

    async def chain(self, project_id: str) -> Chain:
        """The project's chain (its stored settings, else the server's default)."""
        if self._retired:
            retired, self._retired = self._retired, []
            await _close_chains(retired)
        chain = self._chains.get(project_id)
        if chain is None:
            settings = await self.backplane.get_settings(project_id)
            names = settings.get("strategies") or list(self.config.strategy_chain)
            ask = settings.get("ask_when_unsure") is True
            try:
                chain = self.build(names, settings.get("options") or {}, ask_when_unsure=ask)
            except ConfigurationError as exc:
                # A stored chain that no longer loads (a plugin was uninstalled): fall back.
                log.error("project %s: %s; using the default chain", project_id, exc)
                chain = self.build(list(self.config.strategy_chain), {}, ask_when_unsure=ask)
            self._chains[project_id] = chain
        return chain

    async def set_chain(
        self,
        project_id: str,
        names: list[str],
        options: Mapping[str, Mapping[str, Any]],
        *,
        ask_when_unsure: bool = False,
    ) -> Chain:
        """Validate, store and use a new chain for the project.

        Raises:
            ConfigurationError: unknown strategy or bad options (nothing is stored).
        """
        chain = self.build(names, options, ask_when_unsure=ask_when_unsure)
        settings = await self.backplane.get_settings(project_id)
        settings.update(chain.to_wire())
        await self.backplane.set_settings(project_id, settings)
        old = self._chains.get(project_id)
        self._chains[project_id] = chain
        # Every process with the project's room open drops its copy (Room.on_ephemeral).
        await self.backplane.publish(settings_changed(project_id, self.token))
        if old is not None:
            await _close_chains([old])
        return chain

    def forget(self, project_id: str, *, by: str | None = None) -> None:
        """Drop the project's cached chain (it is read from the stored settings at its next
        use): another process changed it (``by``: that settler's token; our own notice is
        ignored), or the project's room closed, after which no notice would reach us."""
        if by == self.token:
            return
        chain = self._chains.pop(project_id, None)
        if chain is not None:
            self.forgotten += 1
            if any(hasattr(strategy, "aclose") for strategy in chain.strategies):
                self._retired.append(chain)

    async def aclose(self) -> None:
        """Release what strategies hold (HTTP clients of the AI strategy); bounded, shielded."""
        chains, self._chains = [*self._chains.values(), *self._retired], {}
        self._retired = []
        await _close_chains(chains)

    async def first(self, project_id: str) -> str:
        return (await self.chain(project_id)).names[0]

    async def run(self, room: Room, conflict: Conflict) -> None:
        """Settle ``conflict`` (and what it turns into). Runs as a task of the room's nursery;
        never raises but for cancellation."""
        current: Conflict | None = conflict
        rounds = 0
        while current is not None and rounds <= MAX_REDETECTIONS:
            rounds += 1
            try:
                current = await self._run_chain(room, current)
            except ProtocolError as exc:  # storage trouble: it stays pending for next time
                log.warning("conflict %s stays pending: %s", conflict.id, exc)
                return

    async def _run_chain(self, room: Room, conflict: Conflict) -> Conflict | None:
        chain = await self.chain(conflict.project_id)
        for index, (name, strategy) in enumerate(zip(chain.names, chain.strategies, strict=True)):
            context = self._context(room, conflict, chain.options.get(name, {}))
            answer: Any = await self._ask(name, strategy, conflict, context)
            parts: list[dict[str, Any]] = []
            if answer is None or answer is DECLINE:
                joined = await self._in_parts(room, chain, index, conflict, context)
                answer, parts = joined if joined is not None else (DECLINE, [])
            if answer is DEFER:
                timeout = getattr(strategy, "timeout", None)
                with trio.move_on_after(math.inf if timeout is None else timeout):
                    await room.wait_settled(conflict.id)
                    return None
                if not room.is_pending(conflict.id):
                    return None
                continue
            if not isinstance(answer, Resolution):
                if answer is not DECLINE:
                    log.error("strategy %s answered %r: treated as a decline", name, answer)
                continue
            try:
                answer = self.check(conflict, answer, name, parts)
            except ValueError as exc:
                log.warning("strategy %s: resolution of conflict %s refused (%s): next one",
                            name, conflict.id, exc)  # fmt: skip
                continue
            if chain.ask_when_unsure and answer.review:
                log.info("conflict %s waits for a person: %s was unsure (confidence %.2f)",
                         conflict.id, name, answer.confidence)  # fmt: skip
                if self.audit is not None:
                    self.audit.record(
                        "conflict_held", user_id=None, project_id=conflict.project_id,
                        resource=f"conflict:{conflict.id}",
                        details={"strategy": name, "choice": answer.choice,
                                 "confidence": answer.confidence},
                    )  # fmt: skip
                await room.wait_settled(conflict.id)
                return None
            author = str(conflict.incoming.get("user_id"))
            try:
                settled = await self.backplane.settle(
                    conflict.project_id,
                    conflict.id,
                    answer,
                    by=author,
                    writer=author,
                    expect_seq=conflict.current.get("seq"),
                )
            except NotFound:
                return None  # a person settled it first
            except (BadRequest, TooLarge) as exc:
                # An answer a client could not write either (over a quota): the next strategy.
                log.warning("strategy %s's resolution of %s refused: %s", name, conflict.id,
                            exc.message)  # fmt: skip
                continue
            except ProtocolError:
                raise
            except Exception:
                # A plugin's value the store cannot take (not JSON), say: the conflict stays
                # pending for a person rather than costing the room.
                log.exception("could not apply %s's resolution of %s", name, conflict.id)
                return None
            if self.audit is not None:
                self.audit.record(
                    "conflict_resolution", user_id=None, project_id=conflict.project_id,
                    resource=f"conflict:{conflict.id}",
                    details={"strategy": name, "choice": answer.choice, "author": author,
                             "confidence": answer.confidence, "seq": settled.seq,
                             **({"parts": parts} if parts else {})},
                )  # fmt: skip
            return settled.redetected
        return None

    def check(
        self,
        conflict: Conflict,
        answer: Resolution,
        name: str,
        parts: list[dict[str, Any]] | None = None,
    ) -> Resolution:
        """``answer`` held to what a client's own write must hold, signed ``name``, with its
        explanation made plain text, marked for review when it (or one of the ``parts`` it was
        put together from, see :meth:`_in_parts`) needs a person.

        This is where the limits on a written value apply to a strategy's: the protocol's depth
        (:func:`crealia._wire.check_json_value`) and a client frame's size
        (``Config.max_frame_bytes``); a per-value quota belongs here too.

        Raises:
            ValueError: the value breaks one of them (the caller declines it).
        """
        value = answer.value
        if answer.choice in ("current", "incoming"):
            side = conflict.current if answer.choice == "current" else conflict.incoming
            if not _same_json(value, side.get("value")):
                raise ValueError(f"choice {answer.choice!r} must carry that side's value")
        else:
            _wire.check_json_value(value)
            try:
                size = len(orjson.dumps(value))
            except TypeError as exc:
                raise ValueError(f"the value is not JSON: {exc}") from None
            if size > self.config.max_frame_bytes:
                raise ValueError(
                    f"the value is {size} bytes of JSON, more than a client may write "
                    f"({self.config.max_frame_bytes})"
                )
            problem = custom_value_problem(conflict, value)
            if problem is not None:
                raise ValueError(f"a custom value {problem}")
        explanation = answer.explanation if isinstance(answer.explanation, str) else ""
        signed = attrs.evolve(
            answer, strategy=name, explanation=plain_text(explanation, MAX_EXPLANATION_CHARS)
        )
        review = needs_review(conflict, signed) or any(part["review"] for part in parts or ())
        return attrs.evolve(signed, review=review)

    async def _in_parts(
        self,
        room: Room | None,
        chain: Chain,
        index: int,
        conflict: Conflict,
        context: ResolutionContext,
    ) -> tuple[Resolution, list[dict[str, Any]]] | None:
        """After ``chain.strategies[index]`` declined ``conflict``: its split of the conflict
        (:meth:`ConflictStrategy.split`), each colliding part settled by the first strategy
        after it that resolves that part, put together; with what settled each part (``{"part",
        "strategy", "choice", "confidence", "review"}``, for the audit). ``None`` when it did
        not split, or a part was deferred to a person or settled by none (then the whole
        conflict goes on down the chain)."""
        rest = list(zip(chain.names, chain.strategies, strict=True))[index + 1 :]
        if not rest:
            return None
        name = chain.names[index]
        strategy = chain.strategies[index]
        split = await self._bounded(name, conflict, lambda: strategy.split(conflict, context))
        if not isinstance(split, Split) or not 0 < len(split.parts) <= MAX_PARTS:
            return None
        answers: list[Resolution] = []
        parts: list[dict[str, Any]] = []
        # All parts together within twice one strategy's deadline: a split must not cost more
        # than the whole conflict would, give or take.
        with trio.move_on_after(2 * self.config.strategy_timeout) as scope:
            for part in split.parts:
                answer_for = await self._settle_part(room, chain, rest, part)
                if answer_for is None:
                    return None
                checked, name = answer_for
                answers.append(checked)
                parts.append({
                    "part": part.label, "strategy": name, "choice": checked.choice,
                    "confidence": checked.confidence, "review": checked.review,
                })  # fmt: skip
        if scope.cancelled_caught:
            log.warning("conflict %s: its %d parts took too long: not split", conflict.id,
                        len(split.parts))  # fmt: skip
            return None
        joined = split.join(tuple(answers))
        return None if joined is None else (joined, parts)

    async def _settle_part(
        self,
        room: Room | None,
        chain: Chain,
        rest: list[tuple[str, ConflictStrategy]],
        part: Part,
    ) -> tuple[Resolution, str] | None:
        """The first checked resolution of ``part`` by the strategies of ``rest``, with the
        strategy's name; None when one defers it to a person or none settles it."""
        for name, strategy in rest:
            context = self._context(room, part.conflict, chain.options.get(name, {}))
            answer = await self._ask(name, strategy, part.conflict, context)
            if answer is DEFER:
                return None
            if not isinstance(answer, Resolution):
                continue
            try:
                return self.check(part.conflict, answer, name), name
            except ValueError:
                continue
        return None

    async def preview(
        self, project_id: str, found: Mapping[str, Any], roles: dict[str, str], room: Room | None
    ) -> dict[str, Any]:
        """What each strategy of the project's chain would answer to a conflict a dry run
        found (``found``: one of its ``conflicts``), applying nothing: ``{"strategies":
        [{"strategy", "answer": "resolved"|"declined"|"deferred"|"failed", "resolution"?}],
        "settled_by"}``, the first that would settle or wait for a person (None: none would).
        Each answer is under the strategy deadline; an ``ai`` strategy asks its provider."""
        spec = ConflictSpec(op=found["op"], element_id=found["element_id"], prop=found["prop"],
                            base=found["base"], base_value=found["base_value"],
                            current=found["current"], incoming=found["incoming"])  # fmt: skip
        chain = await self.chain(project_id)
        conflict = new_conflict(project_id, spec, int(time.time() * 1000), chain.names[0],
                                roles)  # fmt: skip
        answers: list[dict[str, Any]] = []
        settled_by: str | None = None
        for index, (name, strategy) in enumerate(zip(chain.names, chain.strategies, strict=True)):
            context = self._context(room, conflict, chain.options.get(name, {}))
            answer = await self._ask(name, strategy, conflict, context)
            parts: list[dict[str, Any]] = []
            if answer is None or answer is DECLINE:
                joined = await self._in_parts(room, chain, index, conflict, context)
                if joined is not None:
                    answer, parts = joined
            entry: dict[str, Any] = {"strategy": name, "answer": "failed"}
            if answer is DEFER:
                entry["answer"] = "deferred"
            elif isinstance(answer, Resolution):
                try:
                    checked = self.check(conflict, answer, name, parts)
                except ValueError:
                    pass  # "failed": a resolution the chain would refuse
                else:
                    entry.update(answer="resolved", resolution=checked.to_wire())
                    if parts:
                        entry["parts"] = parts
                    if chain.ask_when_unsure and checked.review:
                        entry["held"] = True  # it would wait for a person instead
            elif answer is not None:
                entry["answer"] = "declined"
            answers.append(entry)
            if settled_by is None and entry["answer"] in ("resolved", "deferred"):
                settled_by = name
        return {"strategies": answers, "settled_by": settled_by}

    async def _ask(
        self, name: str, strategy: ConflictStrategy, conflict: Conflict, context: ResolutionContext
    ) -> Any:
        """``strategy``'s answer, under the strategy deadline; None when it raised or ran out
        of time (logged)."""
        return await self._bounded(name, conflict, lambda: strategy.resolve(conflict, context))

    async def _bounded(
        self, name: str, conflict: Conflict, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        """``await call()`` of strategy ``name`` under the strategy deadline; None when it
        raised or ran out of time (logged)."""
        with trio.move_on_after(self.config.strategy_timeout) as scope:
            try:
                return await call()
            except Exception:
                log.exception("strategy %s failed on conflict %s", name, conflict.id)
                return None
        if scope.cancelled_caught:
            log.warning("strategy %s took longer than %.1f s on conflict %s: next one",
                        name, self.config.strategy_timeout, conflict.id)  # fmt: skip
        return None

    def _context(
        self, room: Room | None, conflict: Conflict, options: Mapping[str, Any]
    ) -> ResolutionContext:
        def participant(side: dict[str, Any], at: int | None) -> Participant:
            user_id = side.get("user_id")
            members = room.members if room is not None else {}
            member = members.get(str(user_id)) if user_id is not None else None
            active = member.active_element.get("element_id") if member and \
                member.active_element else None  # fmt: skip
            role = member.role if member else conflict.roles.get(str(user_id))
            return Participant(user_id=user_id, role=role, active_element=active,
                               present=member is not None, at=at)  # fmt: skip

        current_at = room.seen_at.get(conflict.current.get("seq") or -1) if room else None
        return ResolutionContext(
            project_id=conflict.project_id,
            conflict=conflict,
            current=participant(conflict.current, current_at),
            incoming=participant(conflict.incoming, conflict.created_at),
            now=int(time.time() * 1000),
            options=options,
        )


def _same_json(a: Any, b: Any) -> bool:
    try:
        return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            b, option=orjson.OPT_SORT_KEYS
        )
    except TypeError:
        return False
