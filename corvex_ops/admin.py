"""`corvex admin`: the operator's command line over the core's Accounts service.

Workspaces, credits, caps, auto-reload, keys, usage, invoices, and reserved endpoints
(`corvex admin endpoint create|list|show|resize|delete|offerings`).

Every command prints JSON (usage can print CSV), with money as exact decimal USD strings, so
scripts can rely on it. Amounts are typed in dollars ("25.00") and sent in whole cents.
The core address and admin token come from flags, CORVEX_ADMIN_CORE / CORVEX_ADMIN_TOKEN, or
the config file (core.host, core.port, core.admin_token, else data_dir/admin_token).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import msgspec
from google.protobuf import field_mask_pb2

from corvex import tls
from corvex.config import load_section
from corvex.money import MoneyError, cents_from_usd, format_usd
from corvex.v1 import accounts_pb2, accounts_pb2_grpc

_LIMIT_FLAGS = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "monthly_tokens": "monthly_tokens",
}
# The wire's names: TOP_UP_METHOD_AUTO_RELOAD → "auto_reload", and KeyLimits' fields.
_METHOD_NAMES = {
    number: name.removeprefix("TOP_UP_METHOD_").lower()
    for name, number in accounts_pb2.TopUpMethod.items()
    if number
}
_LIMIT_FIELDS = tuple(f.name for f in accounts_pb2.KeyLimits.DESCRIPTOR.fields)


Handler = Callable[["Client", argparse.Namespace], Any]


class AdminError(Exception):
    """A command failed; the message is for the operator."""


# ---- arguments ------------------------------------------------------------------------------


def _usd(text: str) -> int:
    """argparse type: dollars → whole cents."""
    try:
        return cents_from_usd(text)
    except MoneyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str) -> int | None:
    """argparse type: a positive integer, or "none" to remove the limit."""
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a positive integer or `none`")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("CORVEX_CONFIG"), metavar="FILE")
    parser.add_argument("--core", metavar="HOST:PORT", help="core address ($CORVEX_ADMIN_CORE)")
    parser.add_argument("--admin-token", help="admin credential ($CORVEX_ADMIN_TOKEN)")
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("CORVEX_ADMIN_TLS_CA"),
        metavar="FILE",
        help="talk TLS to the core, whose certificate this CA signed ($CORVEX_ADMIN_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("CORVEX_ADMIN_TLS_CERT"),
        metavar="FILE",
        help="this client's certificate, for cores that require mutual TLS",
    )
    parser.add_argument(
        "--tls-key", default=os.environ.get("CORVEX_ADMIN_TLS_KEY"), metavar="FILE",
        help="its key",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="admin_command", required=True, metavar="OBJECT")
    for add in (_workspace_args, _credits_args, _cap_args, _reload_args, _key_args,
                _usage_args, _invoice_args, _endpoint_args):  # fmt: skip
        add(sub)


Subparsers = Any  # argparse's _SubParsersAction, which typeshed names privately


def _actions(sub: Subparsers, name: str, help_text: str, handler: Handler) -> Subparsers:
    """A command group (`corvex admin NAME ACTION ...`) run by `handler`."""
    group = sub.add_parser(name, help=help_text)
    group.set_defaults(handler=handler)
    return group.add_subparsers(dest="action", required=True)


def _workspace_args(sub: Subparsers) -> None:
    actions = _actions(sub, "workspace", "create, list and show workspaces", _workspace)
    create = actions.add_parser("create", help="create a workspace (with starter credits)")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--starter-credits", type=_usd, metavar="USD", help="override the configured amount"
    )
    actions.add_parser("list", help="list workspaces")
    show = actions.add_parser("show", help="balance, month spend, cap, auto-reload")
    show.add_argument("workspace")


def _credits_args(sub: Subparsers) -> None:
    actions = _actions(sub, "credits", "add prepaid credits", _credits)
    add = actions.add_parser("add", help="add credits; prints the invoice")
    add.add_argument("workspace")
    add.add_argument("amount", type=_usd, metavar="USD")
    add.add_argument(
        "--idempotency-key",
        help="repeat the same key to retry safely (default: a new random key)",
    )


def _cap_args(sub: Subparsers) -> None:
    actions = _actions(sub, "cap", "set or remove the monthly spend cap", _cap)
    cap_set = actions.add_parser("set", help="set the cap (takes effect at once)")
    cap_set.add_argument("workspace")
    cap_set.add_argument("amount", type=_usd, metavar="USD")
    actions.add_parser("remove", help="remove the cap").add_argument("workspace")


def _reload_args(sub: Subparsers) -> None:
    actions = _actions(sub, "auto-reload", "configure auto-reload", _auto_reload)
    reload_set = actions.add_parser("set", help="reload AMOUNT when balance < THRESHOLD")
    reload_set.add_argument("workspace")
    reload_set.add_argument("--threshold", type=_usd, required=True, metavar="USD")
    reload_set.add_argument("--amount", type=_usd, required=True, metavar="USD")
    actions.add_parser("off", help="turn auto-reload off").add_argument("workspace")


def _key_args(sub: Subparsers) -> None:
    actions = _actions(sub, "key", "create, list, revoke keys and set their limits", _key)
    create = actions.add_parser("create", help="create a key; prints its secret once")
    create.add_argument("workspace")
    create.add_argument("--name", required=True)
    actions.add_parser("list", help="list a workspace's keys").add_argument("workspace")
    actions.add_parser("revoke", help="revoke a key (takes effect at once)").add_argument("key")
    limits = actions.add_parser("limits", help="change limits; `none` removes one")
    limits.add_argument("key")
    for target in (create, limits):
        target.add_argument("--rpm", type=_limit, default=argparse.SUPPRESS, help="requests/min")
        target.add_argument("--tpm", type=_limit, default=argparse.SUPPRESS, help="tokens/min")
        target.add_argument(
            "--monthly-tokens", type=_limit, default=argparse.SUPPRESS, help="tokens/month"
        )


def _usage_args(sub: Subparsers) -> None:
    usage = sub.add_parser("usage", help="usage per key, model and UTC day")
    usage.set_defaults(handler=_usage)
    usage.add_argument("workspace")
    usage.add_argument("--key", default="", help="only this key id")
    usage.add_argument("--since", default="", metavar="YYYY-MM-DD")
    usage.add_argument("--until", default="", metavar="YYYY-MM-DD")
    usage.add_argument("--format", choices=["json", "csv"], default="json")


def _invoice_args(sub: Subparsers) -> None:
    actions = _actions(sub, "invoice", "list and download invoices", _invoice)
    actions.add_parser("list", help="a workspace's invoices").add_argument("workspace")
    get = actions.add_parser("get", help="one invoice as JSON, printable HTML or PDF")
    get.add_argument("number", help="e.g. INV-000001")
    get.add_argument("--format", choices=["json", "html", "pdf"], default="json")
    get.add_argument("--output", "-o", metavar="FILE", help="write to FILE")


def _replicas(text: str) -> int:
    """argparse type: a replica count."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a positive number of replicas")
    return int(text)


