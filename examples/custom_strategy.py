"""Write a conflict strategy, register it in code, and watch it settle a conflict.

``MidpointStrategy`` settles conflicts between two numbers by meeting in the middle (a clip's
start at 5 s against 9 s becomes 7 s) and declines everything else, which the next strategy of
the chain (``priority``) then decides. An embedding program registers it in its
:class:`crealia.Config` (``strategies={"midpoint": MidpointStrategy}``) and puts it first in
the default chain; a package would register it through the ``crealia.strategies`` entry-point
group instead (see ``plugins/crealia-longest-text``).

The script runs a server in-process, then Alice and Bob, with crealia's Python client, move
the same clip from the same base: the server detects the conflict, the strategy settles it,
and both receive ``conflict_resolved``. It ends by itself::

    python examples/custom_strategy.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

import crealia

# The strategy contract (crealia does not re-export it publicly yet).
from crealia import DECLINE, Answer, ResolutionContext
from crealia.abc import ConflictStrategy


class MidpointStrategy(ConflictStrategy):
    """Two numbers meet in the middle; anything else is declined.

    Option ``max_gap``: decline when the two numbers are further apart than this (default:
    no limit).
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.max_gap: float | None = options.pop("max_gap", None)
        if options:  # a factory refuses options it does not know: the server reports them
            raise ValueError(f"unknown options {sorted(options)}")

    async def resolve(self, conflict: crealia.Conflict, context: ResolutionContext) -> Answer:
        current = conflict.current.get("value")
        incoming = conflict.incoming.get("value")
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (current, incoming)
        )
        if conflict.op != "set" or not numbers:
            return DECLINE
        gap = abs(incoming - current)
        if self.max_gap is not None and gap > self.max_gap:
            return DECLINE
        middle = (current + incoming) / 2
        # The closer the two wishes, the surer the compromise.
        confidence = round(1 / (1 + gap), 3)
        return self.resolution(
            conflict,
            "custom",
            middle,
            confidence,
            f"{context.current.user_id} wanted {current} and {context.incoming.user_id} "
            f"wanted {incoming}: met in the middle at {middle}.",
        )


def set_start(value: float, base: int) -> list[dict[str, Any]]:
    return [{"op": "set", "element_id": "clip-1", "prop": "start", "value": value, "base": base}]


async def watch_for_resolution(name: str, session: crealia.ClientSession) -> None:
    """Print the first ``conflict_resolved`` push this client gets."""
    async for push in session:
        if push.type == "conflict_resolved":
            resolution = push.data["resolution"]
            print(
                f"{name} got conflict_resolved (seq {push.data['seq']}): "
                f"strategy={resolution['strategy']} value={resolution['value']} "
                f"confidence={resolution['confidence']}"
            )
            print(f"  explanation: {resolution['explanation']}")
            return


async def main(data_dir: Path) -> None:
    config = crealia.Config(
        port=0,
        ws_port=0,
        data_dir=data_dir,
        strategies={"midpoint": MidpointStrategy},
        strategy_chain=("midpoint", "priority"),
    )
    with trio.fail_after(30):
        await run(config)
    print("done")


async def run(config: crealia.Config) -> None:
    async with crealia.open_server(config) as server:
        print(f"server: http={server.http_port} ws={server.ws_port}, chain midpoint -> priority")
        alice_token = server.issue_token("alice", "demo", "editor")
        bob_token = server.issue_token("bob", "demo", "editor")
        async with (
            crealia.connect(server.ws_url, alice_token, "demo") as alice,
            crealia.connect(server.ws_url, bob_token, "demo") as bob,
            trio.open_nursery() as nursery,
        ):
            # Both listen before anything happens, so neither misses the resolution.
            nursery.start_soon(watch_for_resolution, "alice", alice)
            nursery.start_soon(watch_for_resolution, "bob", bob)
            clip = {"op": "insert", "element_id": "clip-1", "element_type": "clip",
                    "props": {"start": 0, "label": "intro"}}  # fmt: skip
            base = (await alice.change([clip]))["seq"]
            print(f"alice inserted clip-1 at seq {base}")
            first = await alice.change(set_start(5, base))
            print(f"alice moved it to 5 s: {first['status']}")
            second = await bob.change(set_start(9, base))
            print(f"bob moved it to 9 s from the same base: {second['status']}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(main, Path(tmp))
