"""The `corvex` command: one entry point for every process and tool.

  corvex serve        core + edge together (the embedded default), with a dev key printed;
                      --cores 2: a local cluster (PostgreSQL, two cores, one edge)
  corvex core         the gRPC core alone
  corvex edge         the OpenAI REST edge alone (--workers N: several sharing the port)
  corvex admin ...    the admin surface (workspaces, credits, caps, keys, usage, invoices)
  corvex ledger ...   the cluster ledger: migrate a single core's journal into PostgreSQL
  corvex docs pricing regenerate (or --check) the rate table of docs/pricing.md
  corvex drift-gate   fail when the pricing page, the rate card and /v1/models disagree
  corvex bench ...    load generator and benchmark scenarios

Each subcommand imports its package only when it runs, so `corvex edge` never loads core
code and `corvex --help` is instant. Settings come from `--config FILE` (or $CORVEX_CONFIG),
then CORVEX_<SECTION>_<FIELD> environment variables, then the flags below.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from corvex.config import ConfigError, load_section


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("CORVEX_CONFIG"),
        metavar="FILE",
        help="YAML file with `core:` and `edge:` sections (default: $CORVEX_CONFIG, else "
        "built-in defaults)",
    )


def _core_flags(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    parser.add_argument(
        f"--{prefix}host", dest="core_host", metavar="HOST", help="address to listen on"
    )
    parser.add_argument(
        f"--{prefix}port", dest="core_port", metavar="PORT", type=int, help="gRPC port (0: any)"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics port (0: any, -1: off)"
    )
    parser.add_argument("--rate-card", metavar="FILE", help="the rate card YAML")
    parser.add_argument("--data-dir", metavar="DIR", help="journal and admin token directory")
    parser.add_argument(
        "--admin-token", help="admin credential (default: data-dir/admin_token, created once)"
    )
    parser.add_argument(
        "--drain-grace", type=float, metavar="SECONDS", help="SIGTERM grace for streams"
    )


def _log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="least severe level logged (info logs one line per request)",
    )
    parser.add_argument(
        "--log-format", choices=["auto", "json", "text"], help="auto: text on a terminal"
    )


def _ready_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ready-file",
        metavar="FILE",
        help="write the bound port(s) as JSON here once serving (for supervisors and tests)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corvex", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_serve_parser, _core_parser, _edge_parser, _admin_parser, _ledger_parser,
                _docs_parser, _gate_parser, _bench_parser):  # fmt: skip
        add(sub)
    return parser


Subparsers = Any  # argparse's _SubParsersAction, which typeshed names privately


def _serve_parser(sub: Subparsers) -> None:
    serve = sub.add_parser(
        "serve",
        help="run core and edge together and print a dev key",
        description="Starts the core (simulated engines unless configured otherwise) and the "
        "OpenAI edge as two processes, makes sure a `dev` workspace and key exist, prints how "
        "to call it, and stops both on Ctrl-C.",
    )
    _config_arg(serve)
    serve.add_argument("--port", type=int, help="edge HTTP port")
    serve.add_argument("--host", help="edge address to listen on")
    serve.add_argument("--core-port", type=int, help="core gRPC port (the next cores: +1, +2)")
    serve.add_argument("--data-dir", metavar="DIR", help="core data directory")
    serve.add_argument(
        "--cores",
        type=int,
        default=1,
        metavar="N",
        help="run N cores sharing one ledger in PostgreSQL (default 1: the SQLite journal)",
    )
    serve.add_argument(
        "--ledger-dsn",
        metavar="URI",
        default=os.environ.get("CORVEX_LEDGER_DSN"),
        help="with --cores: an existing PostgreSQL (postgresql://...; default $CORVEX_LEDGER_DSN)"
        " instead of a local one",
    )
    serve.add_argument(
        "--pg-data",
        metavar="DIR",
        help="with --cores: the local PostgreSQL's data directory (default .corvex/postgres)",
    )


def _core_parser(sub: Subparsers) -> None:
    core = sub.add_parser(
        "core",
        help="run the gRPC core",
        description="Runs the gRPC core: engines, metering, journal, Inference and Accounts "
        "services, health and reflection.",
    )
    _config_arg(core)
    _core_flags(core)
    _log_flags(core)
    _ready_flag(core)


def _edge_parser(sub: Subparsers) -> None:
    edge = sub.add_parser(
        "edge",
        help="run the OpenAI REST edge",
        description="Runs the aiohttp edge that serves /v1/chat/completions, /v1/embeddings "
        "and /v1/models by calling the core over gRPC.",
    )
    _config_arg(edge)
    edge.add_argument("--host", dest="edge_host", metavar="HOST", help="address to listen on")
    edge.add_argument(
        "--port", dest="edge_port", metavar="PORT", type=int, help="HTTP port (0: any)"
    )
    edge.add_argument(
        "--core",
        metavar="HOST:PORT[,...]",
        help="gRPC address of the core (comma-separated: several)",
    )
    edge.add_argument(
        "--workers", type=int, default=1, metavar="N", help="edge processes sharing the port"
    )
    edge.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    edge.add_argument("--max-body-bytes", type=int, help="largest request body (413 beyond)")
    edge.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: any, -1: off)")
    _log_flags(edge)
    _ready_flag(edge)


def _admin_parser(sub: Subparsers) -> None:
    from corvex_ops import admin as admin_cli

    admin_cli.add_arguments(
        sub.add_parser("admin", help="manage workspaces, credits, caps, keys, usage")
    )


def _ledger_parser(sub: Subparsers) -> None:
    ledger = sub.add_parser("ledger", help="the cluster ledger in PostgreSQL")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    migrate = ledger_sub.add_parser(
        "migrate",
        help="copy a single core's journal into an empty PostgreSQL ledger, once",
        description="Copies the workspaces, balances, caps, auto-reload settings, keys, "
        "invoices, idempotency keys and usage of a stopped single core's journal into "
        "PostgreSQL in one transaction. Refuses a target that already holds accounts.",
    )
    _config_arg(migrate)
    migrate.add_argument(
        "--to",
        metavar="URI",
        default=os.environ.get("CORVEX_LEDGER_DSN"),
        help="postgresql://user:password@host:port/database (default $CORVEX_LEDGER_DSN)",
    )
    migrate.add_argument("--data-dir", metavar="DIR", help="the core's data directory")


def _docs_parser(sub: Subparsers) -> None:
    docs = sub.add_parser("docs", help="generated documentation")
    docs_sub = docs.add_subparsers(dest="docs_command", required=True, metavar="DOC")
    pricing = docs_sub.add_parser(
        "pricing", help="write the rate table of docs/pricing.md from the rate card"
    )
    pricing.add_argument("--check", action="store_true", help="report drift, change nothing")
    pricing.add_argument("--rate-card", default="infrastructure/metronome/config.yaml")
    pricing.add_argument("--page", default="docs/pricing.md")


def _gate_parser(sub: Subparsers) -> None:
    gate = sub.add_parser(
        "drift-gate",
        help="fail if the pricing page, the rate card and a live /v1/models disagree",
    )
    gate.add_argument("--rate-card", default="infrastructure/metronome/config.yaml")
    gate.add_argument("--page", default="docs/pricing.md")
    gate.add_argument(
        "--served-url",
        metavar="URL",
        help="base URL of a running edge to compare (e.g. http://127.0.0.1:8000)",
    )
    gate.add_argument(
        "--start-stack",
        action="store_true",
        help="start a core and edge on free ports with the rate card and compare them",
    )


def _bench_parser(sub: Subparsers) -> None:
    bench = sub.add_parser(
        "bench",
        help="load generator and benchmark scenarios (see benchmarks/README.md)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)


def _flags(
    args: argparse.Namespace, mapping: Mapping[str, tuple[str, ...]]
) -> dict[tuple[str, ...], Any]:
    return {path: getattr(args, name, None) for name, path in mapping.items()}


CORE_FLAGS = {
    "core_host": ("host",),
    "core_port": ("port",),
    "metrics_port": ("metrics_port",),
    "rate_card": ("rate_card",),
    "data_dir": ("data_dir",),
    "admin_token": ("admin_token",),
    "drain_grace": ("drain_grace_s",),
    "log_level": ("log_level",),
    "log_format": ("log_format",),
}
EDGE_FLAGS = {
    "edge_host": ("host",),
    "edge_port": ("port",),
    "core": ("core",),
    "max_body_bytes": ("max_body_bytes",),
    "metrics_port": ("metrics_port",),
    "log_level": ("log_level",),
    "log_format": ("log_format",),
}


def _run_core(args: argparse.Namespace) -> int:
    import uvloop

    from corvex import logs
    from corvex_core.config import CoreConfig
    from corvex_core.journal import JournalError
    from corvex_core.server import StartupError, serve

    config = load_section("core", CoreConfig, path=args.config, flags=_flags(args, CORE_FLAGS))
    logs.setup(process="core", level=config.log_level, fmt=config.log_format)
    try:
        uvloop.run(serve(config, ready_file=args.ready_file))
    except (StartupError, JournalError) as exc:
        print(f"corvex core: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_edge(args: argparse.Namespace) -> int:
    import uvloop

    from corvex import logs
    from gateway.app import serve
    from gateway.config import EdgeConfig

    flags = _flags(args, EDGE_FLAGS)
    if args.core and "," in args.core:
        flags[("core",)] = None
        flags[("cores",)] = [a.strip() for a in args.core.split(",") if a.strip()]
    if args.reuse_port:
        flags[("reuse_port",)] = True
    config = load_section("edge", EdgeConfig, path=args.config, flags=flags)
    if args.workers > 1:
        from corvex_ops import workers
        from corvex_ops.stack import command_line

        base = command_line(
            "edge", config=args.config, host=config.host, core=",".join(config.core_addresses),
            max_body_bytes=args.max_body_bytes, log_level=args.log_level,
            log_format=args.log_format,
        )  # fmt: skip
        return workers.run(
            base, workers=args.workers, host=config.host, port=config.port,
            metrics_port=config.metrics_port, ready_file=args.ready_file,
        )  # fmt: skip
    logs.setup(process="edge", level=config.log_level, fmt=config.log_format)
    try:
        uvloop.run(serve(config, ready_file=args.ready_file))
    except ValueError as exc:
        print(f"corvex edge: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_ledger(args: argparse.Namespace) -> int:
    from corvex_ops import ledger_migrate

    return ledger_migrate.run(args)


def _run_docs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from corvex import pricing_docs

    return pricing_docs.run(rate_card=Path(args.rate_card), page=Path(args.page), check=args.check)


def _run_drift_gate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from corvex import drift_gate

    if args.start_stack:
        from corvex_ops.stack import running_stack

        with running_stack(rate_card=args.rate_card) as stack:
            return drift_gate.run(
                rate_card=Path(args.rate_card), page=Path(args.page), served_url=stack.http_url
            )
    return drift_gate.run(
        rate_card=Path(args.rate_card), page=Path(args.page), served_url=args.served_url
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        # The benchmarks parse their own arguments (and answer their own --help).
        from benchmarks.cli import main as bench_main

        return bench_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    try:
        if args.command == "core":
            return _run_core(args)
        if args.command == "edge":
            return _run_edge(args)
        if args.command == "serve":
            from corvex_ops import serve

            return serve.run(args)
        if args.command == "admin":
            from corvex_ops import admin

            return admin.run(args)
        if args.command == "ledger":
            return _run_ledger(args)
        if args.command == "docs":
            return _run_docs(args)
        if args.command == "drift-gate":
            return _run_drift_gate(args)
    except ConfigError as exc:
        print(f"corvex: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
