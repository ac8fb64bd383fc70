"""`python -m benchmarks cluster`: what sharing one ledger in PostgreSQL costs (issue 15).

In one run, the same closed-loop REST load (non-streaming, 16 tokens, instant engine) against:
the single-process default (one core, SQLite journal); one and two cores in postgres mode with
charges committed there (`ledger.charges: postgres`, the default); the same with charges in
each core's journal, shipped after (`ledger.charges: journal`); and two cores spending a
workspace below `exact_below_usd` (near $0, where each admission leases its own hold). All
systems are up at once on one local PostgreSQL (a database each) and the repeats interleave.

For each: requests/s, latency, server CPU per request (edge, cores and PostgreSQL's processes
together), database round trips per request by purpose (`corvex_ledger_round_trips` from the
cores' /metrics: `admit` is a request waiting for a lease, `charge` the group commit), and the
credit still leased but unused by the cores when the load stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec

from benchmarks import loadgen
from benchmarks.loadgen import LoadResult, LoadSpec
from benchmarks.systems import KEY_LIMITS, STARTER_CREDITS_CENTS, CorvexVariant
from benchmarks.targets import Endpoint
from benchmarks.workload import Lengths, Workload
from corvex.v1 import accounts_pb2
from corvex_core.pg import server as pg_server
from corvex_ops.admin import Client
from corvex_ops.stack import running_cluster, running_stack

NEAR_ZERO_CENTS: Final = 400  # $4: below the default exact_below_usd of $5
_ROUND_TRIPS = re.compile(r'^corvex_ledger_round_trips_total\{purpose="(\w+)"\} ([0-9.e+]+)$', re.M)


class CaseResult(msgspec.Struct):
    name: str
    title: str
    cores: int
    runs: list[LoadResult]
    # Per run: statements sent to PostgreSQL per successful request, by purpose.
    round_trips: list[dict[str, float]]
    # Per run: the workspace's credit still leased to the cores when the load stopped (no
    # request in flight then, so all of it unused).
    unused_lease_usd: list[float]


class ClusterBench(msgspec.Struct):
    concurrency: int
    duration_s: float
    repeats: int
    cases: list[CaseResult]


@dataclass
class _Case:
    name: str
    title: str
    cores: int
    http_url: str
    keys: tuple[str, ...]
    watch: dict[str, int]
    metrics: list[str]
    workspace_id: str = ""
    dsn: str = ""


def _provision(address: str, token: str, cents: int, keys: int = 4) -> tuple[str, tuple[str, ...]]:
    """A funded workspace and its keys (generous limits): (workspace id, secrets)."""
    client = Client(address, token)
    try:
        ws = client.CreateWorkspace(
            accounts_pb2.CreateWorkspaceRequest(name="bench", starter_credits_cents=cents)
        )
        limits = accounts_pb2.KeyLimits(**KEY_LIMITS)
        secrets_ = tuple(
            client.CreateKey(
                accounts_pb2.CreateKeyRequest(workspace_id=ws.id, name=f"k{i}", limits=limits)
            ).secret
            for i in range(keys)
        )
        return ws.id, secrets_
    finally:
        client.close()


async def _leased_usd(dsn: str, workspace_id: str) -> float:
    """Credit the cores hold on lease for the workspace (nothing is in flight: all unused)."""
    conn = await asyncpg.connect(dsn)
    try:
        leased = await conn.fetchval(
            "SELECT leased_nano FROM workspaces WHERE id = $1", workspace_id
        )
    finally:
        await conn.close()
    return int(leased) / 1e9


def _scrape(urls: list[str]) -> tuple[dict[str, float], None]:
    """Round trips so far by purpose, summed over cores."""
    trips: dict[str, float] = {}
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for purpose, value in _ROUND_TRIPS.findall(text):
            trips[purpose] = trips.get(purpose, 0.0) + float(value)
    return trips, None


def _postmaster(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split()[0])


async def _create_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


def _cluster_config(charges: str) -> dict[str, Any]:
    variant = CorvexVariant().config()
    core = variant["core"]
    core["metrics_port"] = 0
    core["ledger"] = {"charges": charges}
    return {"core": core}


@contextlib.contextmanager
def _systems(exits: contextlib.ExitStack) -> Iterator[list[_Case]]:
    token = "bench-admin-" + secrets.token_hex(16)
    # A durable server (fsync on), as a deployment runs it; its directory is made passable
    # for PostgreSQL's own user and removed afterwards.
    scratch = Path(tempfile.mkdtemp(prefix="corvex-bench-pg-"))
    scratch.chmod(0o755)
    exits.callback(shutil.rmtree, scratch, True)
    pg = exits.enter_context(pg_server.running(scratch / "data"))
    postgres = _postmaster(pg.data_dir)
    cases: list[_Case] = []
    single = exits.enter_context(running_stack(config=CorvexVariant().config(), admin_token=token))
    assert single.edge is not None
    _, single_keys = _provision(single.grpc_address, token, STARTER_CREDITS_CENTS)
    cases.append(
        _Case("single", "1 core, SQLite journal (the default)", 1, single.http_url,
              single_keys, {"edge": single.edge.pid, "core": single.core.pid}, []),
    )  # fmt: skip
    shapes = [
        ("pg-1", "1 core, PostgreSQL, charges committed there", 1, "postgres"),
        ("pg-2", "2 cores, PostgreSQL, charges committed there", 2, "postgres"),
        ("pg-1-journal", "1 core, PostgreSQL, charges journaled then shipped", 1, "journal"),
        ("pg-2-journal", "2 cores, PostgreSQL, charges journaled then shipped", 2, "journal"),
    ]
    for name, title, cores, charges in shapes:
        database = name.replace("-", "_")
        asyncio.run(_create_database(pg.dsn(), database))
        cluster = exits.enter_context(
            running_cluster(
                dsn=pg.dsn(database), config=_cluster_config(charges), cores=cores,
                metrics_ports=[0] * cores, admin_token=token,
            )
        )  # fmt: skip
        assert cluster.edge is not None
        watch = {"edge": cluster.edge.pid, "postgres": postgres}
        watch.update({core.name: core.pid for core in cluster.cores})
        metrics = [f"http://127.0.0.1:{core.ready['metrics_port']}" for core in cluster.cores]
        dsn = pg.dsn(database)
        ws_id, keys = _provision(cluster.grpc_address, token, STARTER_CREDITS_CENTS)
        cases.append(_Case(name, title, cores, cluster.http_url, keys, watch, metrics, ws_id, dsn))
        if name == "pg-2":
            ws_id, near_zero = _provision(cluster.grpc_address, token, NEAR_ZERO_CENTS)
            cases.append(
                _Case("pg-2-near-zero", "2 cores, PostgreSQL, workspace near $0 ($4)", 2,
                      cluster.http_url, near_zero, watch, metrics, ws_id, dsn)
            )  # fmt: skip
    yield cases


def run(
    *, concurrency: int = 32, duration_s: float = 5.0, repeats: int = 2, progress: bool = False
) -> ClusterBench:
    with contextlib.ExitStack() as exits, _systems(exits) as cases:
        results = {case.name: CaseResult(case.name, case.title, case.cores, [], [], [])
                   for case in cases}  # fmt: skip
        for round_ in range(repeats):
            for case in cases:
                workload = Workload(max_tokens=Lengths.fixed(16), api_keys=case.keys)
                # Warm-up first, by itself, so the round trips counted are the measured part's.
                warmup = LoadSpec(concurrency=concurrency, requests=concurrency * 4,
                                  duration_s=duration_s, seed=round_)  # fmt: skip
                loadgen.run(Endpoint("rest", case.http_url), workload, warmup, progress=False)
                spec = LoadSpec(concurrency=concurrency, requests=10**7, duration_s=duration_s,
                                seed=round_)  # fmt: skip
                before, _ = _scrape(case.metrics)
                result = loadgen.run(
                    Endpoint("rest", case.http_url), workload, spec, watch=case.watch,
                    label=case.name, progress=progress,
                )  # fmt: skip
                after, _ = _scrape(case.metrics)
                ok = max(result.ok, 1)
                trips = {p: (after[p] - before.get(p, 0.0)) / ok for p in after}
                results[case.name].runs.append(result)
                results[case.name].round_trips.append(trips)
                if case.dsn:
                    unused = asyncio.run(_leased_usd(case.dsn, case.workspace_id))
                    results[case.name].unused_lease_usd.append(unused)
                print(f"round {round_ + 1} {case.name}: {result.requests_per_s:.0f} req/s, "
                      f"{result.server_cpu_per_request_us:.0f} µs CPU/request",
                      file=sys.stderr)  # fmt: skip
        return ClusterBench(concurrency, duration_s, repeats, list(results.values()))


def markdown(bench: ClusterBench) -> str:
    """The table of a run (medians of the repeats)."""
    lines = [
        f"Closed loop, {bench.concurrency} clients, {bench.duration_s:g} s × {bench.repeats} "
        "interleaved rounds, REST non-streaming (16 tokens), instant simulated engine; "
        "medians. CPU per request counts the edge, every core and PostgreSQL.",
        "",
        "| system | req/s | p50 ms | p99 ms | CPU µs/request | round trips/request: admit "
        "| charge | other | unused lease at end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in bench.cases:
        median = statistics.median
        rps = median(r.requests_per_s for r in case.runs)
        p50 = median(r.e2e.p50_ms for r in case.runs)
        p99 = median(r.e2e.p99_ms for r in case.runs)
        cpu = median(r.server_cpu_per_request_us for r in case.runs)
        admit = median(t.get("admit", 0.0) for t in case.round_trips)
        charge = median(t.get("charge", 0.0) for t in case.round_trips)
        other = median(
            sum(v for k, v in t.items() if k not in ("admit", "charge")) for t in case.round_trips
        )
        trips = (
            f"{admit:.3f} | {charge:.3f} | {other:.3f}" if case.name != "single" else "— | — | —"
        )
        unused = f"${median(case.unused_lease_usd):.2f}" if case.unused_lease_usd else "—"
        lines.append(
            f"| {case.title} | {rps:.0f} | {p50:.1f} | {p99:.1f} | {cpu:.0f} | {trips} | {unused} |"
        )
    return "\n".join(lines) + "\n"


def command(args: Any) -> int:
    bench = run(concurrency=args.concurrency, duration_s=args.duration, repeats=args.repeats,
                progress=bool(args.progress))  # fmt: skip
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_bytes(msgspec.json.format(msgspec.json.encode(bench)))
    table = markdown(bench)
    (out / "cluster.md").write_text(table)
    print(table)
    return 0