def _endpoint_args(sub: Subparsers) -> None:
    actions = _actions(
        sub, "endpoint", "rent, list, resize and delete reserved endpoints", _endpoint
    )
    create = actions.add_parser(
        "create",
        help="rent a reserved endpoint (dedicated replicas; its first period is held at once)",
    )
    create.add_argument("workspace")
    create.add_argument("--offering", required=True, help="e.g. deepseek-v4-flash-1gpu")
    create.add_argument("--name", required=True, help="its model id is <workspace-slug>/NAME")
    create.add_argument("--replicas", type=_replicas, default=1)
    listing = actions.add_parser("list", help="a workspace's endpoints (all without WORKSPACE)")
    listing.add_argument("workspace", nargs="?", default="")
    actions.add_parser("show", help="one endpoint and its billing").add_argument("endpoint")
    resize = actions.add_parser("resize", help="change the number of replicas")
    resize.add_argument("endpoint")
    resize.add_argument("replicas", type=_replicas)
    actions.add_parser("delete", help="stop it and its billing now").add_argument("endpoint")
    actions.add_parser("offerings", help="the reserved offerings and this core's capacity")


# ---- connection ------------------------------------------------------------------------------


def connection(args: argparse.Namespace) -> tuple[str, str]:
    """The core address and admin token to use."""
    from corvex_core.config import CoreConfig

    config = load_section("core", CoreConfig, path=args.config)
    address = args.core or os.environ.get("CORVEX_ADMIN_CORE")
    if not address:
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
        address = f"{host}:{config.port}"
    token = args.admin_token or os.environ.get("CORVEX_ADMIN_TOKEN") or config.admin_token
    if not token:
        path = Path(config.data_dir) / "admin_token"
        if not path.exists():
            raise AdminError(
                f"no admin token: pass --admin-token, set CORVEX_ADMIN_TOKEN, or run where "
                f"{path} exists"
            )
        token = path.read_text().strip()
    return address, token


