"""Credit and token leases: how several cores spend one workspace without overdrawing it.

A credit lease hands one core part of a workspace's money to admit requests against in memory.
What may be leased is the workspace's spendable amount,

    spendable = min(balance - leased, cap - month_spend - leased)    (the cap term only with a cap)

so a lease counts against the balance and against the cap's headroom at once. Charges are
paid out of a lease: each takes its cost from the lease's credit and from the balance, and
adds it to the month's spend. Releasing a lease, or its expiry after its TTL, gives what is
left of its credit back. A token lease does the same for a key's monthly token limit, with
`limit - month_tokens - tokens_leased` leasable. Neither can be overdrawn, however the calls
race: the balance never goes below zero, leases never exceed the balance, and a lease never
grows the month's spend plus leases past the cap.

How that holds. Every function is one transaction at READ COMMITTED; the CHECK constraints of
migration 0001 are the last line, so a bug here fails a transaction instead of breaking an
invariant. A grant locks the workspace (or key) row with `SELECT ... FOR NO KEY UPDATE`,
computes what to grant from that locked, current row in Python (`Spendable`, the formula's one
home), and writes it with a second statement. We lock, then update, instead of the bare
guarded `UPDATE ... SET leased = leased + $g WHERE balance - leased >= $g`, because a grant is
"up to `want`, at least `min`": the guarded form must name the amount before it sees the row,
so it would refuse a smaller grant that fits, or loop. The price is round trips (five per
acquire instead of one), paid once per lease, not per request; near $0, where each admission
leases its own hold, that is the trade for exactness (phase 2 measures it). Locking and
updating in one statement (a CTE that locks, then an UPDATE) would save them but deadlocks:
the UPDATE rechecks from its statement snapshot's older row version and waits for a tuple
lock that a concurrent `FOR NO KEY UPDATE` holds while it waits for us (test_races found it).
Rows are always locked in one order (lease, token leases by id, workspace, keys by id), and
the expiry sweep skips leases that others hold locked (they expire on the next sweep), so
these transactions never deadlock one another. A charge batch, the one operation on a core's
hot path, runs as a single statement: the same steps in the same order, in the server-side
function `corvex_charge` (migration 0003), so group commit costs one round trip per batch;
so does a credit grant (`lease_credit`, `corvex_lease_credit`, migration 0004), which near $0
a core makes for each admission.

Time comes from the caller's clock (`expires_at` is computed here, never by now() in SQL), so
tests can move it. A month rolls over on the first write in a later UTC month and never goes
back, as in the single-core ledger. A lease past its TTL can no longer be renewed, but until
a sweep has expired it, charges may still be paid from it: its credit is still set aside.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

import asyncpg
import msgspec

from corvex_core.pg import db
from corvex_core.pg.db import Clock, Connection, Pool, utc_month, utc_now

# Bounds (TigerStyle: a limit on everything).
MAX_LEASE_NANO: Final = 10**18
MAX_LEASE_TOKENS: Final = 10**12
MAX_TTL_S: Final = 3600.0
MAX_CHARGES_PER_BATCH: Final = 1000
MAX_EXPIRED_PER_SWEEP: Final = 1000


class Lease(msgspec.Struct, frozen=True):
    id: int
    core_id: str
    workspace_id: str
    credit_nano: int
    expires_at: dt.datetime


class TokenLease(msgspec.Struct, frozen=True):
    id: int
    core_id: str
    key_id: str
    tokens: int
    expires_at: dt.datetime


class Charge(msgspec.Struct, frozen=True):
    """One request's settlement. `token_lease_id` names the token lease its tokens come out of
    (for a key with a monthly token limit); the credit lease is the batch's."""

    charge_id: str
    request_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    cost_nano: int
    rate_card_version: str
    at: dt.datetime
    token_lease_id: int | None = None

    @property
    def tokens(self) -> int:
        """What counts against the key's monthly token limit."""
        return self.prompt_tokens + self.completion_tokens


