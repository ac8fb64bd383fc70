"""Cluster membership by heartbeat, against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt

from corvex_core.pg import db, membership
from tests.core.pg.conftest import START


async def test_a_core_is_live_while_its_heartbeat_is_recent(pool: db.Pool) -> None:
    await membership.heartbeat(pool, "core-b", "127.0.0.1:50052", START)
    await membership.heartbeat(pool, "core-a", "127.0.0.1:50051", START)
    later = START + dt.timedelta(seconds=4)
    await membership.heartbeat(pool, "core-a", "127.0.0.1:50061", later)
    live = await membership.live(pool, later, within_s=5)
    assert [(m.core_id, m.address) for m in live] == [
        ("core-a", "127.0.0.1:50061"),
        ("core-b", "127.0.0.1:50052"),
    ]
    gone = await membership.live(pool, START + dt.timedelta(seconds=6), within_s=5)
    assert [m.core_id for m in gone] == ["core-a"]


async def test_a_late_heartbeat_never_moves_a_core_back_in_time(pool: db.Pool) -> None:
    await membership.heartbeat(pool, "core-a", "127.0.0.1:50051", START)
    await membership.heartbeat(pool, "core-a", "127.0.0.1:50051", START - dt.timedelta(seconds=9))
    (member,) = await membership.live(pool, START, within_s=1)
    assert member.heartbeat_at == START
