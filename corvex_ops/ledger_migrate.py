"""`corvex ledger migrate --to postgresql://...`: a stopped single core's journal into an empty
PostgreSQL ledger, once (corvex_core/cluster/importer.py). Prints what it copied as JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import asyncpg
import msgspec

from corvex.config import load_section
from corvex.money import format_usd
from corvex_core.cluster.importer import (
    Imported,
    ImportRefused,
    JournalContents,
    import_journal,
    read_journal,
)
from corvex_core.config import CoreConfig
from corvex_core.pg import db


def run(args: argparse.Namespace) -> int:
    if not args.to:
        print("corvex ledger migrate: --to postgresql://... is required", file=sys.stderr)
        return 2
    config = load_section(
        "core", CoreConfig, path=args.config, flags={("data_dir",): args.data_dir}
    )
    try:
        contents = read_journal(Path(config.data_dir))
        imported = asyncio.run(_import(args.to, contents))
    except ImportRefused as exc:
        print(f"corvex ledger migrate: {exc}", file=sys.stderr)
        return 1
    except db.UNREACHABLE as exc:
        print(f"corvex ledger migrate: cannot reach PostgreSQL: {exc}", file=sys.stderr)
        return 1
    report = {**msgspec.structs.asdict(imported), "balance_usd": format_usd(imported.balance_nano)}
    del report["balance_nano"]
    print(msgspec.json.encode(report).decode())
    return 0


async def _import(dsn: str, contents: JournalContents) -> Imported:
    conn = await asyncpg.connect(dsn)
    try:
        return await import_journal(conn, contents, db.utc_now())
    finally:
        await conn.close()