class Spendable(msgspec.Struct, frozen=True):
    free_nano: int
    # None without a cap; may be negative once a cap was lowered below the month's spend.
    cap_room_nano: int | None

    @classmethod
    def of(cls, row: Any, month: str) -> Spendable:
        """From a workspace row, as of `month` (a later month's spend starts at zero)."""
        spend_nano = row["month_spend_nano"] if month <= row["month"] else 0
        cap_nano = row["spend_cap_nano"]
        free_nano = row["balance_nano"] - row["leased_nano"]
        if cap_nano is None:
            return cls(free_nano, None)
        return cls(free_nano, cap_nano - spend_nano - row["leased_nano"])

    @property
    def spendable_nano(self) -> int:
        if self.cap_room_nano is None:
            return self.free_nano
        return min(self.free_nano, self.cap_room_nano)

    @property
    def capped(self) -> bool:
        """True when the cap, not the balance, is what limits spending."""
        return self.cap_room_nano is not None and self.cap_room_nano < self.free_nano


class Expired(msgspec.Struct, frozen=True):
    """What a sweep expired, with the credit and tokens each lease gave back."""

    leases: list[Lease]
    token_leases: list[TokenLease]


class LeaseGone(Exception):
    """The lease was released or expired (or never existed); acquire a new one."""


class LeaseExceeded(Exception):
    """Charges would take more than their lease holds: the caller admitted beyond its lease."""


class Want(msgspec.Struct, frozen=True):
    """What a core asks of a grant (credit in nano-USD, or tokens).

    `least` is what makes the request it asks for admissible (0: a top-up ahead of need, which
    may get nothing), `most` all that request could use, `ahead` what the core would like to
    hold so that the next requests need no round trip (at least `most`). While the spendable
    amount is at least `exact_below`, a grant is up to `ahead`; below it, up to `most`: near
    $0 each admission leases only its own hold, so no credit is stranded on an idle core.
    """

    least: int
    most: int
    ahead: int
    exact_below: int = 0

    def __post_init__(self) -> None:
        assert 0 <= self.least <= self.most <= self.ahead, self
        assert self.exact_below >= 0, self

    def grant(self, room: int) -> int:
        """What to grant out of `room` spendable: 0 if not even `least` (or 1) fits."""
        if room < max(self.least, 1):
            return 0
        return min(room, self.ahead if room >= self.exact_below else self.most)


class Money(msgspec.Struct, frozen=True):
    """A workspace's money as a grant left it: what a core needs to explain a refusal."""

    balance_nano: int
    leased_nano: int
    month: str
    month_spend_nano: int
    spend_cap_nano: int | None

    @property
    def room(self) -> Spendable:
        return Spendable.of(msgspec.structs.asdict(self), self.month)


class CreditGrant(msgspec.Struct, frozen=True):
    """The result of `lease_credit`: the lease as it now stands (None when no lease was made),
    what was added to it, and the workspace after the grant."""

    lease: Lease | None
    granted_nano: int
    money: Money


class KeyTokens(msgspec.Struct, frozen=True):
    """A key's monthly tokens as a grant left them."""

    limit: int | None
    month: str
    month_tokens: int
    tokens_leased: int
    revoked: bool


class TokenGrant(msgspec.Struct, frozen=True):
    lease: TokenLease | None
    granted_tokens: int
    tokens: KeyTokens


_LOCK_WORKSPACE = """
SELECT balance_nano, leased_nano, month, month_spend_nano, spend_cap_nano
FROM workspaces WHERE id = $1
"""

_LOCK_KEY = """
SELECT revoked_at, limit_monthly_tokens, month, month_tokens, tokens_leased
FROM keys WHERE id = $1
"""

