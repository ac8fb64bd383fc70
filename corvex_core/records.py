"""Journal records: one immutable record per durable change of the ledger.

The ledger applies these and only these to change durable state, live and during recovery,
so replaying the journal rebuilds exactly the state that acknowledged callers saw. Records
are msgpack-encoded tagged Structs; a record type never changes meaning once written (add a
new type instead). Holds are not records: they live only in memory, so a restart releases
them without charging.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec


class TopUpMethod(enum.StrEnum):
    """How credits arrived. The journal stores the value; the wire's TopUpMethod enum names
    the same members (TOP_UP_METHOD_<NAME>)."""

    MANUAL = "manual"
    STARTER = "starter"
    AUTO_RELOAD = "auto_reload"


class KeyLimits(msgspec.Struct, frozen=True, omit_defaults=True):
    """Per-key limits; None means no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_tokens: int | None = None


# The names of the per-key limits, in one place (the wire's KeyLimits has the same fields).
KEY_LIMIT_FIELDS: Final = tuple(f.name for f in msgspec.structs.fields(KeyLimits))


class _Record(msgspec.Struct, frozen=True, array_like=True, tag_field="t"):
    at_ms: int


class WorkspaceCreated(_Record, tag="ws", frozen=True):
    workspace_id: str
    name: str


class CreditsAdded(_Record, tag="credit", frozen=True):
    """A top-up and its invoice."""

    workspace_id: str
    invoice_number: int
    amount_nano: int
    method: TopUpMethod
    idempotency_key: str


class SpendCapSet(_Record, tag="cap", frozen=True):
    workspace_id: str
    cap_nano: int | None


class AutoReloadSet(_Record, tag="reload", frozen=True):
    workspace_id: str
    enabled: bool
    threshold_nano: int
    amount_nano: int


class AutoReloadFailed(_Record, tag="reload_failed", frozen=True):
    workspace_id: str
    error: str


class KeyCreated(_Record, tag="key", frozen=True):
    key_id: str
    workspace_id: str
    name: str
    prefix: str
    secret_sha256: bytes
    limits: KeyLimits


class KeyRevoked(_Record, tag="key_revoked", frozen=True):
    key_id: str


class KeyLimitsSet(_Record, tag="key_limits", frozen=True):
    key_id: str
    limits: KeyLimits


class Charged(_Record, tag="charge", frozen=True):
    """The settlement of one request: the usage record. `charge_id` is unique."""

    charge_id: str
    request_id: str
    workspace_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    cost_nano: int
    rate_card_version: str


# ---- Reserved endpoints (issue 17) -----------------------------------------------------------
# An endpoint's life and its money. Every period an endpoint is billed for is one
# EndpointPeriodCharged, numbered 1, 2, 3, ... per endpoint: recovery sees exactly which periods
# were charged, so none is charged twice and none that was served is lost.


class SuspendedBy(enum.StrEnum):
    """What could not cover an endpoint's next period."""

    BALANCE = "balance"
    SPEND_CAP = "spend_cap"


class EndpointCreated(_Record, tag="ep", frozen=True):
    endpoint_id: str
    workspace_id: str
    name: str
    # What the workspace's keys send: `<workspace-slug>/<name>`.
    model_id: str
    offering_id: str
    base_model: str
    replicas: int


class EndpointPeriodCharged(_Record, tag="ep_period", frozen=True):
    """One billing period of an endpoint, prepaid at its start: [start_ms, end_ms)."""

    endpoint_id: str
    workspace_id: str
    period: int
    start_ms: int
    end_ms: int
    replicas: int
    cost_nano: int
    rate_card_version: str


class EndpointResized(_Record, tag="ep_resize", frozen=True):
    """A new replica count. `charge_nano` bills added replicas for the rest of the period."""

    endpoint_id: str
    workspace_id: str
    replicas: int
    charge_nano: int
    # Replica-seconds that charge pays for (for usage).
    charged_replica_s: int


class EndpointSuspended(_Record, tag="ep_suspend", frozen=True):
    endpoint_id: str
    workspace_id: str
    by: SuspendedBy


class EndpointResumed(_Record, tag="ep_resume", frozen=True):
    endpoint_id: str
    workspace_id: str


class EndpointDeleted(_Record, tag="ep_delete", frozen=True):
    endpoint_id: str
    workspace_id: str


# ---- end of reserved endpoints ---------------------------------------------------------------

# ---- Customers (issue 16): users, sessions, the starter claim, alert settings. ---------------


class UserSignedUp(_Record, tag="user", frozen=True):
    """A user and the workspace it owns, made together (one record: neither exists alone)."""

    user_id: str
    # Lower case; unique.
    email: str
    # `corvex_core.passwords` format ("scrypt$..."); never the password.
    password_hash: str
    workspace_id: str
    workspace_name: str


class SessionStarted(_Record, tag="session", frozen=True):
    """A sign-in. Only the token's hash is kept; it stops working at `expires_ms`."""

    session_id: str
    user_id: str
    token_sha256: bytes
    expires_ms: int


class SessionEnded(_Record, tag="session_end", frozen=True):
    """A sign-out (or a session pushed out by newer ones of the same user)."""

    session_id: str


class StarterClaimed(_Record, tag="starter_claim", frozen=True):
    """A user's one claim of starter credits: credited to its workspace with an invoice
    (method starter), like a CreditsAdded, and the user marked as having claimed."""

    user_id: str
    workspace_id: str
    invoice_number: int
    amount_nano: int


class AlertsSet(_Record, tag="alerts", frozen=True):
    """A workspace's alert settings. The webhook secret signs deliveries (HMAC-SHA256)."""

    workspace_id: str
    balance_below_nano: int | None
    webhook_url: str
    webhook_secret: str


CustomerRecord = UserSignedUp | SessionStarted | SessionEnded | StarterClaimed | AlertsSet

# ---- end of Customers (issue 16). -------------------------------------------------------------


Record = (
    CustomerRecord
    | WorkspaceCreated
    | CreditsAdded
    | SpendCapSet
    | AutoReloadSet
    | AutoReloadFailed
    | KeyCreated
    | KeyRevoked
    | KeyLimitsSet
    | Charged
    | EndpointCreated
    | EndpointPeriodCharged
    | EndpointResized
    | EndpointSuspended
    | EndpointResumed
    | EndpointDeleted
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Record] = msgspec.msgpack.Decoder(Record)


def encode(record: Record) -> bytes:
    return _encoder.encode(record)


def decode(data: bytes) -> Record:
    return _decoder.decode(data)
