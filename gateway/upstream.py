"""The edge's side of the gRPC link to the core: the channel (with keepalive pings the core is
configured to accept), what every call carries (the caller's key, the request id, a deadline),
and which of the core's response metadata goes back to the client as headers.

Only what gRPC metadata can carry is forwarded: an Authorization header that is not printable
ASCII cannot hold a Corvex key, so it is answered 401 here and never quoted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

import grpc
from aiohttp import web

from corvex import tls
from corvex.v1 import inference_pb2
from gateway.config import EdgeConfig
from gateway.errors import ApiError
from gateway.state import EDGE, REQUEST_ID

MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
# gRPC's default limit on all metadata of a call is 8 KiB; a key is ~50 characters.
MAX_AUTHORIZATION_CHARS: Final = 1024
# gRPC metadata values (non-binary) are printable ASCII: space to tilde.
_METADATA_VALUE: Final = re.compile(r"[\x20-\x7e]*")
# gRPC metadata from the core that is returned to clients as HTTP headers.
_FORWARDED_PREFIXES: Final = ("x-ratelimit-",)


def channel_options(config: EdgeConfig) -> list[tuple[str, int]]:
    """Keepalive as grpc's doc/keepalive.md asks: pings every `core_keepalive_s` even without
        calls (so a dead core is noticed before a request needs it), with no cap on pings without
        data. The core accepts them because its `keepalive_min_ping_interval_s` is lower; a client
        that pinged more often than the server allows would get GOAWAY `too_many_pings`. Reconnects
    back off to at most 2 s (gRPC's default grows to 120 s), so a restarted core is back in the
    edge's rotation within seconds."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", round(config.core_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.core_keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def open_channel(config: EdgeConfig, address: str | None = None) -> grpc.aio.Channel:
    """A channel to one core (`config.core` unless `address`), with TLS if configured."""
    target = address or config.core
    tls_config = config.core_tls
    if not tls_config.ca_file:
        return grpc.aio.insecure_channel(target, options=channel_options(config))
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.read_pem(tls_config.ca_file, "edge.core_tls.ca_file"),
            private_key=(
                tls.read_pem(tls_config.key_file, "edge.core_tls.key_file")
                if tls_config.key_file
                else None
            ),
            certificate_chain=(
                tls.read_pem(tls_config.cert_file, "edge.core_tls.cert_file")
                if tls_config.cert_file
                else None
            ),
        )
    except tls.TlsError as exc:
        raise ValueError(str(exc)) from exc
    return grpc.aio.secure_channel(target, credentials, options=channel_options(config))


def check_plaintext(config: EdgeConfig) -> None:
    """Plaintext to a core that is not on this machine is refused: configure core_tls."""
    if config.core_tls.ca_file or config.allow_plaintext:
        return
    remote = [a for a in config.core_addresses if not tls.is_loopback(tls.host_of(a))]
    if remote:
        raise ValueError(
            f"the cores {', '.join(remote)} are not on a loopback address and edge.core_tls "
            "is not set: configure edge.core_tls.ca_file (and cert_file/key_file for mutual TLS), "
            "or edge.allow_plaintext: true on a network that encrypts for you"
        )


def generate(
    request: web.Request, rpc_request: inference_pb2.ChatRequest | inference_pb2.CompleteRequest
) -> Any:
    """Starts a generation request on the core the router picks, on that core's Streams call
    or as a call of its own (edge.core_transport). Either way the handler gets something that
    reads as a grpc.aio streaming call."""
    inference = request.app[EDGE].inference
    if isinstance(rpc_request, inference_pb2.ChatRequest):
        return inference.Chat(rpc_request, **call_options(request))
    return inference.Complete(rpc_request, **call_options(request))


def call_options(request: web.Request) -> dict[str, Any]:
    """What every call to the core carries: the caller's key and request id, and a deadline."""
    return {
        "metadata": metadata(authorization(request), request[REQUEST_ID]),
        "timeout": request.app[EDGE].config.request_timeout_s,
    }


def authorization(request: web.Request) -> str | None:
    """The request's Authorization header; two of them are not one credential (401)."""
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        raise ApiError(
            401,
            "The request has more than one Authorization header; send exactly one.",
            code="invalid_api_key",
        )
    return values[0] if values else None


def metadata(credential: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for the core: the caller's key (checked there) and the request id."""
    if not credential:
        return (("x-request-id", request_id),)
    if len(credential) > MAX_AUTHORIZATION_CHARS or not _METADATA_VALUE.fullmatch(credential):
        raise ApiError(
            401,
            "The Authorization header does not hold a valid API key: send "
            "`Authorization: Bearer <your key>`, in printable ASCII.",
            code="invalid_api_key",
        )
    return (("x-request-id", request_id), ("authorization", credential))


def response_headers(initial: Iterable[tuple[str, Any]] | None, request_id: str) -> dict[str, str]:
    return {"x-request-id": request_id, **forwarded(initial)}


def forwarded(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The core's metadata that goes back to the client as headers (the key's limits)."""
    return {
        key: value
        for key, value in metadata or ()
        if key.startswith(_FORWARDED_PREFIXES) and isinstance(value, str)
    }
