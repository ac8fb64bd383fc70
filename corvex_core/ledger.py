"""The ledger: workspaces, prepaid balances, spend caps, holds, keys, invoices, usage and the
money of reserved endpoints (their periods, each held before it starts and charged once).

It is a single-threaded state machine. Every method is synchronous and runs to completion on
the event loop with no `await` inside, so no two mutations interleave; each asserts the money
invariants after it changes anything. Durable changes happen only by applying a journal
record (`apply`), live and during recovery alike; the journal sink sees every record before
its caller is told the change happened. Holds exist only in memory. It never does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from collections.abc import Callable
from typing import Final

import msgspec

from corvex.money import NANO_PER_CENT, format_usd
from corvex.quoting import quote
from corvex.ratecard import ModelRate
from corvex_core import errors, state
from corvex_core.records import (
    KEY_LIMIT_FIELDS,
    AlertsSet,
    AutoReloadFailed,
    AutoReloadSet,
    Charged,
    CreditsAdded,
    EndpointCreated,
    EndpointDeleted,
    EndpointPeriodCharged,
    EndpointResized,
    EndpointResumed,
    EndpointSuspended,
    KeyCreated,
    KeyLimits,
    KeyLimitsSet,
    KeyRevoked,
    Record,
    SessionEnded,
    SessionStarted,
    SpendCapSet,
    StarterClaimed,
    SuspendedBy,
    TopUpMethod,
    UserSignedUp,
    WorkspaceCreated,
)
from corvex_core.state import (
    Alerts,
    ApiKey,
    AutoReload,
    Endpoint,
    EndpointStatus,
    Invoice,
    LedgerState,
    Session,
    User,
    Workspace,
    check,
    idempotency_slot,
    roll_key_month,
    roll_month,
)

KEY_PREFIX: Final = "corvex-"
# Bounds on what callers may put in the ledger (TigerStyle: a limit on everything).
MAX_NAME_CHARS: Final = 100
MAX_IDEMPOTENCY_KEY_CHARS: Final = 200
# $1B in nano-USD: far beyond any real top-up, far below int64 overflow.
MAX_AMOUNT_NANO: Final = 10**18
# The most a balance may hold: what the wire's int64 of nano-USD carries, in whole billions.
MAX_BALANCE_NANO: Final = 9 * 10**18
# Replicas of one reserved endpoint: far beyond any pool, and what keeps its money in bounds.
MAX_REPLICAS: Final = 1024
# Endpoints a workspace may have that are not deleted (suspended ones hold no capacity, so the
# pool alone does not bound them; the billing loop looks at every one each tick).
MAX_ENDPOINTS_PER_WORKSPACE: Final = 64
# Key secrets: 43 characters of 62 carry 256 bits of entropy, and copy-paste cleanly.
_SECRET_ALPHABET: Final = string.ascii_letters + string.digits
SESSION_PREFIX: Final = "corvex-session-"
# Live sessions per user; signing in once more ends the oldest.
MAX_SESSIONS_PER_USER: Final = 20
MAX_LIVE_KEYS_PER_WORKSPACE: Final = 1000
MAX_EMAIL_CHARS: Final = 254
MAX_URL_CHARS: Final = 2000


def email_taken() -> errors.EmailTaken:
    """The refusal of a sign-up whose email has an account (on one core or in a cluster)."""
    return errors.EmailTaken(
        "An account with this email exists already; sign in instead.",
        metadata={"param": "email"},
    )


def invalid_session() -> errors.InvalidSession:
    """The refusal of a session token that is unknown, expired or signed out."""
    return errors.InvalidSession("The session is unknown, expired or signed out; sign in again.")


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class UsageRow(msgspec.Struct, frozen=True):
    day: str
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nano: int
    # Set on a reserved endpoint's replica-time row (key_id "", no tokens).
    endpoint_id: str = ""
    replica_seconds: int = 0


class Hold(msgspec.Struct):
    """Money reserved for one request in flight. Resolved exactly once."""

    id: str
    workspace_id: str
    key_id: str
    rate: ModelRate
    rate_card_version: str
    prompt_tokens: int
    max_completion_tokens: int
    amount_nano: int
    resolved: bool = False
    # Set when the ledger fell back to the durable state (a failed journal write): the
    # money this hold held is gone with the state it was placed in, so it settles to nothing.
    voided: bool = False


class FixedHold(msgspec.Struct):
    """Money reserved for a reserved endpoint's next period (a fixed amount, like a request's
    hold in every other way: it counts against the balance and the spend cap, and it resolves
    exactly once, charged or released)."""

    id: str
    workspace_id: str
    endpoint_id: str
    amount_nano: int
    # What it covers: accrual periods (more than one for a minimum term) of `replicas`.
    periods: int
    replicas: int
    rate_card_version: str
    resolved: bool = False
    # As for a request's hold: a rollback to the disk voids it, and it then resolves to nothing.
    voided: bool = False


RecordSink = Callable[[Record], None]


def _discard(record: Record) -> None:
    del record


class Ledger:
    """The accounts state machine. See the module docstring for its rules."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        sink: RecordSink = _discard,
        state: LedgerState | None = None,
    ) -> None:
        self._clock = clock
        self._sink = sink
        self._holds: dict[str, Hold] = {}
        self._fixed_holds: dict[str, FixedHold] = {}
        self.restore(state or LedgerState())

    def restore(self, state: LedgerState) -> None:
        """Replaces the whole state with a recovered one (a snapshot). Only before serving."""
        assert not self._holds and not self._fixed_holds, "restore with holds in place"
        self._install(state)

    def rollback(self, state: LedgerState, records: list[Record]) -> None:
        """Falls back to what is durable (a snapshot and the records after it), after a failed
        journal write left memory ahead of the disk. Holds in flight are voided: they settle
        to nothing, since no charge can be recorded any more."""
        for hold in self._holds.values():
            hold.voided = True
        for fixed in self._fixed_holds.values():
            fixed.voided = True
        self._holds.clear()
        self._fixed_holds.clear()
        self._install(state)
        for record in records:
            self.apply(record)

    def _install(self, state: LedgerState) -> None:
        self._state = state
        self._by_hash = {k.secret_sha256: k for k in state.keys.values()}
        self._session_by_hash = {s.token_sha256: s for s in state.sessions.values()}
        for ws in state.workspaces.values():
            ws.held_nano = 0  # Holds of a previous process are released, never charged.
            check(ws)

    def set_sink(self, sink: RecordSink) -> None:
        """Where new records go (the journal), from now on."""
        self._sink = sink

    # ---- reads -------------------------------------------------------------------------

    @property
    def state(self) -> LedgerState:
        return self._state

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def workspace(self, workspace_id: str) -> Workspace:
        ws = self._state.workspaces.get(workspace_id)
        if ws is None:
            raise errors.NotFound(f"No workspace {workspace_id}.")
        roll_month(ws, self.now_ms())
        return ws

    def workspaces(self) -> list[Workspace]:
        return [self.workspace(ws_id) for ws_id in self._state.workspaces]

    def key(self, key_id: str) -> ApiKey:
        key = self._state.keys.get(key_id)
        if key is None:
            raise errors.NotFound(f"No API key {key_id}.")
        roll_key_month(key, self.now_ms())
        return key

    def keys(self, workspace_id: str) -> list[ApiKey]:
        return [self.key(k) for k in self.workspace(workspace_id).key_ids]

    def authenticate(self, secret: str) -> ApiKey:
        """The live key with this secret. Raises InvalidApiKey for anything else."""
        digest = hash_secret(secret)
        key = self._by_hash.get(digest)
        # The dict lookup is keyed by a hash the caller cannot steer; compare_digest keeps the
        # final comparison constant-time as well.
        if key is None or not hmac.compare_digest(key.secret_sha256, digest) or key.revoked:
            raise errors.InvalidApiKey(
                "Incorrect, unknown or revoked API key. Create a key with "
                "`corvex admin key create` and send it as `Authorization: Bearer <key>`."
            )
        roll_key_month(key, self.now_ms())
        # In memory only: a journal write per request would double the journal's work. After
        # a restart, the last charge (replayed) stands in for it.
        key.last_used_ms = self.now_ms()
        return key

    def invoice(self, number: int) -> Invoice:
        invoice = self._state.invoices.get(number)
        if invoice is None:
            raise errors.NotFound(f"No invoice INV-{number:06d}.")
        return invoice

    def invoices(self, workspace_id: str) -> list[Invoice]:
        return [self._state.invoices[n] for n in self.workspace(workspace_id).invoice_numbers]

    def usage(
        self, workspace_id: str, *, key_id: str = "", since: str = "", until: str = ""
    ) -> list[UsageRow]:
        """Usage rows of a workspace between two UTC days (inclusive), sorted."""
        self.workspace(workspace_id)
        rows = []
        for bucket, totals in self._state.usage.get(workspace_id, {}).items():
            day, row_key, model = bucket.split("|", 2)
            if key_id and row_key != key_id:
                continue
            if (since and day < since) or (until and day > until):
                continue
            rows.append(UsageRow(day, row_key, model, *msgspec.structs.astuple(totals)))
        for bucket, used in self._state.endpoint_usage.get(workspace_id, {}).items():
            day, endpoint_id = bucket.split("|", 1)
            if key_id or (since and day < since) or (until and day > until):
                continue
            model = self._state.endpoints[endpoint_id].model_id
            rows.append(
                UsageRow(day, "", model, 0, 0, 0, used.cost_nano, endpoint_id, used.replica_s)
            )
        rows.sort(key=lambda r: (r.day, r.key_id, r.model, r.endpoint_id))
        return rows

    def held_total_nano(self) -> int:
        held = sum(h.amount_nano for h in self._holds.values())
        return held + sum(h.amount_nano for h in self._fixed_holds.values())

    # ---- account changes (each emits one record) -----------------------------------------

    def create_workspace(self, name: str, starter_nano: int) -> tuple[Workspace, Invoice | None]:
        _check_name(name)
        _check_amount(starter_nano, allow_zero=True)
        if starter_nano % NANO_PER_CENT:
            raise errors.InvalidRequest("starter credits are whole cents", param="amount")
        now = self.now_ms()
        ws_id = "ws_" + secrets.token_hex(8)
        self._commit(WorkspaceCreated(at_ms=now, workspace_id=ws_id, name=name))
        invoice = None
        if starter_nano:
            invoice, _ = self.add_credits(
                ws_id, starter_nano, TopUpMethod.STARTER, f"starter:{ws_id}"
            )
        return self.workspace(ws_id), invoice

    def add_credits(
        self, workspace_id: str, amount_nano: int, method: TopUpMethod, idempotency_key: str
    ) -> tuple[Invoice, bool]:
        """Credits a top-up and makes its invoice. Returns (invoice, replayed)."""
        self.workspace(workspace_id)
        if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise errors.InvalidRequest(
                f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                param="idempotency_key",
            )
        previous = self._state.idempotency.get(idempotency_slot(workspace_id, idempotency_key))
        if previous is not None:
            invoice = self._state.invoices[previous]
            if invoice.amount_nano != amount_nano:
                raise errors.InvalidRequest(
                    f"idempotency_key {idempotency_key!r} was used for a top-up of "
                    f"${format_usd(invoice.amount_nano)}; use a new key for a different amount",
                    param="idempotency_key",
                )
            return invoice, True
        _check_amount(amount_nano)
        if amount_nano % NANO_PER_CENT:
            raise errors.InvalidRequest("top-ups are whole cents", param="amount")
        check_balance_room(self.workspace(workspace_id).balance_nano, amount_nano)
        number = self._state.next_invoice
        self._commit(
            CreditsAdded(
                at_ms=self.now_ms(),
                workspace_id=workspace_id,
                invoice_number=number,
                amount_nano=amount_nano,
                method=method,
                idempotency_key=idempotency_key,
            )
        )
        return self._state.invoices[number], False

    def set_spend_cap(self, workspace_id: str, cap_nano: int | None) -> Workspace:
        self.workspace(workspace_id)
        if cap_nano is not None:
            _check_amount(cap_nano, allow_zero=True)
        self._commit(SpendCapSet(at_ms=self.now_ms(), workspace_id=workspace_id, cap_nano=cap_nano))
        return self.workspace(workspace_id)

    def set_auto_reload(
        self, workspace_id: str, *, enabled: bool, threshold_nano: int, amount_nano: int
    ) -> Workspace:
        self.workspace(workspace_id)
        if enabled:
            _check_amount(threshold_nano, allow_zero=True)
            _check_amount(amount_nano)
        else:
            threshold_nano = amount_nano = 0
        self._commit(
            AutoReloadSet(
                at_ms=self.now_ms(),
                workspace_id=workspace_id,
                enabled=enabled,
                threshold_nano=threshold_nano,
                amount_nano=amount_nano,
            )
        )
        return self.workspace(workspace_id)

    def record_auto_reload_failure(self, workspace_id: str, error: str) -> None:
        self.workspace(workspace_id)
        self._commit(
            AutoReloadFailed(at_ms=self.now_ms(), workspace_id=workspace_id, error=error[:500])
        )

    def create_key(self, workspace_id: str, name: str, limits: KeyLimits) -> tuple[ApiKey, str]:
        """Creates a key. Returns it and its secret, which is never stored."""
        ws = self.workspace(workspace_id)
        live = sum(not self._state.keys[k].revoked for k in ws.key_ids)
        if live >= MAX_LIVE_KEYS_PER_WORKSPACE:
            raise errors.InvalidRequest(
                f"A workspace has at most {MAX_LIVE_KEYS_PER_WORKSPACE} live keys; revoke one "
                "first."
            )
        _check_name(name)
        _check_limits(limits)
        secret = KEY_PREFIX + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(43))
        key_id = "key_" + secrets.token_hex(8)
        self._commit(
            KeyCreated(
                at_ms=self.now_ms(),
                key_id=key_id,
                workspace_id=workspace_id,
                name=name,
                prefix=secret[: len(KEY_PREFIX) + 4],
                secret_sha256=hash_secret(secret),
                limits=limits,
            )
        )
        return self.key(key_id), secret

    def revoke_key(self, key_id: str) -> ApiKey:
        if not self.key(key_id).revoked:
            self._commit(KeyRevoked(at_ms=self.now_ms(), key_id=key_id))
        return self.key(key_id)

    def set_key_limits(self, key_id: str, limits: KeyLimits) -> ApiKey:
        self.key(key_id)
        _check_limits(limits)
        self._commit(KeyLimitsSet(at_ms=self.now_ms(), key_id=key_id, limits=limits))
        return self.key(key_id)

    # ---- customers (issue 16): users, sessions, the starter claim, alerts -----------------

    def user(self, user_id: str) -> User:
        user = self._state.users.get(user_id)
        if user is None:
            raise errors.NotFound(f"No user {user_id}.")
        return user

    def user_by_email(self, email: str) -> User | None:
        user_id = self._state.user_by_email.get(normalize_email(email))
        return None if user_id is None else self._state.users[user_id]

    def sign_up(self, email: str, password_hash: str, workspace_name: str) -> User:
        """A user and its workspace. `email` is checked (check_email) by the caller before it
        hashes the password; this checks again, since another sign-up may have come first."""
        email = check_email(email)
        _check_name(workspace_name)
        if email in self._state.user_by_email:
            raise email_taken()
        user_id = "usr_" + secrets.token_hex(8)
        self._commit(
            UserSignedUp(
                at_ms=self.now_ms(),
                user_id=user_id,
                email=email,
                password_hash=password_hash,
                workspace_id="ws_" + secrets.token_hex(8),
                workspace_name=workspace_name.strip(),
            )
        )
        return self._state.users[user_id]

    def start_session(self, user_id: str, ttl_ms: int) -> tuple[Session, str]:
        """A new session of the user, and its token (never stored: the ledger keeps a hash)."""
        self.user(user_id)
        now = self.now_ms()
        live = list(self.user(user_id).session_ids)  # oldest first
        for old in live[: max(0, len(live) - MAX_SESSIONS_PER_USER + 1)]:
            self._commit(SessionEnded(at_ms=now, session_id=old))
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        session_id = "ses_" + secrets.token_hex(8)
        self._commit(
            SessionStarted(
                at_ms=now,
                session_id=session_id,
                user_id=user_id,
                token_sha256=hash_secret(token),
                expires_ms=now + ttl_ms,
            )
        )
        return self._state.sessions[session_id], token

    def session(self, token: str) -> Session:
        """The live session with this token. Raises InvalidSession for anything else."""
        digest = hash_secret(token)
        session = self._session_by_hash.get(digest)
        if (
            session is None
            or not hmac.compare_digest(session.token_sha256, digest)
            or session.expires_ms <= self.now_ms()
        ):
            raise invalid_session()
        return session

    def end_session(self, session_id: str) -> None:
        if session_id in self._state.sessions:
            self._commit(SessionEnded(at_ms=self.now_ms(), session_id=session_id))

    def claim_starter(self, user_id: str, workspace_id: str, amount_nano: int) -> Invoice:
        """Credits the user's starter credits to its workspace, once per user."""
        user = self.user(user_id)
        self.workspace(workspace_id)
        assert workspace_id in user.workspace_ids, "authorized before it gets here"
        if user.starter_invoice:
            raise errors.StarterCreditsUnavailable(
                f"Starter credits were claimed already (invoice INV-{user.starter_invoice:06d}); "
                "they are given once per account."
            )
        _check_amount(amount_nano)
        if amount_nano % NANO_PER_CENT:
            raise errors.InvalidRequest("starter credits are whole cents", param="amount")
        number = self._state.next_invoice
        self._commit(
            StarterClaimed(
                at_ms=self.now_ms(),
                user_id=user_id,
                workspace_id=workspace_id,
                invoice_number=number,
                amount_nano=amount_nano,
            )
        )
        return self._state.invoices[number]

    def set_alerts(self, workspace_id: str, alerts: Alerts) -> Workspace:
        self.workspace(workspace_id)
        if alerts.balance_below_nano is not None:
            _check_amount(alerts.balance_below_nano, allow_zero=True)
        check_webhook_url(alerts.webhook_url)
        self._commit(
            AlertsSet(
                at_ms=self.now_ms(),
                workspace_id=workspace_id,
                balance_below_nano=alerts.balance_below_nano,
                webhook_url=alerts.webhook_url,
                webhook_secret=alerts.webhook_secret,
            )
        )
        return self.workspace(workspace_id)

    # ---- holds ---------------------------------------------------------------------------

    def affordable_completion_tokens(
        self, ws: Workspace, rate: ModelRate, prompt_tokens: int
    ) -> int:
        """Most completion tokens the workspace can pay for after the prompt (may be < 0)."""
        room = _spendable_nano(ws) - rate.cost_nano(prompt_tokens, 0)
        if room < 0:
            return -1
        if rate.output_nano_per_token == 0:
            return 2**62
        return room // rate.output_nano_per_token

    def _check_affordable(
        self, ws: Workspace, rate: ModelRate, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Raises InsufficientCredits, with a sentence saying what is affordable, if the hold
        for this request cannot be covered by the balance and the spend cap."""
        cost = rate.cost_nano(prompt_tokens, completion_tokens)
        available = ws.available_nano
        cap_room = _cap_room_nano(ws)
        if cost <= available and (cap_room is None or cost <= cap_room):
            return
        affordable = max(self.affordable_completion_tokens(ws, rate, prompt_tokens), 0)
        by_cap = cap_room is not None and cap_room < available
        raise errors.InsufficientCredits(
            _insufficient_message(ws, prompt_tokens, affordable, by_cap=by_cap),
            metadata={
                "limit": "spend_cap" if by_cap else "balance",
                "available_nano_usd": str(max(_spendable_nano(ws), 0)),
                "affordable_completion_tokens": str(affordable),
            },
        )

    def reserve(
        self,
        hold_id: str,
        key: ApiKey,
        rate: ModelRate,
        rate_card_version: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Hold:
        """Holds the most a request can cost. Raises InsufficientCredits if it cannot."""
        assert hold_id not in self._holds, hold_id
        assert prompt_tokens >= 0 and max_completion_tokens >= 0
        ws = self.workspace(key.workspace_id)
        self._check_affordable(ws, rate, prompt_tokens, max_completion_tokens)
        amount = rate.cost_nano(prompt_tokens, max_completion_tokens)
        hold = Hold(
            id=hold_id,
            workspace_id=ws.id,
            key_id=key.id,
            rate=rate,
            rate_card_version=rate_card_version,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=max_completion_tokens,
            amount_nano=amount,
        )
        ws.held_nano += amount
        self._holds[hold_id] = hold
        check(ws)
        cap_room = _cap_room_nano(ws)
        assert cap_room is None or cap_room >= 0, "a hold passed the spend cap"
        return hold

    def settle(
        self,
        hold: Hold,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
    ) -> Charged | None:
        """Charges a finished request for the tokens it used and releases the rest of its hold.

        Returns the charge record, or None when nothing was charged (no tokens, or a hold
        voided by a rollback). The counts are within the hold (metering cuts them to it).
        """
        if hold.voided:
            return None
        assert not hold.resolved, f"hold {hold.id} resolved twice"
        assert self._holds.pop(hold.id) is hold
        hold.resolved = True
        ws = self.workspace(hold.workspace_id)
        ws.held_nano -= hold.amount_nano
        assert 0 <= prompt_tokens <= hold.prompt_tokens, "prompt beyond the hold"
        assert 0 <= completion_tokens <= hold.max_completion_tokens, "completion beyond the hold"
        assert 0 <= cached_prompt_tokens <= prompt_tokens
        cost = hold.rate.cost_nano(prompt_tokens, completion_tokens)
        assert 0 <= cost <= hold.amount_nano
        if prompt_tokens == 0 and completion_tokens == 0:
            check(ws)
            return None
        record = Charged(
            at_ms=self.now_ms(),
            charge_id="ch_" + secrets.token_hex(12),
            request_id=request_id,
            workspace_id=ws.id,
            key_id=hold.key_id,
            model=hold.rate.id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
            cost_nano=cost,
            rate_card_version=hold.rate_card_version,
        )
        self._commit(record)
        return record

    # ---- reserved endpoints (issue 17) ----------------------------------------------------

    def endpoint(self, endpoint_id: str) -> Endpoint:
        endpoint = self._state.endpoints.get(endpoint_id)
        if endpoint is None:
            raise errors.NotFound(f"No reserved endpoint {quote(endpoint_id)}.")
        return endpoint

    def endpoints(self, workspace_id: str | None = None) -> list[Endpoint]:
        """Endpoints not deleted, of one workspace or all, oldest first."""
        if workspace_id is not None:
            self.workspace(workspace_id)
        return [
            e
            for e in self._state.endpoints.values()
            if e.status is not EndpointStatus.DELETED
            and (workspace_id is None or e.workspace_id == workspace_id)
        ]

    def create_endpoint(
        self,
        workspace_id: str,
        *,
        name: str,
        model_id: str,
        offering_id: str,
        base_model: str,
        replicas: int,
        hold_nano: int,
        hold_periods: int,
        rate_card_version: str,
        what: str,
    ) -> tuple[Endpoint, FixedHold]:
        """Records a new endpoint and holds its first period, or raises (InsufficientCredits,
        InvalidRequest for a name in use) having changed nothing. The caller checked the name's
        form, the offering and the capacity."""
        ws = self.workspace(workspace_id)
        _check_name(name)
        assert 1 <= replicas <= MAX_REPLICAS
        live = self.endpoints(workspace_id)
        if any(e.model_id == model_id for e in live):
            raise errors.InvalidRequest(
                f"The workspace already has an endpoint named {quote(name)}.", param="name"
            )
        if len(live) >= MAX_ENDPOINTS_PER_WORKSPACE:
            raise errors.InvalidRequest(
                f"A workspace may have at most {MAX_ENDPOINTS_PER_WORKSPACE} reserved endpoints; "
                "delete one first.",
                param="workspace_id",
            )
        check_fixed_affordable(ws, hold_nano, what)
        endpoint_id = "ep_" + secrets.token_hex(8)
        self._commit(
            EndpointCreated(
                at_ms=self.now_ms(),
                endpoint_id=endpoint_id,
                workspace_id=workspace_id,
                name=name,
                model_id=model_id,
                offering_id=offering_id,
                base_model=base_model,
                replicas=replicas,
            )
        )
        endpoint = self.endpoint(endpoint_id)
        hold = self._place_fixed(endpoint, hold_nano, hold_periods, replicas, rate_card_version)
        return endpoint, hold

    def hold_fixed(
        self,
        endpoint: Endpoint,
        amount_nano: int,
        *,
        periods: int,
        replicas: int,
        rate_card_version: str,
        what: str,
    ) -> FixedHold:
        """Holds an endpoint's next period. Raises InsufficientCredits (saying `what` could not
        be covered, by the balance or by the spend cap) if the workspace cannot."""
        check_fixed_affordable(self.workspace(endpoint.workspace_id), amount_nano, what)
        return self._place_fixed(endpoint, amount_nano, periods, replicas, rate_card_version)

    def _place_fixed(
        self,
        endpoint: Endpoint,
        amount_nano: int,
        periods: int,
        replicas: int,
        rate_card_version: str,
    ) -> FixedHold:
        assert 1 <= amount_nano <= MAX_AMOUNT_NANO and periods >= 1 and replicas >= 1
        assert endpoint.status is not EndpointStatus.DELETED
        ws = self.workspace(endpoint.workspace_id)
        hold = FixedHold(
            id="fhold_" + secrets.token_hex(12),
            workspace_id=ws.id,
            endpoint_id=endpoint.id,
            amount_nano=amount_nano,
            periods=periods,
            replicas=replicas,
            rate_card_version=rate_card_version,
        )
        ws.held_nano += amount_nano
        self._fixed_holds[hold.id] = hold
        check(ws)
        cap_room = _cap_room_nano(ws)
        assert cap_room is None or cap_room >= 0, "a fixed hold passed the spend cap"
        return hold

    def release_fixed(self, hold: FixedHold) -> None:
        """Gives a fixed hold back uncharged (the endpoint was deleted, resized or stopped)."""
        if hold.voided:
            return
        self._resolve_fixed(hold)
        check(self.workspace(hold.workspace_id))

    def charge_period(self, hold: FixedHold, *, start_ms: int, period_ms: int) -> Endpoint:
        """Charges the held period: `hold.periods` accrual periods of `period_ms` from
        `start_ms`, as the endpoint's next period id. Returns the endpoint."""
        assert not hold.voided, "a voided hold cannot be charged"
        endpoint = self.endpoint(hold.endpoint_id)
        assert endpoint.replicas == hold.replicas, "the hold is for another replica count"
        self._resolve_fixed(hold)
        self._commit(
            EndpointPeriodCharged(
                at_ms=self.now_ms(),
                endpoint_id=endpoint.id,
                workspace_id=endpoint.workspace_id,
                period=endpoint.period + 1,
                start_ms=start_ms,
                end_ms=start_ms + hold.periods * period_ms,
                replicas=hold.replicas,
                cost_nano=hold.amount_nano,
                rate_card_version=hold.rate_card_version,
            )
        )
        return endpoint

    def resize_endpoint(
        self,
        endpoint_id: str,
        replicas: int,
        *,
        charge_nano: int,
        charged_replica_s: int,
        hold: FixedHold | None,
        what: str,
    ) -> FixedHold | None:
        """Records a new replica count, charging `charge_nano` for added replicas, and moves
        `hold` (the next period's) to the new count. Raises InsufficientCredits, changing
        nothing, if the workspace cannot pay the charge and the larger hold. Returns the new
        hold (None when there was none)."""
        endpoint = self.endpoint(endpoint_id)
        ws = self.workspace(endpoint.workspace_id)
        assert 1 <= replicas <= MAX_REPLICAS and 0 <= charge_nano <= MAX_AMOUNT_NANO
        new_amount = 0
        if hold is not None:
            assert not hold.voided and hold.amount_nano % hold.replicas == 0
            new_amount = hold.amount_nano // hold.replicas * replicas
        released = hold.amount_nano if hold is not None else 0
        if charge_nano + new_amount > released:
            check_fixed_affordable(ws, charge_nano + new_amount, what, releasing=released)
        if hold is not None:
            self._resolve_fixed(hold)
        self._commit(
            EndpointResized(
                at_ms=self.now_ms(),
                endpoint_id=endpoint_id,
                workspace_id=endpoint.workspace_id,
                replicas=replicas,
                charge_nano=charge_nano,
                charged_replica_s=charged_replica_s,
            )
        )
        if hold is None:
            return None
        return self._place_fixed(
            endpoint, new_amount, hold.periods, replicas, hold.rate_card_version
        )

    def suspend_endpoint(self, endpoint_id: str, by: SuspendedBy) -> Endpoint:
        endpoint = self.endpoint(endpoint_id)
        self._commit(
            EndpointSuspended(
                at_ms=self.now_ms(),
                endpoint_id=endpoint_id,
                workspace_id=endpoint.workspace_id,
                by=by,
            )
        )
        return endpoint

    def resume_endpoint(self, endpoint_id: str) -> Endpoint:
        endpoint = self.endpoint(endpoint_id)
        self._commit(
            EndpointResumed(
                at_ms=self.now_ms(), endpoint_id=endpoint_id, workspace_id=endpoint.workspace_id
            )
        )
        return endpoint

    def delete_endpoint(self, endpoint_id: str) -> Endpoint:
        endpoint = self.endpoint(endpoint_id)
        self._commit(
            EndpointDeleted(
                at_ms=self.now_ms(), endpoint_id=endpoint_id, workspace_id=endpoint.workspace_id
            )
        )
        return endpoint

    def _resolve_fixed(self, hold: FixedHold) -> None:
        assert not hold.resolved, f"fixed hold {hold.id} resolved twice"
        assert self._fixed_holds.pop(hold.id) is hold
        hold.resolved = True
        ws = self.workspace(hold.workspace_id)
        ws.held_nano -= hold.amount_nano
        assert ws.held_nano >= 0

    def needs_auto_reload(self, workspace_id: str) -> AutoReload | None:
        ws = self.workspace(workspace_id)
        if ws.auto_reload is not None and ws.balance_nano < ws.auto_reload.threshold_nano:
            return ws.auto_reload
        return None

    # ---- applying records ----------------------------------------------------------------

    def apply(self, record: Record) -> None:
        """Applies one journal record. Used live (through `_commit`) and by recovery."""
        gone: list[Session] = []
        if isinstance(record, SessionEnded) and record.session_id in self._state.sessions:
            gone = [self._state.sessions[record.session_id]]
        elif isinstance(record, SessionStarted):
            gone = state.expired_sessions(self._state, record.user_id, record.at_ms)
        state.apply(self._state, record)
        if isinstance(record, KeyCreated):
            key = self._state.keys[record.key_id]
            self._by_hash[key.secret_sha256] = key
        elif isinstance(record, SessionStarted):
            session = self._state.sessions[record.session_id]
            self._session_by_hash[session.token_sha256] = session
        # Sessions ended, or expired and removed by a sign-in (see state): so are their hashes.
        for session in gone:
            self._session_by_hash.pop(session.token_sha256, None)

    def _commit(self, record: Record) -> None:
        """Hands a new record to the journal, then applies it. The journal refuses (raises)
        before queueing anything if it cannot take the record, so memory never changes for a
        record the disk will not get; applying it cannot fail but for a bug."""
        self._sink(record)
        self.apply(record)

    # ---- rules ---------------------------------------------------------------------------


