"""PostgreSQL as the store of record: the private test server, then the backplane.

Policy: loopback only, port 0, a deadline on every I/O test, a real PostgreSQL per test
(tests/_postgres.py), no mocks and no sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from crealia.backplanes.postgresql import open_postgresql_backplane
from crealia.testing import check_backplane

from ._postgres import PostgresServer, run_postgres


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresServer]:
    async with run_postgres() as server:
        yield server


async def test_postgres_fixture_starts_stops_and_survives_an_immediate_stop(
    postgres: PostgresServer,
) -> None:
    with trio.fail_after(60):
        await postgres.psql("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
        await postgres.stop("immediate")
        await postgres.start()
        assert (await postgres.psql("SELECT n FROM t")).strip() == "1"
        await postgres.kill()
        await postgres.start()
        assert (await postgres.psql("SELECT count(*) FROM t")).strip() == "1"
        assert postgres.starts == 3


# -- the contract ------------------------------------------------------------------------------


async def test_check_backplane_passes_on_postgresql(postgres: PostgresServer) -> None:
    url = await postgres.create_database("conformance")
    with trio.fail_after(300):
        await check_backplane(lambda: open_postgresql_backplane(url, history_limit=1000))