class Client:
    """A small synchronous Accounts client that adds the admin credential to every call."""

    def __init__(
        self,
        address: str,
        token: str,
        *,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
    ) -> None:
        """With `ca_file`, over TLS (the core's certificate signed by it); `cert_file` and
        `key_file` present this client's own certificate (cores that require mutual TLS)."""
        if ca_file:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.read_pem(ca_file, "CA file"),
                private_key=tls.read_pem(key_file, "key file") if key_file else None,
                certificate_chain=tls.read_pem(cert_file, "certificate file")
                if cert_file
                else None,
            )
            self._channel = grpc.secure_channel(address, credentials)
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = accounts_pb2_grpc.AccountsStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.address = address

    def __getattr__(self, method: str) -> Callable[[Any], Any]:
        rpc = getattr(self._stub, method)

        def call(request: Any) -> Any:
            try:
                return rpc(request, metadata=self._metadata, timeout=30)
            except grpc.RpcError as exc:
                raise AdminError(_rpc_message(exc, self.address)) from None

        return call

    def close(self) -> None:
        self._channel.close()


def _rpc_message(exc: grpc.RpcError, address: str) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the core at {address} ({details})"
    return f"{code.name if code else 'error'}: {details}"


# ---- rendering -------------------------------------------------------------------------------


def workspace_json(ws: accounts_pb2.Workspace) -> dict[str, Any]:
    reload = ws.auto_reload
    return {
        "id": ws.id,
        "name": ws.name,
        "created": ws.created.ToJsonString(),
        "balance_usd": format_usd(ws.balance_nano_usd),
        "held_usd": format_usd(ws.held_nano_usd),
        "available_usd": format_usd(ws.available_nano_usd),
        "spend_cap_usd": (
            format_usd(ws.spend_cap_nano_usd) if ws.HasField("spend_cap_nano_usd") else None
        ),
        "month": ws.month,
        "month_spend_usd": format_usd(ws.month_spend_nano_usd),
        "auto_reload": {
            "enabled": reload.enabled,
            "threshold_usd": format_usd(reload.threshold_nano_usd),
            "amount_usd": format_usd(reload.amount_nano_usd),
            "last_error": reload.last_error or None,
        },
    }


def key_json(key: accounts_pb2.ApiKey) -> dict[str, Any]:
    limits: Any = key.limits  # its fields are named by _LIMIT_FIELDS, not by literals
    return {
        "id": key.id,
        "workspace_id": key.workspace_id,
        "name": key.name,
        "prefix": key.prefix,
        "created": key.created.ToJsonString(),
        "revoked": key.revoked,
        "limits": {f: getattr(limits, f) if limits.HasField(f) else None for f in _LIMIT_FIELDS},
        "month_tokens": key.month_tokens,
    }


def invoice_json(invoice: accounts_pb2.Invoice) -> dict[str, Any]:
    return {
        "number": invoice.number,
        "workspace_id": invoice.workspace_id,
        "created": invoice.created.ToJsonString(),
        "amount_usd": format_usd(invoice.amount_nano_usd),
        "method": _METHOD_NAMES.get(invoice.method, "unknown"),
        "balance_after_usd": format_usd(invoice.balance_after_nano_usd),
        "idempotency_key": invoice.idempotency_key,
    }