def _cap_room_nano(ws: Workspace) -> int | None:
    if ws.spend_cap_nano is None:
        return None
    return ws.spend_cap_nano - ws.month_spend_nano - ws.held_nano


def _spendable_nano(ws: Workspace) -> int:
    cap_room = _cap_room_nano(ws)
    return ws.available_nano if cap_room is None else min(ws.available_nano, cap_room)


def check_fixed_affordable(
    ws: Workspace, amount_nano: int, what: str, *, releasing: int = 0
) -> None:
    """Raises InsufficientCredits, saying that `what` could not be covered and by what,
    unless `amount_nano` fits the balance and the spend cap once `releasing` (a hold about to
    be given back) is free again. Shared with the cluster ledger (pg/endpoints.py), whose
    workspaces count what cores hold on lease as held."""
    available = ws.available_nano + releasing
    cap_room = _cap_room_nano(ws)
    if cap_room is not None:
        cap_room += releasing
    if amount_nano <= available and (cap_room is None or amount_nano <= cap_room):
        return
    by_cap = cap_room is not None and cap_room < available
    if by_cap:
        assert ws.spend_cap_nano is not None and cap_room is not None
        reason = (
            f"the monthly spend cap of ${format_usd(ws.spend_cap_nano)} leaves "
            f"${format_usd(max(cap_room, 0))} in {ws.month}"
        )
    else:
        held = f", ${format_usd(ws.held_nano)} of it held" if ws.held_nano else ""
        reason = f"the balance is ${format_usd(ws.balance_nano)}{held}"
    raise errors.InsufficientCredits(
        f"{what} costs ${format_usd(amount_nano)}, but {reason}.",
        metadata={
            "limit": "spend_cap" if by_cap else "balance",
            "available_nano_usd": str(max(_spendable_nano(ws), 0)),
            "needed_nano_usd": str(amount_nano),
        },
    )