_CHARGE = """
SELECT corvex_charge($1, $2, $3, $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[],
                     $9::bigint[], $10::bigint[], $11::bigint[], $12::text[],
                     $13::timestamptz[], $14::bigint[])
"""
_LEASE_CREDIT = """
SELECT * FROM corvex_lease_credit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""
# The SQLSTATEs corvex_charge and corvex_lease_credit raise (migrations 0003, 0004).
_GONE: Final = "CX001"
_EXCEEDED: Final = "CX002"
_NO_WORKSPACE: Final = "CX003"

_RELEASE = """
WITH gone AS (DELETE FROM leases WHERE id = $1 RETURNING workspace_id, credit_nano)
UPDATE workspaces AS w SET leased_nano = w.leased_nano - g.credit_nano
FROM gone AS g WHERE w.id = g.workspace_id
RETURNING g.credit_nano
"""

_RELEASE_TOKENS = """
WITH gone AS (DELETE FROM token_leases WHERE id = $1 RETURNING key_id, tokens)
UPDATE keys AS k SET tokens_leased = k.tokens_leased - g.tokens
FROM gone AS g WHERE k.id = g.key_id
RETURNING g.tokens
"""


class LeaseStore:
    """The lease operations of one core (or of a test), each one transaction."""

    def __init__(self, pool: Pool, *, clock: Clock = utc_now) -> None:
        self._pool = pool
        self._clock = clock

    # ---- credit leases ---------------------------------------------------------------------

    async def acquire(
        self, workspace_id: str, core_id: str, want_nano: int, min_nano: int, ttl_s: float
    ) -> Lease | None:
        """Leases up to `want_nano` of the workspace's spendable credit, or None if not even
        `min_nano` is spendable. Rolls the month over first if a new UTC month has begun."""
        assert 1 <= min_nano <= want_nano <= MAX_LEASE_NANO, (min_nano, want_nano)
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            granted = await _grant_credit(conn, workspace_id, want_nano, min_nano, now)
            if not granted:
                return None
            row = await conn.fetchrow(
                "INSERT INTO leases (core_id, workspace_id, credit_nano, granted_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5)"
                " RETURNING id, core_id, workspace_id, credit_nano, expires_at",
                *(core_id, workspace_id, granted, now, _expiry(now, ttl_s)),
            )
        assert row is not None
        return Lease(**dict(row))

    async def renew(self, lease_id: int, ttl_s: float, top_up_nano: int = 0) -> Lease:
        """Extends a live lease to `ttl_s` from now and adds up to `top_up_nano` of spendable
        credit to it (whatever fits, maybe nothing). Raises LeaseGone past its TTL."""
        assert 0 <= top_up_nano <= MAX_LEASE_NANO, top_up_nano
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            lease = await conn.fetchrow(
                "SELECT workspace_id FROM leases WHERE id = $1 AND expires_at > $2"
                " FOR NO KEY UPDATE",
                lease_id,
                now,
            )
            if lease is None:
                raise LeaseGone(f"lease {lease_id} was released or has expired")
            granted = 0
            if top_up_nano:
                granted = await _grant_credit(conn, lease["workspace_id"], top_up_nano, 1, now)
            row = await conn.fetchrow(
                "UPDATE leases SET credit_nano = credit_nano + $2, expires_at = $3 WHERE id = $1"
                " RETURNING id, core_id, workspace_id, credit_nano, expires_at",
                *(lease_id, granted, _expiry(now, ttl_s)),
            )
        assert row is not None
        return Lease(**dict(row))

    async def release(self, lease_id: int) -> int | None:
        """Ends a lease and gives its unused credit back. Returns that credit, or None if the
        lease was already gone (released twice, or expired): releasing is idempotent."""
        async with self._pool.acquire() as conn:
            returned: int | None = await conn.fetchval(_RELEASE, lease_id)
        return returned

    async def lease_credit(
        self,
        workspace_id: str,
        core_id: str,
        lease_id: int | None,
        want: Want,
        ttl_s: float,
    ) -> CreditGrant:
        """Grants credit by the policy of `want` (see `Want`): into a new lease when `lease_id`
        is None (none is made if nothing is granted), else into that lease, whose TTL is then
        extended to `ttl_s` from now whatever is granted. Raises LeaseGone if that lease was
        released or is past its TTL. One statement: the server-side function
        `corvex_lease_credit` (migration 0004), which locks the lease, then the workspace."""
        now = self._now()
        async with self._pool.acquire() as conn:
            try:
                row = await conn.fetchrow(
                    _LEASE_CREDIT,
                    *(workspace_id, core_id, lease_id, want.least, want.most, want.ahead),
                    *(want.exact_below, now, _expiry(now, ttl_s), utc_month(now)),
                )
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == _GONE:
                    raise LeaseGone(str(exc)) from exc
                if exc.sqlstate == _NO_WORKSPACE:
                    raise db.no_workspace(workspace_id) from exc
                raise
        assert row is not None
        money = Money(
            balance_nano=row["balance_nano"],
            leased_nano=row["leased_nano"],
            month=row["month"],
            month_spend_nano=row["month_spend_nano"],
            spend_cap_nano=row["spend_cap_nano"],
        )
        lease = None
        if row["lease_id"] is not None:
            lease = Lease(
                id=row["lease_id"],
                core_id=core_id,
                workspace_id=workspace_id,
                credit_nano=row["credit_nano"],
                expires_at=row["expires_at"],
            )
        return CreditGrant(lease, row["granted_nano"], money)

    async def shrink(self, lease_id: int, give_back_nano: int) -> int | None:
        """Gives `give_back_nano` of a lease's credit back to its workspace (credit its core
        no longer needs). Returns what the lease still holds, or None if it is gone. Raises
        LeaseExceeded if the lease holds less than that."""
        assert 0 < give_back_nano <= MAX_LEASE_NANO, give_back_nano
        async with self._pool.acquire() as conn, conn.transaction():
            credit = await conn.fetchval(
                "SELECT credit_nano FROM leases WHERE id = $1 FOR NO KEY UPDATE", lease_id
            )
            if credit is None:
                return None
            await _give_back(conn, lease_id, give_back_nano)
        remaining: int = credit - give_back_nano
        return remaining

    async def release_core(self, core_id: str) -> tuple[int, int]:
        """Ends every credit and token lease of `core_id` (a core restarting: its requests in
        flight died with it) and gives back what they held. Returns (credit, tokens) given
        back."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM leases WHERE id IN (SELECT id FROM leases WHERE core_id = $1"
                " ORDER BY id FOR UPDATE) RETURNING workspace_id, credit_nano",
                core_id,
            )
            back = Counter[str]()
            for row in rows:
                back[row["workspace_id"]] += row["credit_nano"]
            await _lock_rows(conn, "workspaces", back)
            await conn.execute(
                "UPDATE workspaces AS w SET leased_nano = w.leased_nano - u.credit_nano"
                " FROM unnest($1::text[], $2::bigint[]) AS u(id, credit_nano) WHERE w.id = u.id",
                list(back),
                list(back.values()),
            )
            token_rows = await conn.fetch(
                "DELETE FROM token_leases WHERE id IN (SELECT id FROM token_leases"
                " WHERE core_id = $1 ORDER BY id FOR UPDATE) RETURNING key_id, tokens",
                core_id,
            )
            tokens_back = Counter[str]()
            for row in token_rows:
                tokens_back[row["key_id"]] += row["tokens"]
            await _lock_rows(conn, "keys", tokens_back)
            await conn.execute(
                "UPDATE keys AS k SET tokens_leased = k.tokens_leased - u.tokens"
                " FROM unnest($1::text[], $2::bigint[]) AS u(id, tokens) WHERE k.id = u.id",
                list(tokens_back),
                list(tokens_back.values()),
            )
        return sum(back.values()), sum(tokens_back.values())

    async def leases_of(self, core_id: str) -> tuple[list[Lease], list[TokenLease]]:
        """The credit and token leases `core_id` holds now, by id."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, core_id, workspace_id, credit_nano, expires_at FROM leases"
                " WHERE core_id = $1 ORDER BY id",
                core_id,
            )
            token_rows = await conn.fetch(
                "SELECT id, core_id, key_id, tokens, expires_at FROM token_leases"
                " WHERE core_id = $1 ORDER BY id",
                core_id,
            )
        return [Lease(**dict(r)) for r in rows], [TokenLease(**dict(r)) for r in token_rows]

    async def spendable(self, workspace_id: str) -> Spendable:
        """What an acquire could lease now (for a refusal's message)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_LOCK_WORKSPACE, workspace_id)
        if row is None:
            raise db.no_workspace(workspace_id)
        return Spendable.of(row, utc_month(self._now()))

    # ---- charges ---------------------------------------------------------------------------

    async def charge(
        self, lease_id: int, charges: Sequence[Charge], *, give_back_nano: int = 0
    ) -> list[str]:
        """Records a batch of charges paid from one lease, in one transaction (group commit).

        Each charge id is stored once: a retried batch pays only for charges not seen before.
        For those, the cost comes out of the lease, the balance and into the month's spend,
        and the tokens out of their token leases and into their keys' month. Returns the ids
        that were new. Raises LeaseGone (storing nothing) if the lease is gone and some charge
        is new, and LeaseExceeded if the new charges cost more than a lease holds.

        `give_back_nano` of the lease's credit, after the charges, goes back to the workspace
        in the same transaction (a core near $0 returning what its requests did not use). It
        is not idempotent: a caller retrying a batch whose outcome it does not know passes 0.

        One statement: the steps are the server-side function `corvex_charge` (migration
        0003), in the lock order of this module.
        """
        assert len(charges) <= MAX_CHARGES_PER_BATCH, len(charges)
        ids = [c.charge_id for c in charges]
        assert len(set(ids)) == len(ids), "a charge id twice in one batch"
        assert 0 <= give_back_nano <= MAX_LEASE_NANO, give_back_nano
        month = utc_month(self._now())
        async with self._pool.acquire() as conn:
            try:
                new = await conn.fetchval(
                    _CHARGE, lease_id, month, give_back_nano, *_charge_columns(charges)
                )
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == _GONE:
                    raise LeaseGone(str(exc)) from exc
                if exc.sqlstate == _EXCEEDED:
                    raise LeaseExceeded(str(exc)) from exc
                raise
        committed = set(new)
        return [charge_id for charge_id in ids if charge_id in committed]

    async def known_charges(self, charge_ids: Sequence[str]) -> set[str]:
        """Which of these charges the ledger has (to settle a batch whose outcome is unknown)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT charge_id FROM charges WHERE charge_id = ANY($1::text[])", list(charge_ids)
            )
        return {row["charge_id"] for row in rows}

    # ---- token leases ----------------------------------------------------------------------

    async def acquire_tokens(
        self, key_id: str, core_id: str, want_tokens: int, min_tokens: int, ttl_s: float
    ) -> TokenLease | None:
        """Leases up to `want_tokens` of the key's monthly token limit, or None if not even
        `min_tokens` are left or the key is revoked. A key without a limit grants `want`."""
        assert 1 <= min_tokens <= want_tokens <= MAX_LEASE_TOKENS, (min_tokens, want_tokens)
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            granted = await _grant_tokens(conn, key_id, want_tokens, min_tokens, now)
            if not granted:
                return None
            row = await conn.fetchrow(
                "INSERT INTO token_leases (core_id, key_id, tokens, granted_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING id, core_id, key_id, tokens, expires_at",
                *(core_id, key_id, granted, now, _expiry(now, ttl_s)),
            )
        assert row is not None
        return TokenLease(**dict(row))

    async def renew_tokens(self, lease_id: int, ttl_s: float, top_up_tokens: int = 0) -> TokenLease:
        """As `renew`, for a token lease."""
        assert 0 <= top_up_tokens <= MAX_LEASE_TOKENS, top_up_tokens
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            lease = await conn.fetchrow(
                "SELECT key_id FROM token_leases WHERE id = $1 AND expires_at > $2"
                " FOR NO KEY UPDATE",
                lease_id,
                now,
            )
            if lease is None:
                raise LeaseGone(f"token lease {lease_id} was released or has expired")
            granted = 0
            if top_up_tokens:
                granted = await _grant_tokens(conn, lease["key_id"], top_up_tokens, 1, now)
            row = await conn.fetchrow(
                "UPDATE token_leases SET tokens = tokens + $2, expires_at = $3 WHERE id = $1"
                " RETURNING id, core_id, key_id, tokens, expires_at",
                *(lease_id, granted, _expiry(now, ttl_s)),
            )
        assert row is not None
        return TokenLease(**dict(row))

    async def lease_tokens(
        self, key_id: str, core_id: str, lease_id: int | None, want: Want, ttl_s: float
    ) -> TokenGrant:
        """As `lease_credit`, for a key's monthly token limit."""
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            if lease_id is not None:
                found = await conn.fetchval(
                    "SELECT key_id FROM token_leases WHERE id = $1 AND expires_at > $2"
                    " FOR NO KEY UPDATE",
                    lease_id,
                    now,
                )
                if found is None:
                    raise LeaseGone(f"token lease {lease_id} was released or has expired")
                assert found == key_id, (found, key_id)
            granted, tokens = await _grant_tokens_by(conn, key_id, want, now)
            if lease_id is None and not granted:
                return TokenGrant(None, 0, tokens)
            if lease_id is None:
                row = await conn.fetchrow(
                    "INSERT INTO token_leases (core_id, key_id, tokens, granted_at, expires_at)"
                    " VALUES ($1, $2, $3, $4, $5) RETURNING id, core_id, key_id, tokens,"
                    " expires_at",
                    *(core_id, key_id, granted, now, _expiry(now, ttl_s)),
                )
            else:
                row = await conn.fetchrow(
                    "UPDATE token_leases SET tokens = tokens + $2, expires_at = $3 WHERE id = $1"
                    " RETURNING id, core_id, key_id, tokens, expires_at",
                    *(lease_id, granted, _expiry(now, ttl_s)),
                )
        assert row is not None
        return TokenGrant(TokenLease(**dict(row)), granted, tokens)

    async def shrink_tokens(self, lease_id: int, give_back_tokens: int) -> int | None:
        """As `shrink`, for a token lease."""
        assert 0 < give_back_tokens <= MAX_LEASE_TOKENS, give_back_tokens
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT key_id, tokens FROM token_leases WHERE id = $1 FOR NO KEY UPDATE",
                lease_id,
            )
            if row is None:
                return None
            if row["tokens"] < give_back_tokens:
                raise LeaseExceeded(f"token lease {lease_id} holds less than it gives back")
            await conn.execute(
                "UPDATE token_leases SET tokens = tokens - $2 WHERE id = $1",
                lease_id,
                give_back_tokens,
            )
            await conn.execute(
                "UPDATE keys SET tokens_leased = tokens_leased - $2 WHERE id = $1",
                row["key_id"],
                give_back_tokens,
            )
        remaining: int = row["tokens"] - give_back_tokens
        return remaining

    async def release_tokens(self, lease_id: int) -> int | None:
        """As `release`, for a token lease."""
        async with self._pool.acquire() as conn:
            returned: int | None = await conn.fetchval(_RELEASE_TOKENS, lease_id)
        return returned

    # ---- expiry ----------------------------------------------------------------------------

    async def expire(self, now: dt.datetime) -> Expired:
        """Ends every lease whose TTL has passed at `now` and gives back what it held: a dead
        core's credit returns to its workspace. Leases that another transaction holds locked
        right now are left for the next sweep. Any core may sweep; sweeps may overlap."""
        async with self._pool.acquire() as conn, conn.transaction():
            leases = [
                Lease(**dict(row)) for row in await conn.fetch(_EXPIRE, now, MAX_EXPIRED_PER_SWEEP)
            ]
            back = Counter[str]()
            for lease in leases:
                back[lease.workspace_id] += lease.credit_nano
            await _lock_rows(conn, "workspaces", back)
            await conn.execute(
                "UPDATE workspaces AS w SET leased_nano = w.leased_nano - u.credit_nano"
                " FROM unnest($1::text[], $2::bigint[]) AS u(id, credit_nano) WHERE w.id = u.id",
                list(back),
                list(back.values()),
            )
            token_rows = await conn.fetch(_EXPIRE_TOKENS, now, MAX_EXPIRED_PER_SWEEP)
            token_leases = [TokenLease(**dict(row)) for row in token_rows]
            tokens_back = Counter[str]()
            for token_lease in token_leases:
                tokens_back[token_lease.key_id] += token_lease.tokens
            await _lock_rows(conn, "keys", tokens_back)
            await conn.execute(
                "UPDATE keys AS k SET tokens_leased = k.tokens_leased - u.tokens"
                " FROM unnest($1::text[], $2::bigint[]) AS u(id, tokens) WHERE k.id = u.id",
                list(tokens_back),
                list(tokens_back.values()),
            )
        return Expired(leases, token_leases)

    def _now(self) -> dt.datetime:
        now = self._clock()
        assert now.tzinfo is not None, "the clock must give aware datetimes"
        return now


