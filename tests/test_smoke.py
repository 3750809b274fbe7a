import trio

from .conftest import Clients


async def test_session_welcome_and_edit(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        assert a.welcome["seq"] == 0
        assert a.welcome["snapshot"]["elements"] == {}
        ack = await a.request(
            "timeline_change",
            {
                "change_id": "c1",
                "changes": [
                    {
                        "op": "insert",
                        "element_id": "clip1",
                        "element_type": "clip",
                        "props": {"start": 1},
                    }
                ],
            },
        )
        assert ack["type"] == "ack", ack
        assert ack["data"] == {"change_id": "c1", "seq": 1, "status": "applied", "conflicts": []}
        ev = await b.event("timeline_change")
        assert ev["data"]["seq"] == 1
        ev = await a.event("timeline_change")
        await a.send("cursor_update", {"position": {"x": 1, "y": 2}})
        cur = await b.event("cursor_update")
        assert cur["data"]["payload"] == {"position": {"x": 1.0, "y": 2.0}}