_USAGE_COLUMNS = (
    "day",
    "key_id",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "endpoint_id",
    "replica_seconds",
)
# The wire's names: ENDPOINT_STATUS_WAITING_FOR_CAPACITY → "waiting_for_capacity".
_ENDPOINT_STATUSES = {
    number: name.removeprefix("ENDPOINT_STATUS_").lower()
    for name, number in accounts_pb2.EndpointStatus.items()
    if number
}


def endpoint_json(endpoint: accounts_pb2.Endpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "workspace_id": endpoint.workspace_id,
        "name": endpoint.name,
        "model": endpoint.model,
        "offering": endpoint.offering,
        "base_model": endpoint.base_model,
        "replicas": endpoint.replicas,
        "status": _ENDPOINT_STATUSES.get(endpoint.status, "unknown"),
        "status_reason": endpoint.status_reason or None,
        "suspended_by": endpoint.suspended_by or None,
        "created": endpoint.created.ToJsonString(),
        "usd_per_replica_hour": endpoint.usd_per_replica_hour,
        "period_seconds": endpoint.period_seconds,
        "periods_billed": endpoint.periods_billed,
        "paid_until": (
            endpoint.paid_until.ToJsonString() if endpoint.HasField("paid_until") else None
        ),
        "charged_usd": format_usd(endpoint.charged_nano_usd),
        "held_usd": format_usd(endpoint.held_nano_usd),
    }


def usage_rows(response: accounts_pb2.GetUsageResponse) -> list[dict[str, Any]]:
    return [
        {
            "day": r.day,
            "key_id": r.key_id,
            "model": r.model,
            "requests": r.requests,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cost_usd": format_usd(r.cost_nano_usd),
            "endpoint_id": r.endpoint_id or None,
            "replica_seconds": r.replica_seconds,
        }
        for r in response.rows
    ]


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def _key_limits(args: argparse.Namespace) -> tuple[accounts_pb2.KeyLimits, list[str]]:
    """The limits given on the command line, and which fields were given."""
    given = {
        field: getattr(args, flag) for flag, field in _LIMIT_FLAGS.items() if hasattr(args, flag)
    }
    limits = accounts_pb2.KeyLimits(**{f: v for f, v in given.items() if v is not None})
    return limits, list(given)


# ---- commands --------------------------------------------------------------------------------


def execute(client: Client, args: argparse.Namespace) -> Any:
    """Runs one admin command and returns what to print (JSON-able, or text for CSV/HTML)."""
    handler: Handler = args.handler
    return handler(client, args)


def _workspace(client: Client, args: argparse.Namespace) -> Any:
    if args.action == "create":
        request = accounts_pb2.CreateWorkspaceRequest(name=args.name)
        if args.starter_credits is not None:
            request.starter_credits_cents = args.starter_credits
        return workspace_json(client.CreateWorkspace(request))
    if args.action == "list":
        listed = client.ListWorkspaces(accounts_pb2.ListWorkspacesRequest())
        return [workspace_json(ws) for ws in listed.workspaces]
    request_one = accounts_pb2.GetWorkspaceRequest(workspace_id=args.workspace)
    return workspace_json(client.GetWorkspace(request_one))


def _credits(client: Client, args: argparse.Namespace) -> Any:
    key = args.idempotency_key or "cli-" + secrets.token_hex(12)
    result = client.AddCredits(
        accounts_pb2.AddCreditsRequest(
            workspace_id=args.workspace, amount_cents=args.amount, idempotency_key=key
        )
    )
    return {
        "invoice": invoice_json(result.invoice),
        "workspace": workspace_json(result.workspace),
        "replayed": result.replayed,
    }


def _cap(client: Client, args: argparse.Namespace) -> Any:
    request = accounts_pb2.SetSpendCapRequest(workspace_id=args.workspace)
    if args.action == "set":
        request.cap_cents = args.amount
    return workspace_json(client.SetSpendCap(request))


def _auto_reload(client: Client, args: argparse.Namespace) -> Any:
    enabled = args.action == "set"
    request = accounts_pb2.SetAutoReloadRequest(
        workspace_id=args.workspace,
        enabled=enabled,
        threshold_cents=args.threshold if enabled else 0,
        amount_cents=args.amount if enabled else 0,
    )
    return workspace_json(client.SetAutoReload(request))


