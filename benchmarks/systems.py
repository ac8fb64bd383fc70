"""The systems under test, each started as real processes on 127.0.0.1 and port 0: Corvex
(core + edge, through `corvex_ops.stack.running_stack`, funded and keyed like a customer's
account) in the variants the scenarios compare, and the ceilings. Each yields a `System`:
where to send load, which process ids to measure, and which API keys to use."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from benchmarks.ceilings import STREAM_METHOD, UNARY_METHOD
from benchmarks.targets import Endpoint
from corvex.v1 import accounts_pb2
from corvex_ops.admin import Client
from corvex_ops.stack import Process, launch, running_stack

# $10,000 of credit: far more than any run spends (a 256-token request costs ~$0.0004).
STARTER_CREDITS_CENTS = 1_000_000
# Generous, but present: every request goes through both buckets of the limiter.
KEY_LIMITS = {"requests_per_minute": 10**8, "tokens_per_minute": 10**11}


@dataclass(frozen=True)
class System:
    """A running system: its addresses, the processes to measure, the keys to use."""

    name: str
    processes: dict[str, int]
    http_url: str | None = None
    grpc_address: str | None = None
    api_keys: tuple[str, ...] = ()
    logs: dict[str, Path] = field(default_factory=dict)

    def endpoint(self, kind: Literal["rest", "grpc", "grpc-unary", "grpc-stream"]) -> Endpoint:
        if kind == "rest":
            assert self.http_url, f"{self.name} has no HTTP address"
            return Endpoint("rest", self.http_url)
        assert self.grpc_address, f"{self.name} has no gRPC address"
        if kind == "grpc-unary":
            return Endpoint("grpc-unary", self.grpc_address, UNARY_METHOD)
        if kind == "grpc-stream":
            return Endpoint("grpc", self.grpc_address, STREAM_METHOD)
        return Endpoint("grpc", self.grpc_address)


class CorvexVariant(msgspec.Struct, frozen=True):
    """How a Corvex stack is configured for a scenario. The engine is the simulated one with
    zero prefill and `tpot_ms` per decode step (0: instant), a step that does not grow with the
    batch unless `batch_slowdown` says so (the engine's own default is 0.01 per running
    request), and room for `max_batch` requests decoded at once. `edge` is merged into the
    edge's section of the configuration file (any `corvex edge` setting)."""

    metered: bool = True
    journal: Literal["fsync", "nofsync", "off"] = "fsync"
    tpot_ms: float = 0.0
    batch_slowdown: float = 0.0
    max_batch: int = 256
    keys: int = 4
    edge: dict[str, Any] = msgspec.field(default_factory=dict)
    # Edge processes sharing its port (`corvex edge --workers N`).
    edge_workers: int = 1

    def config(self) -> dict[str, Any]:
        engine = {
            "backend": "simulated",
            "ttft_ms": 0,
            "tpot_ms": self.tpot_ms,
            "batch_slowdown": self.batch_slowdown,
            "prefill_ms_per_1k_tokens": 0,
            "max_batch": self.max_batch,
            "max_queue": max(4096, 4 * self.max_batch),
        }
        core = {
            "metrics_port": -1,
            "benchmark_unmetered": not self.metered,
            "accounts": {"starter_credits_usd": "0"},
            "journal": {"enabled": self.journal != "off", "fsync": self.journal == "fsync"},
            "engines": {"default": engine},
        }
        return {"core": core, "edge": dict(self.edge)} if self.edge else {"core": core}


def _provision(address: str, admin_token: str, keys: int) -> tuple[str, ...]:
    """A funded workspace and `keys` keys with generous limits; returns their secrets."""
    client = Client(address, admin_token)
    try:
        ws = client.CreateWorkspace(
            accounts_pb2.CreateWorkspaceRequest(
                name="bench", starter_credits_cents=STARTER_CREDITS_CENTS
            )
        )
        limits = accounts_pb2.KeyLimits(**KEY_LIMITS)
        return tuple(
            client.CreateKey(
                accounts_pb2.CreateKeyRequest(workspace_id=ws.id, name=f"k{i}", limits=limits)
            ).secret
            for i in range(keys)
        )
    finally:
        client.close()


@contextlib.contextmanager
def corvex(name: str, variant: CorvexVariant) -> Iterator[System]:
    """A Corvex core + edge as `corvex serve` runs them, configured by `variant`."""
    admin_token = "bench-admin-" + secrets.token_hex(16)
    with running_stack(
        config=variant.config(), admin_token=admin_token, edge_workers=variant.edge_workers
    ) as stack:
        assert stack.edge is not None
        if variant.metered:
            keys = _provision(stack.grpc_address, admin_token, variant.keys)
        else:
            keys = ("unmetered-benchmark",)  # sent but not checked: same client work
        yield System(
            name=name,
            processes={"edge": stack.edge.pid, "core": stack.core.pid},
            http_url=stack.http_url,
            grpc_address=stack.grpc_address,
            api_keys=keys,
            logs={p.name: p.log_path for p in stack.processes if p.log_path},
        )


def _ceiling(kind: str, workdir: Path, *extra: str) -> Process:
    return launch(
        f"ceiling-{kind}-{secrets.token_hex(3)}",
        [kind, "--port", "0", *extra],
        workdir=workdir,
        module="benchmarks.ceilings",
    )


@contextlib.contextmanager
def aiohttp_canned(workdir: Path) -> Iterator[System]:
    """The bare aiohttp handler with a canned completion."""
    server = _ceiling("aiohttp", workdir)
    try:
        url = f"http://127.0.0.1:{server.ready['http_port']}"
        yield System("aiohttp-canned", {"server": server.pid}, http_url=url)
    finally:
        server.stop()


def _paced(step_ms: float) -> str:
    return f"-paced{step_ms:g}ms" if step_ms > 0 else ""


@contextlib.contextmanager
def grpc_echo(workdir: Path, step_ms: float = 0.0) -> Iterator[System]:
    """The bare grpc.aio unary and server-streaming echo; with `step_ms`, the stream sends one
    message per stream per step."""
    server = _ceiling("grpc", workdir, "--step-ms", str(step_ms))
    try:
        address = f"127.0.0.1:{server.ready['grpc_port']}"
        yield System(f"grpc-echo{_paced(step_ms)}", {"server": server.pid}, grpc_address=address)
    finally:
        server.stop()


@contextlib.contextmanager
def skeleton(workdir: Path, nonstream_rpc: str = "unary", step_ms: float = 0.0) -> Iterator[System]:
    """aiohttp handler → bare grpc.aio echo, as two processes like edge → core; with
    `step_ms`, in front of the paced echo (one SSE event per message, one message per step)."""
    with grpc_echo(workdir, step_ms) as backend:
        assert backend.grpc_address
        edge = _ceiling(
            "skeleton", workdir, "--backend", backend.grpc_address, "--nonstream-rpc", nonstream_rpc
        )
        try:
            yield System(
                f"skeleton-{nonstream_rpc}{_paced(step_ms)}",
                {"edge": edge.pid, "core": backend.processes["server"]},
                http_url=f"http://127.0.0.1:{edge.ready['http_port']}",
                grpc_address=backend.grpc_address,
            )
        finally:
            edge.stop()