_EXPIRE = """
DELETE FROM leases WHERE id IN (
    SELECT id FROM leases WHERE expires_at <= $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
)
RETURNING id, core_id, workspace_id, credit_nano, expires_at
"""

_EXPIRE_TOKENS = """
DELETE FROM token_leases WHERE id IN (
    SELECT id FROM token_leases WHERE expires_at <= $1 ORDER BY id LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id, core_id, key_id, tokens, expires_at
"""


def _expiry(now: dt.datetime, ttl_s: float) -> dt.datetime:
    assert 0 < ttl_s <= MAX_TTL_S, ttl_s
    return now + dt.timedelta(seconds=ttl_s)


async def _grant_credit(
    conn: Connection, workspace_id: str, want_nano: int, min_nano: int, now: dt.datetime
) -> int:
    """Adds up to `want_nano` of spendable credit to the workspace's leased total, under its
    row lock, and returns it; 0 (changing nothing) if less than `min_nano` is spendable."""
    want = Want(min_nano, want_nano, want_nano)
    granted, _ = await _grant_credit_by(conn, workspace_id, want, now)
    return granted


async def _grant_credit_by(
    conn: Connection, workspace_id: str, want: Want, now: dt.datetime
) -> tuple[int, Money]:
    """As `_grant_credit`, by the policy of `want`; also returns the workspace after it."""
    row = await conn.fetchrow(_LOCK_WORKSPACE + " FOR NO KEY UPDATE", workspace_id)
    if row is None:
        raise db.no_workspace(workspace_id)
    month = max(row["month"], utc_month(now))
    room = Spendable.of(row, month)
    grant_nano = want.grant(room.spendable_nano)
    spend_nano = row["month_spend_nano"] if month == row["month"] else 0
    money = Money(
        balance_nano=row["balance_nano"],
        leased_nano=row["leased_nano"] + grant_nano,
        month=month,
        month_spend_nano=spend_nano,
        spend_cap_nano=row["spend_cap_nano"],
    )
    if grant_nano == 0:
        return 0, money
    await conn.execute(
        "UPDATE workspaces SET leased_nano = leased_nano + $2, month = $3, month_spend_nano = $4"
        " WHERE id = $1",
        *(workspace_id, grant_nano, month, spend_nano),
    )
    return grant_nano, money


