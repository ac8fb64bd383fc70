"""The edge's configuration: the `edge:` section of the Corvex YAML file."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class DashboardConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The customers' web app (gateway/dashboard): public pricing, sign-in and the dashboard."""

    enabled: bool = True
    # Mark cookies Secure: set it when the edge is reached over TLS (behind a TLS proxy).
    secure_cookies: bool = False
    # Sign-in and sign-up attempts per client address per minute (the core also limits
    # failed sign-ins per email).
    sign_in_per_minute: int = 20


class CoreTlsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """TLS to the cores: their certificates must be signed by `ca_file` and name the host the
    edge dials; `cert_file`/`key_file` are this edge's own, for cores that require clients to
    present one (mutual TLS). Empty: plaintext (loopback cores only)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


class EdgeConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # gRPC address of the core.
    core: str = "127.0.0.1:50051"
    # gRPC addresses of several cores: each request goes to a healthy one that serves its
    # model, with the fewest requests in flight (gateway/routing.py). Empty: `core` alone.
    cores: list[str] = msgspec.field(default_factory=list)
    # How often the edge reads each core's served models again.
    models_refresh_s: Seconds = 10.0
    core_tls: CoreTlsConfig = msgspec.field(default_factory=CoreTlsConfig)
    # Plaintext to cores that are not on a loopback address (a network that encrypts for you).
    allow_plaintext: bool = False
    # Let several edge processes listen on one port (SO_REUSEPORT; `corvex edge --workers N`).
    reuse_port: bool = False
    # Prometheus /metrics, on its own port like the core's (the API port serves only the API,
    # /health and /ready). Port 0 picks a free port; -1 turns the endpoint off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9465
    # Largest request body accepted; larger ones get 413.
    max_body_bytes: int = 4 * 1024 * 1024
    # Longest a request may take end to end (gRPC deadline), seconds.
    request_timeout_s: Seconds = 600.0
    # Connections. One that carries no request for idle_timeout_s is closed (also one that
    # never sends any); it outlasts the 60 s idle timeout of common load balancers, so they
    # close first. A request's line and headers must arrive within header_timeout_s of its
    # first byte, its body within body_timeout_s (else 408). Beyond max_connections open
    # connections, a new one is answered 503 and closed.
    idle_timeout_s: Seconds = 75.0
    header_timeout_s: Seconds = 10.0
    body_timeout_s: Seconds = 60.0
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    # gRPC keepalive pings to the core, also while no call is in flight, every core_keepalive_s;
    # the core must accept pings that often (core.keepalive_min_ping_interval_s is lower).
    # A ping unanswered within core_keepalive_timeout_s closes the connection.
    # How generation requests travel to the core: "streams", many on one Inference.Streams
    # call whose chunks the core batches per engine step (the cheap way at load); "calls", a
    # Chat or Complete call each (what an ordinary gRPC client does).
    core_transport: Literal["streams", "calls"] = "streams"
    core_keepalive_s: Seconds = 30.0
    core_keepalive_timeout_s: Seconds = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = "auto"
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)

    @property
    def core_addresses(self) -> list[str]:
        return list(self.cores) or [self.core]
