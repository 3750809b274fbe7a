"""The in-process backplane directly: a write that cannot be recorded leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from crealia import BadRequest, InternalError, User
from crealia._storage import open_store
from crealia._wire import InsertOp, SetOp, TimelineChange
from crealia.transports.memory import MemoryBackplane


async def test_unencodable_write_marks_project_broken_and_reloads(tmp_path: Path) -> None:
    user = User(id="u", name="u", role="editor", project_id="p")
    with trio.fail_after(10):
        async with open_store(tmp_path) as store:
            backplane = MemoryBackplane(store)
            first = TimelineChange(
                change_id="c1",
                changes=[InsertOp(op="insert", element_id="e", element_type="clip", props={})],
            )
            assert (await backplane.commit_change(user, first)).seq == 1
            # A value no JSON encoder takes, as a plugin bug might produce (past the message
            # validators): the document's value check refuses it before anything is touched.
            op = SetOp(op="set", element_id="e", prop="v", value=1)
            object.__setattr__(op, "value", {1, 2})
            bad = TimelineChange(change_id="c2", changes=[op])
            with pytest.raises((InternalError, BadRequest)):
                await backplane.commit_change(user, bad)
            good = TimelineChange(
                change_id="c2",
                changes=[SetOp(op="set", element_id="e", prop="v", value=3)],
            )
            outcome = await backplane.commit_change(user, good)
            assert (outcome.status, outcome.seq) == ("applied", 2)
            snapshot = await backplane.snapshot("p")
            assert snapshot["elements"]["e"]["props"] == {"v": 3}
            assert [e.seq for e in await backplane.events_since("p", 0) or []] == [1, 2]