async def _grant_tokens(
    conn: Connection, key_id: str, want_tokens: int, min_tokens: int, now: dt.datetime
) -> int:
    """As `_grant_credit`, for a key's monthly token limit; 0 for a revoked key."""
    granted, _ = await _grant_tokens_by(
        conn, key_id, Want(min_tokens, want_tokens, want_tokens), now
    )
    return granted


async def _grant_tokens_by(
    conn: Connection, key_id: str, want: Want, now: dt.datetime
) -> tuple[int, KeyTokens]:
    """As `_grant_tokens`, by the policy of `want`; also returns the key's tokens after it.
    A key without a monthly limit grants `want.ahead`."""
    row = await conn.fetchrow(_LOCK_KEY + " FOR NO KEY UPDATE", key_id)
    if row is None:
        raise db.no_key(key_id)
    month = max(row["month"], utc_month(now))
    used = row["month_tokens"] if month == row["month"] else 0
    limit = row["limit_monthly_tokens"]
    revoked = row["revoked_at"] is not None
    if revoked:
        grant_tokens = 0
    elif limit is None:
        grant_tokens = want.ahead if want.ahead >= max(want.least, 1) else 0
    else:
        grant_tokens = want.grant(limit - used - row["tokens_leased"])
    tokens = KeyTokens(limit, month, used, row["tokens_leased"] + grant_tokens, revoked)
    if grant_tokens == 0:
        return 0, tokens
    await conn.execute(
        "UPDATE keys SET tokens_leased = tokens_leased + $2, month = $3, month_tokens = $4"
        " WHERE id = $1",
        *(key_id, grant_tokens, month, used),
    )
    return grant_tokens, tokens