def _usage(client: Client, args: argparse.Namespace) -> Any:
    response = client.GetUsage(
        accounts_pb2.GetUsageRequest(
            workspace_id=args.workspace, key_id=args.key, since=args.since, until=args.until
        )
    )
    rows = usage_rows(response)
    if args.format != "csv":
        return rows
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_USAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _invoice(client: Client, args: argparse.Namespace) -> Any:
    pb = accounts_pb2
    if args.action == "list":
        listed = client.ListInvoices(pb.ListInvoicesRequest(workspace_id=args.workspace))
        return [invoice_json(i) for i in listed.invoices]
    fmt = pb.InvoiceFormat.Value(f"INVOICE_FORMAT_{args.format.upper()}")
    document = client.GetInvoice(pb.GetInvoiceRequest(number=args.number, format=fmt))
    if args.format == "pdf" and not args.output:
        raise SystemExit("corvex admin invoice get --format pdf needs --output FILE")
    if args.output:
        Path(args.output).write_bytes(document.document)
        return {"written": args.output, "content_type": document.content_type}
    return document.document.decode()


def _key(client: Client, args: argparse.Namespace) -> Any:
    pb = accounts_pb2
    if args.action == "create":
        limits, _ = _key_limits(args)
        created = client.CreateKey(
            pb.CreateKeyRequest(workspace_id=args.workspace, name=args.name, limits=limits)
        )
        return {"key": key_json(created.key), "secret": created.secret}
    if args.action == "list":
        listed = client.ListKeys(pb.ListKeysRequest(workspace_id=args.workspace))
        return [key_json(k) for k in listed.keys]
    if args.action == "revoke":
        return key_json(client.RevokeKey(pb.RevokeKeyRequest(key_id=args.key)))
    limits, fields = _key_limits(args)
    if not fields:
        raise AdminError("give at least one of --rpm, --tpm, --monthly-tokens")
    mask = field_mask_pb2.FieldMask(paths=fields)
    return key_json(
        client.SetKeyLimits(
            pb.SetKeyLimitsRequest(key_id=args.key, limits=limits, update_mask=mask)
        )
    )


def _endpoint(client: Client, args: argparse.Namespace) -> Any:
    pb = accounts_pb2
    if args.action == "create":
        request = pb.CreateEndpointRequest(
            workspace_id=args.workspace,
            offering=args.offering,
            replicas=args.replicas,
            name=args.name,
        )
        return endpoint_json(client.CreateEndpoint(request))
    if args.action == "list":
        listed = client.ListEndpoints(pb.ListEndpointsRequest(workspace_id=args.workspace))
        return [endpoint_json(e) for e in listed.endpoints]
    if args.action == "show":
        return endpoint_json(client.GetEndpoint(pb.GetEndpointRequest(endpoint_id=args.endpoint)))
    if args.action == "resize":
        request_resize = pb.ResizeEndpointRequest(endpoint_id=args.endpoint, replicas=args.replicas)
        return endpoint_json(client.ResizeEndpoint(request_resize))
    if args.action == "delete":
        request_delete = pb.DeleteEndpointRequest(endpoint_id=args.endpoint)
        return endpoint_json(client.DeleteEndpoint(request_delete))
    capacity = client.ListReservedCapacity(pb.ListReservedCapacityRequest())
    return {
        "period_seconds": capacity.period_seconds,
        "offerings": [
            {
                "id": c.offering.id,
                "model": c.offering.model,
                "gpus_per_replica": c.offering.gpus_per_replica,
                "usd_per_replica_hour": c.offering.usd_per_replica_hour,
                "minimum_hours": c.offering.minimum_hours,
                "replicas_total": c.replicas_total,
                "replicas_free": c.replicas_free,
            }
            for c in capacity.offerings
        ],
    }


def run(args: argparse.Namespace) -> int:
    try:
        address, token = connection(args)
        client = Client(
            address,
            token,
            ca_file=args.tls_ca or "",
            cert_file=args.tls_cert or "",
            key_file=args.tls_key or "",
        )
        try:
            result = execute(client, args)
        finally:
            client.close()
    except (AdminError, tls.TlsError) as exc:
        print(f"corvex admin: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        _print_json(result)
    return 0