def _insufficient_message(
    ws: Workspace, prompt_tokens: int, affordable: int, *, by_cap: bool
) -> str:
    """A sentence a person can act on: what stopped the request and what would let it run."""
    if by_cap:
        room = _cap_room_nano(ws)
        assert ws.spend_cap_nano is not None and room is not None
        message = (
            f"Monthly spend cap of ${format_usd(ws.spend_cap_nano)} reached: "
            f"${format_usd(ws.month_spend_nano)} spent in {ws.month} and "
            f"${format_usd(ws.held_nano)} held by requests in flight leave "
            f"${format_usd(max(room, 0))}, which "
        )
    else:
        held = f" (${format_usd(ws.held_nano)} of it held by requests in flight)"
        message = f"Balance ${format_usd(ws.balance_nano)}{held if ws.held_nano else ''} "
    prompt = f"this prompt's {_tokens(prompt_tokens)}"
    if affordable > 0:
        message += (
            f"covers at most {_tokens(affordable, 'output ')} after {prompt}; lower max_tokens, "
        )
    else:
        message += f"does not cover {prompt} and one output token; "
    return message + ("raise the cap or wait for the next month." if by_cap else "top up.")


def _tokens(count: int, kind: str = "") -> str:
    return f"{count} {kind}token{'' if count == 1 else 's'}"