def _charge_columns(charges: Sequence[Charge]) -> list[object]:
    """The arrays of corvex_charge, one per column, in its parameters' order."""
    return [
        [c.charge_id for c in charges],
        [c.request_id for c in charges],
        [c.key_id for c in charges],
        [c.model for c in charges],
        [c.prompt_tokens for c in charges],
        [c.completion_tokens for c in charges],
        [c.cached_prompt_tokens for c in charges],
        [c.cost_nano for c in charges],
        [c.rate_card_version for c in charges],
        [c.at for c in charges],
        [c.token_lease_id for c in charges],
    ]


async def _give_back(conn: Connection, lease_id: int, nano: int) -> None:
    """Moves `nano` of a lease's credit (its row locked) back to its workspace."""
    workspace_id = await conn.fetchval(
        "UPDATE leases SET credit_nano = credit_nano - $2 WHERE id = $1 AND credit_nano >= $2"
        " RETURNING workspace_id",
        lease_id,
        nano,
    )
    if workspace_id is None:
        raise LeaseExceeded(f"lease {lease_id} holds less than the {nano} nano-USD given back")
    await conn.execute(
        "UPDATE workspaces SET leased_nano = leased_nano - $2 WHERE id = $1", workspace_id, nano
    )


async def _lock_rows(conn: Connection, table: str, ids: Counter[str]) -> None:
    """Locks rows in id order, the one order every transaction here uses."""
    assert table in ("workspaces", "keys"), table
    if ids:
        await conn.execute(
            f"SELECT 1 FROM {table} WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE",
            sorted(ids),
        )
