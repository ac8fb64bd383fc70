"""The mirror: the accounts of the cluster ledger as the in-memory `Ledger` admission reads.

Admission in a cluster is what it is on a single core: synchronous, against a `Ledger`, with
holds. Here that ledger mirrors PostgreSQL, and three of its numbers mean what *this core*
may spend rather than what the workspace has:

- a workspace's `balance_nano` is the credit this core holds on lease for it. A lease counts
  against the balance and the spend cap at once (pg/leases.py), so the mirror has no cap and
  its month spend is never read;
- a limited key's monthly token limit is the tokens its token lease lent it, and its
  `month_tokens` what was charged against them: their difference is what the lease still holds.
  Its month never rolls over (the lease carries over a month; PostgreSQL rolls the real count);
- a key's requests and tokens per minute are this core's share of the key's limits.

Names, key hashes, revocations and which limits a key has come from PostgreSQL through
`install_*`; credit moves only by `lend` and `call_back` (a lease grew or shrank) and by the
charges of settled requests. Every change asserts the invariants, as the ledger's do. Nothing
here does I/O. The input rules of account changes are the single-core ledger's, re-exported
for the cluster's Accounts service.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable
from typing import Final

import msgspec

from corvex.ratecard import ModelRate
from corvex_core import errors
from corvex_core.ledger import (
    KEY_PREFIX,
    Ledger,
    _check_amount,
    _check_limits,
    _check_name,
    hash_secret,
)
from corvex_core.records import Charged, KeyLimits, Record
from corvex_core.state import ApiKey, Workspace, check

# A mirrored key's month: later than any real one, so `roll_key_month` never resets the count
# of tokens charged against its lease.
NEVER_ROLLS: Final = "9999-12"
_SECRET_ALPHABET: Final = string.ascii_letters + string.digits

# The single-core ledger's rules for what callers may put in the ledger, shared.
check_name = _check_name
check_amount = _check_amount
check_limits = _check_limits


def new_key_secret() -> tuple[str, str, bytes]:
    """A new key's secret, its shown prefix and its hash, made as the single-core ledger makes
    them (43 characters of 62: 256 bits)."""
    secret = KEY_PREFIX + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(43))
    return secret, secret[: len(KEY_PREFIX) + 4], hash_secret(secret)


class UnknownKey(errors.InvalidApiKey):
    """No mirrored key has this secret. It may have been made on another core a moment ago,
    so serving asks PostgreSQL once before refusing."""

    def __init__(self, message: str, secret_sha256: bytes) -> None:
        super().__init__(message)
        self.secret_sha256 = secret_sha256


class Money(msgspec.Struct, frozen=True):
    """A workspace's money in PostgreSQL: what a refusal's sentence is made from."""

    balance_nano: int
    leased_nano: int
    month: str
    month_spend_nano: int
    spend_cap_nano: int | None


class MirrorLedger(Ledger):
    """See the module docstring."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)

    # ---- installing what PostgreSQL holds ----------------------------------------------------

    def install_workspace(self, workspace_id: str, name: str, created_ms: int) -> Workspace:
        ws = self._state.workspaces.get(workspace_id)
        if ws is None:
            ws = Workspace(id=workspace_id, name=name, created_ms=created_ms)
            self._state.workspaces[workspace_id] = ws
        ws.name = name
        return ws

    def install_key(
        self,
        key: ApiKey,
        *,
        requests_share: int | None,
        tokens_share: int | None,
        monthly_limited: bool,
    ) -> ApiKey:
        """Installs or updates a key from PostgreSQL (`key` carries its id, workspace, name,
        prefix, hash, creation and revocation), with this core's shares of its per-minute
        limits. A key that gains a monthly limit starts with no lease tokens; one that keeps
        it keeps what its lease lent; one that loses it has no monthly limit here."""
        assert key.workspace_id in self._state.workspaces, key.workspace_id
        known = self._state.keys.get(key.id)
        lent: int | None = None
        if monthly_limited:
            lent = 0 if known is None else known.limits.monthly_tokens or 0
        limits = KeyLimits(requests_share, tokens_share, lent)
        if known is None:
            known = ApiKey(
                id=key.id,
                workspace_id=key.workspace_id,
                name=key.name,
                prefix=key.prefix,
                secret_sha256=key.secret_sha256,
                created_ms=key.created_ms,
                limits=limits,
                revoked=key.revoked,
                month=NEVER_ROLLS,
            )
            self._state.keys[key.id] = known
            self._state.workspaces[key.workspace_id].key_ids.append(key.id)
            self._by_hash[known.secret_sha256] = known
        known.name = key.name
        # A revocation is never undone.
        known.revoked = known.revoked or key.revoked
        known.limits = limits
        return known

    def apply(self, record: Record) -> None:
        super().apply(record)
        if isinstance(record, Charged):
            # Usage lives in PostgreSQL; totals kept here would only grow.
            self._state.usage.pop(record.workspace_id, None)

    def mirrored_key(self, key_id: str) -> ApiKey | None:
        return self._state.keys.get(key_id)

    def mirrored_workspace(self, workspace_id: str) -> Workspace | None:
        return self._state.workspaces.get(workspace_id)

    def authenticate(self, secret: str) -> ApiKey:
        digest = hash_secret(secret)
        if digest not in self._by_hash:
            raise UnknownKey(
                "Incorrect, unknown or revoked API key. Create a key with "
                "`corvex admin key create` and send it as `Authorization: Bearer <key>`.",
                digest,
            )
        return super().authenticate(secret)

    # ---- lease credit and tokens ---------------------------------------------------------------

    def free_nano(self, workspace_id: str) -> int:
        """Credit of this core's lease that no hold uses."""
        return self._state.workspaces[workspace_id].available_nano

    def lend(self, workspace_id: str, nano: int) -> None:
        """The workspace's lease grew by `nano`."""
        assert nano >= 0, nano
        ws = self._state.workspaces[workspace_id]
        ws.balance_nano += nano
        check(ws)

    def call_back(self, workspace_id: str, nano: int) -> None:
        """`nano` of free lease credit is no longer this core's to spend (given back, set
        aside for one request, or lost with a lapsed lease)."""
        ws = self._state.workspaces[workspace_id]
        assert 0 <= nano <= ws.available_nano, (nano, ws.available_nano)
        ws.balance_nano -= nano
        check(ws)

    def free_tokens(self, key: ApiKey, reserved_tokens: int) -> int | None:
        """Tokens of the key's token lease that no request in flight holds; None without a
        monthly limit."""
        lent = key.limits.monthly_tokens
        if lent is None:
            return None
        free = lent - key.month_tokens - reserved_tokens
        assert free >= 0, (key.id, lent, key.month_tokens, reserved_tokens)
        return free

    def lend_tokens(self, key: ApiKey, tokens: int) -> None:
        assert tokens >= 0 and key.limits.monthly_tokens is not None, (key.id, tokens)
        key.limits = msgspec.structs.replace(
            key.limits, monthly_tokens=key.limits.monthly_tokens + tokens
        )

    def call_back_tokens(self, key: ApiKey, tokens: int, reserved_tokens: int) -> None:
        free = self.free_tokens(key, reserved_tokens)
        assert free is not None and 0 <= tokens <= free, (key.id, tokens, free)
        assert key.limits.monthly_tokens is not None
        key.limits = msgspec.structs.replace(
            key.limits, monthly_tokens=key.limits.monthly_tokens - tokens
        )

    # ---- refusals in PostgreSQL's numbers --------------------------------------------------

    def unaffordable(
        self, money: Money, rate: ModelRate, prompt_tokens: int, completion_tokens: int
    ) -> errors.InsufficientCredits:
        """The refusal a single core would give with the workspace's money as PostgreSQL has
        it (what other cores hold on lease counts as held)."""
        view = Workspace(
            id="",
            name="",
            created_ms=0,
            balance_nano=money.balance_nano,
            spend_cap_nano=money.spend_cap_nano,
            month=money.month,
            month_spend_nano=money.month_spend_nano,
            held_nano=min(money.leased_nano, money.balance_nano),
        )
        try:
            self._check_affordable(view, rate, prompt_tokens, completion_tokens)
        except errors.InsufficientCredits as refusal:
            return refusal
        # PostgreSQL could lend it a moment ago, but requests on this core took it meanwhile.
        return errors.InsufficientCredits(
            "The balance was taken by other requests in flight; retry, lower max_tokens or top up.",
            metadata={"limit": "balance"},
        )