def check_balance_room(balance_nano: int, amount_nano: int) -> None:
    """Refuses a top-up that would take the balance past MAX_BALANCE_NANO (before anything
    is recorded: beyond it the balance no longer fits the wire). Shared with pg/accounts.py."""
    if balance_nano + amount_nano > MAX_BALANCE_NANO:
        raise errors.InvalidRequest(
            f"A balance holds at most ${format_usd(MAX_BALANCE_NANO)}; this top-up would "
            f"bring it to ${format_usd(balance_nano + amount_nano)}.",
            param="amount",
        )


def _check_name(name: str) -> None:
    if not 1 <= len(name.strip()) <= MAX_NAME_CHARS:
        raise errors.InvalidRequest(f"name must be 1 to {MAX_NAME_CHARS} characters", param="name")


def _check_amount(amount_nano: int, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= amount_nano <= MAX_AMOUNT_NANO:
        raise errors.InvalidRequest(
            f"amount must be {'at least $0' if allow_zero else 'positive'} and at most "
            f"${format_usd(MAX_AMOUNT_NANO)}",
            param="amount",
        )


def _check_limits(limits: KeyLimits) -> None:
    for name in KEY_LIMIT_FIELDS:
        value = getattr(limits, name)
        if value is not None and not 1 <= value <= 10**12:
            raise errors.InvalidRequest(f"{name} must be from 1 to 10^12", param=name)


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_email(email: str) -> str:
    """The email as stored (trimmed, lower case), or InvalidRequest naming `email`."""
    email = normalize_email(email)
    local, at, domain = email.partition("@")
    if (
        not 3 <= len(email) <= MAX_EMAIL_CHARS
        or not at
        or not local
        or "." not in domain.strip(".")
        or "@" in domain
        or not email.isprintable()
        or any(c.isspace() for c in email)
    ):
        raise errors.InvalidRequest("Enter an email address like name@example.com.", param="email")
    return email


def check_webhook_url(url: str) -> None:
    if not url:
        return
    if (
        len(url) > MAX_URL_CHARS
        or not url.startswith(("http://", "https://"))
        or any(c.isspace() for c in url)
    ):
        raise errors.InvalidRequest(
            f"webhook_url must be an http:// or https:// URL of at most {MAX_URL_CHARS} characters",
            param="webhook_url",
        )
