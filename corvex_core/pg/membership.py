"""Cluster membership: which cores are alive, by the heartbeat each one writes.

A core upserts its row every few seconds; a core whose heartbeat is older than the bound the
reader chooses counts as gone. It stores no money and decides nothing about leases: a dead
core's leases return through their own TTL (leases.LeaseStore.expire).
"""

from __future__ import annotations

import datetime as dt

import msgspec

from corvex_core.pg.db import Pool


class Member(msgspec.Struct, frozen=True):
    core_id: str
    address: str
    heartbeat_at: dt.datetime


async def heartbeat(pool: Pool, core_id: str, address: str, now: dt.datetime) -> None:
    """Records that `core_id`, serving at `address`, is alive at `now`."""
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO cores (core_id, address, heartbeat_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (core_id) DO UPDATE"
            " SET address = excluded.address,"
            " heartbeat_at = GREATEST(cores.heartbeat_at, excluded.heartbeat_at)",
            core_id,
            address,
            now,
        )


async def live(pool: Pool, now: dt.datetime, within_s: float) -> list[Member]:
    """The cores whose last heartbeat is at most `within_s` before `now`, by id."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT core_id, address, heartbeat_at FROM cores WHERE heartbeat_at >= $1"
            " ORDER BY core_id",
            now - dt.timedelta(seconds=within_s),
        )
    return [Member(**dict(row)) for row in rows]
