"""Schema migrations: the SQL files in `migrations/`, applied in order, each exactly once.

A migration is a plain SQL file named `NNNN_what.sql`. `migrate` applies the ones a database
has not had yet, all in one transaction and under an advisory lock, so two cores starting at
once apply them once between them and a failure leaves the schema as it was. A migration
therefore cannot use statements that refuse to run in a transaction (CREATE INDEX
CONCURRENTLY). An applied file must never change: its SHA-256 is recorded, and `migrate`
refuses a database whose recorded hash differs from the file's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Final

from corvex_core.pg.db import Connection

# Any constant works if no other code takes this advisory lock; this one is "corvex" in ASCII.
LOCK_KEY: Final = 0x636F72766578
_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")

_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    sha256      BYTEA NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The database's schema history disagrees with the migrations in this build."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.sql.encode()).digest()


def migrations() -> list[Migration]:
    """The migrations shipped with this build, in version order, numbered 1, 2, 3, ..."""
    found = []
    for entry in resources.files("corvex_core.pg").joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match is None:
            assert not entry.name.endswith(".sql"), f"badly named migration {entry.name}"
            continue
        found.append(Migration(int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    assert versions == list(range(1, len(found) + 1)), f"migration numbers {versions}"
    return found


async def migrate(conn: Connection, wanted: Sequence[Migration] | None = None) -> list[int]:
    """Brings the database up to date with `wanted` (by default this build's migrations).
    Returns the versions it applied, none if the database was current."""
    wanted = migrations() if wanted is None else wanted
    async with conn.transaction():
        # Held until commit: a second core waits here, then finds everything applied.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(_TABLE)
        rows = await conn.fetch("SELECT version, name, sha256 FROM schema_migrations")
        applied = {row["version"]: (row["name"], bytes(row["sha256"])) for row in rows}
        _check_history(applied, wanted)
        done = []
        for migration in wanted:
            if migration.version in applied:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.sha256,
            )
            done.append(migration.version)
        return done


def _check_history(applied: dict[int, tuple[str, bytes]], wanted: Sequence[Migration]) -> None:
    known = {m.version: m for m in wanted}
    for version, (name, sha256) in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {name}, which this build does not know: "
                "it was made by a newer corvex"
            )
        if migration.sha256 != sha256:
            raise MigrationError(f"migration {name} changed after it was applied")
