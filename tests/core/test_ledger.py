"""The ledger, example by example: credits, holds, caps, months, keys, usage and replay.

Every test drives a real `Ledger` with an injected clock; nothing of the ledger is mocked.
Prices are written here as nano-USD per token (the catalogue's DeepSeek and GLM prices), so a
change of the real rate card cannot change what these tests expect.
"""

from __future__ import annotations

import calendar
import hashlib
import re

import msgspec
import pytest

from corvex.money import NANO_PER_CENT, NANO_PER_USD
from corvex.ratecard import ModelRate
from corvex_core import errors
from corvex_core.ledger import MAX_AMOUNT_NANO, MAX_BALANCE_NANO, Ledger, UsageRow
from corvex_core.records import Charged, CreditsAdded, KeyCreated, KeyLimits, Record
from corvex_core.state import ApiKey, LedgerState

VERSION = "2026-11-01"


def _rate(model_id: str, input_nano: int, output_nano: int, context: int = 131_072) -> ModelRate:
    return ModelRate(
        id=model_id,
        name=model_id.split("/")[1],
        card_path=f"/models/{model_id}",
        input_usd_per_million=f"{input_nano / 1000:.2f}",
        output_usd_per_million=f"{output_nano / 1000:.2f}",
        input_nano_per_token=input_nano,
        output_nano_per_token=output_nano,
        context_length=context,
        listed_unix_s=0,
    )


DEEPSEEK = _rate("deepseek-ai/DeepSeek-V4-Flash", 350, 1_400)
GLM = _rate("zai-org/GLM-5.1-FP8", 500, 2_000)


def _utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, sec, 0, 0, 0)) * 1000


class Clock:
    """A settable wall clock in whole milliseconds, read as float seconds like time.time."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000

    def advance_ms(self, ms: int) -> None:
        self.now_ms += ms


class Recorder:
    """The journal sink: every record the ledger emits, in order."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def __call__(self, record: Record) -> None:
        self.records.append(record)

    def of(self, kind: type) -> list[Record]:
        return [r for r in self.records if isinstance(r, kind)]


@pytest.fixture
def clock() -> Clock:
    return Clock(_utc_ms(2026, 11, 14, 12))


@pytest.fixture
def sink() -> Recorder:
    return Recorder()


@pytest.fixture
def ledger(clock: Clock, sink: Recorder) -> Ledger:
    return Ledger(clock=clock, sink=sink)


def _funded(ledger: Ledger, cents: int, name: str = "acme") -> tuple[str, ApiKey, str]:
    """A workspace with `cents` of starter credits and one key: (workspace id, key, secret)."""
    ws, _ = ledger.create_workspace(name, cents * NANO_PER_CENT)
    key, secret = ledger.create_key(ws.id, "ci", KeyLimits())
    return ws.id, key, secret


# ---- credits and invoices ------------------------------------------------------------------


def test_starter_credits_make_an_invoice(ledger: Ledger, clock: Clock, sink: Recorder) -> None:
    ws, invoice = ledger.create_workspace("acme", 5 * NANO_PER_USD)

    assert invoice is not None
    assert invoice.method == "starter"
    assert invoice.amount_nano == 5 * NANO_PER_USD
    assert invoice.balance_after_nano == 5 * NANO_PER_USD
    assert invoice.workspace_id == ws.id
    assert invoice.created_ms == clock.now_ms
    assert ledger.invoices(ws.id) == [invoice]
    assert ledger.invoice(invoice.number) == invoice
    assert ws.balance_nano == 5 * NANO_PER_USD
    assert len(sink.of(CreditsAdded)) == 1


def test_zero_starter_credits_make_no_invoice(ledger: Ledger) -> None:
    ws, invoice = ledger.create_workspace("acme", 0)

    assert invoice is None
    assert ledger.invoices(ws.id) == []
    assert ws.balance_nano == 0


def test_create_workspace_with_invalid_starter_changes_nothing(
    ledger: Ledger, sink: Recorder
) -> None:
    # Regression: the starter amount used to be checked only after the workspace record was
    # committed, so a refused call still left a workspace without its credits. A ledger
    # mutation is all-or-nothing (DESIGN.md principle 4).
    with pytest.raises(errors.InvalidRequest):
        ledger.create_workspace("acme", NANO_PER_CENT + 1)

    assert ledger.workspaces() == []
    assert sink.records == []


def test_topup_with_same_idempotency_key_credits_once(ledger: Ledger, sink: Recorder) -> None:
    ws_id, _, _ = _funded(ledger, 0)

    first, replayed_first = ledger.add_credits(ws_id, 25 * NANO_PER_USD, "manual", "retry-1")
    second, replayed_second = ledger.add_credits(ws_id, 25 * NANO_PER_USD, "manual", "retry-1")

    assert (replayed_first, replayed_second) == (False, True)
    assert second == first
    assert ledger.workspace(ws_id).balance_nano == 25 * NANO_PER_USD
    assert ledger.invoices(ws_id) == [first]
    assert len(sink.of(CreditsAdded)) == 1


def test_a_balance_stops_where_the_wire_can_carry_it(ledger: Ledger, sink: Recorder) -> None:
    # Nine top-ups of $1e9 fit; a tenth would pass what an int64 of nano-USD holds.
    ws_id, _, _ = _funded(ledger, 0)
    for i in range(9):
        ledger.add_credits(ws_id, MAX_AMOUNT_NANO, "manual", f"big-{i}")
    assert ledger.workspace(ws_id).balance_nano == MAX_BALANCE_NANO < 2**63

    with pytest.raises(errors.InvalidRequest) as refused:
        ledger.add_credits(ws_id, NANO_PER_CENT, "manual", "one-more-cent")

    assert refused.value.metadata["param"] == "amount"
    assert "at most $9000000000.00" in refused.value.message
    assert ledger.workspace(ws_id).balance_nano == MAX_BALANCE_NANO
    assert len(sink.of(CreditsAdded)) == 9  # nothing was recorded for the refusal


def test_topup_reusing_a_key_for_another_amount_is_refused(ledger: Ledger) -> None:
    ws_id, _, _ = _funded(ledger, 0)
    ledger.add_credits(ws_id, 25 * NANO_PER_USD, "manual", "retry-1")

    with pytest.raises(errors.InvalidRequest) as refused:
        ledger.add_credits(ws_id, 30 * NANO_PER_USD, "manual", "retry-1")

    assert refused.value.param == "idempotency_key"
    assert "$25.00" in refused.value.message
    assert ledger.workspace(ws_id).balance_nano == 25 * NANO_PER_USD


def test_idempotency_keys_belong_to_their_workspace(ledger: Ledger) -> None:
    a, _, _ = _funded(ledger, 0, "a")
    b, _, _ = _funded(ledger, 0, "b")

    ledger.add_credits(a, NANO_PER_USD, "manual", "same")
    _, replayed = ledger.add_credits(b, NANO_PER_USD, "manual", "same")

    assert not replayed
    assert ledger.workspace(a).balance_nano == ledger.workspace(b).balance_nano == NANO_PER_USD


@pytest.mark.parametrize("amount_nano", [NANO_PER_CENT + 1, NANO_PER_CENT - 1, 1, 5 * 10**6])
def test_topups_are_whole_cents(ledger: Ledger, amount_nano: int) -> None:
    ws_id, _, _ = _funded(ledger, 0)

    with pytest.raises(errors.InvalidRequest) as refused:
        ledger.add_credits(ws_id, amount_nano, "manual", "k")

    assert refused.value.param == "amount"
    assert ledger.workspace(ws_id).balance_nano == 0
    assert ledger.invoices(ws_id) == []


@pytest.mark.parametrize("amount_nano", [0, -NANO_PER_CENT])
def test_topups_are_positive(ledger: Ledger, amount_nano: int) -> None:
    ws_id, _, _ = _funded(ledger, 0)

    with pytest.raises(errors.InvalidRequest):
        ledger.add_credits(ws_id, amount_nano, "manual", "k")

    assert ledger.workspace(ws_id).balance_nano == 0


# ---- holds -----------------------------------------------------------------------------------


def test_reserve_beyond_the_balance_says_how_many_output_tokens_it_covers(
    ledger: Ledger,
) -> None:
    ws_id, key, _ = _funded(ledger, 1)  # $0.01
    # A request in flight holds all but $0.000120: 19,760 GLM prompt tokens at 500 nano each.
    ledger.reserve("r1", key, GLM, VERSION, 19_760, 0)
    assert ledger.workspace(ws_id).available_nano == 120_000

    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r2", key, DEEPSEEK, VERSION, 0, 100)

    # 120,000 nano-USD at 1,400 nano-USD per output token: 85 tokens (85.7).
    assert "covers at most 85 output tokens" in refused.value.message
    assert refused.value.metadata["limit"] == "balance"
    assert refused.value.metadata["affordable_completion_tokens"] == "85"
    assert refused.value.metadata["available_nano_usd"] == "120000"
    assert refused.value.reason is errors.Reason.INSUFFICIENT_CREDITS
    assert ledger.held_total_nano() == 19_760 * 500  # only the first
    assert ledger.workspace(ws_id).held_nano == 19_760 * 500


def test_reserve_counts_the_prompt_before_the_output(ledger: Ledger) -> None:
    _, key, _ = _funded(ledger, 1)

    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r1", key, DEEPSEEK, VERSION, 1_000, 7_000)

    # (10,000,000 - 1,000 x 350) // 1,400 = 6,892.
    assert "covers at most 6892 output tokens" in refused.value.message
    ledger.reserve("r2", key, DEEPSEEK, VERSION, 1_000, 6_892)


def test_reserve_exactly_the_balance_is_allowed(ledger: Ledger) -> None:
    ws_id, key, _ = _funded(ledger, 1)

    ledger.reserve("r1", key, GLM, VERSION, 0, 5_000)  # 5,000 x 2,000 = $0.01 exactly

    assert ledger.workspace(ws_id).available_nano == 0


def test_usage_pauses_at_zero(ledger: Ledger) -> None:
    ws_id, key, _ = _funded(ledger, 0)

    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r1", key, DEEPSEEK, VERSION, 1, 1)

    assert refused.value.message == (
        "Balance $0.00 does not cover this prompt's 1 token and one output token; top up."
    )
    assert refused.value.metadata["limit"] == "balance"
    assert ledger.held_total_nano() == 0
    assert ledger.workspace(ws_id).held_nano == 0


def test_usage_pauses_when_the_balance_is_spent_to_zero(ledger: Ledger) -> None:
    ws_id, key, _ = _funded(ledger, 1)
    hold = ledger.reserve("r1", key, GLM, VERSION, 20_000, 0)
    ledger.settle(hold, request_id="r1", prompt_tokens=20_000, completion_tokens=0)
    assert ledger.workspace(ws_id).balance_nano == 0

    with pytest.raises(errors.InsufficientCredits):
        ledger.reserve("r2", key, DEEPSEEK, VERSION, 1, 0)


def test_settle_charges_exactly_the_tokens_used(ledger: Ledger, sink: Recorder) -> None:
    ws_id, key, _ = _funded(ledger, 100)
    hold = ledger.reserve("r1", key, DEEPSEEK, VERSION, 1_234, 4_000)
    assert ledger.workspace(ws_id).held_nano == 1_234 * 350 + 4_000 * 1_400

    charge = ledger.settle(hold, request_id="req-1", prompt_tokens=1_234, completion_tokens=567)

    cost = 1_234 * 350 + 567 * 1_400
    assert charge is not None
    assert charge.cost_nano == cost
    assert (charge.prompt_tokens, charge.completion_tokens) == (1_234, 567)
    assert (charge.model, charge.key_id, charge.request_id) == (DEEPSEEK.id, key.id, "req-1")
    assert charge.rate_card_version == VERSION
    ws = ledger.workspace(ws_id)
    assert ws.balance_nano == NANO_PER_USD - cost
    assert ws.held_nano == 0
    assert ws.month_spend_nano == cost
    assert ledger.held_total_nano() == 0
    assert sink.of(Charged) == [charge]


def test_settling_beyond_the_hold_is_a_bug_that_moves_no_money(ledger: Ledger) -> None:
    # Metering cuts an engine's counts to the hold (tests/core/test_metering.py); the ledger
    # asserts it was done.
    ws_id, key, _ = _funded(ledger, 100)
    hold = ledger.reserve("r1", key, DEEPSEEK, VERSION, 10, 20)

    with pytest.raises(AssertionError):
        ledger.settle(hold, request_id="r1", prompt_tokens=11, completion_tokens=500)

    assert ledger.workspace(ws_id).balance_nano == NANO_PER_USD


def test_settle_is_exactly_once(ledger: Ledger) -> None:
    ws_id, key, _ = _funded(ledger, 100)
    hold = ledger.reserve("r1", key, DEEPSEEK, VERSION, 10, 20)
    ledger.settle(hold, request_id="r1", prompt_tokens=10, completion_tokens=5)
    balance = ledger.workspace(ws_id).balance_nano

    with pytest.raises(AssertionError):
        ledger.settle(hold, request_id="r1", prompt_tokens=10, completion_tokens=5)
    with pytest.raises(AssertionError):
        ledger.settle(hold, request_id="r1", prompt_tokens=0, completion_tokens=0)

    assert ledger.workspace(ws_id).balance_nano == balance


def test_release_charges_nothing(ledger: Ledger, sink: Recorder) -> None:
    ws_id, key, _ = _funded(ledger, 100)
    hold = ledger.reserve("r1", key, DEEPSEEK, VERSION, 10, 20)

    ledger.settle(hold, request_id="r1", prompt_tokens=0, completion_tokens=0)

    ws = ledger.workspace(ws_id)
    assert (ws.balance_nano, ws.held_nano, ws.month_spend_nano) == (NANO_PER_USD, 0, 0)
    assert sink.of(Charged) == []
    with pytest.raises(AssertionError):
        ledger.settle(hold, request_id="r1", prompt_tokens=10, completion_tokens=5)


def test_settle_with_no_tokens_charges_nothing(ledger: Ledger, sink: Recorder) -> None:
    ws_id, key, _ = _funded(ledger, 100)
    hold = ledger.reserve("r1", key, DEEPSEEK, VERSION, 10, 20)

    assert ledger.settle(hold, request_id="r1", prompt_tokens=0, completion_tokens=0) is None

    assert ledger.workspace(ws_id).balance_nano == NANO_PER_USD
    assert sink.of(Charged) == []


# ---- the monthly spend cap -------------------------------------------------------------------


def test_holds_count_against_the_cap(ledger: Ledger) -> None:
    ws_id, key, _ = _funded(ledger, 100)
    ledger.set_spend_cap(ws_id, NANO_PER_CENT)
    ledger.reserve("r1", key, GLM, VERSION, 0, 3_000)  # $0.006 held

    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r2", key, GLM, VERSION, 0, 3_000)

    assert refused.value.metadata["limit"] == "spend_cap"
    assert refused.value.message == (
        f"Monthly spend cap of $0.01 reached: $0.00 spent in {ledger.workspace(ws_id).month} "
        "and $0.006 held by requests in flight leave $0.004, which covers at most 2000 output "
        "tokens after this prompt's 0 tokens; lower max_tokens, raise the cap or wait for the "
        "next month."
    )
    ledger.reserve("r3", key, GLM, VERSION, 0, 2_000)


def test_reaching_the_cap_refuses_until_it_is_raised(ledger: Ledger) -> None:
    ws_id, key, _ = _funded(ledger, 100)
    ledger.set_spend_cap(ws_id, NANO_PER_CENT)
    hold = ledger.reserve("r1", key, GLM, VERSION, 0, 5_000)
    ledger.settle(hold, request_id="r1", prompt_tokens=0, completion_tokens=5_000)
    ws = ledger.workspace(ws_id)
    assert ws.month_spend_nano == NANO_PER_CENT
    assert ws.balance_nano == 99 * NANO_PER_CENT

    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r2", key, DEEPSEEK, VERSION, 1, 1)
    assert refused.value.metadata["limit"] == "spend_cap"
    assert "$0.01" in refused.value.message

    ledger.set_spend_cap(ws_id, 2 * NANO_PER_CENT)
    ledger.reserve("r3", key, DEEPSEEK, VERSION, 1, 1)


def test_removing_the_cap_lets_the_balance_decide(ledger: Ledger) -> None:
    ws_id, key, _ = _funded(ledger, 100)
    ledger.set_spend_cap(ws_id, 0)
    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r1", key, GLM, VERSION, 1, 0)
    assert refused.value.metadata["limit"] == "spend_cap"

    ledger.set_spend_cap(ws_id, None)

    assert ledger.workspace(ws_id).spend_cap_nano is None
    ledger.reserve("r2", key, GLM, VERSION, 0, 500_000)  # the whole $1.00 balance
    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r3", key, GLM, VERSION, 1, 0)
    assert refused.value.metadata["limit"] == "balance"


@pytest.mark.parametrize(
    ("last_second", "first_second"),
    [
        ((2026, 11, 30, 23, 59, 59), (2026, 12, 1, 0, 0, 0)),
        ((2026, 12, 31, 23, 59, 59), (2027, 1, 1, 0, 0, 0)),
    ],
)
def test_month_rollover_resets_the_month_spend(
    ledger: Ledger,
    clock: Clock,
    last_second: tuple[int, ...],
    first_second: tuple[int, ...],
) -> None:
    clock.now_ms = _utc_ms(*last_second) - 1_000
    ws_id, key, _ = _funded(ledger, 100)
    ledger.set_spend_cap(ws_id, NANO_PER_CENT)
    hold = ledger.reserve("r1", key, GLM, VERSION, 0, 5_000)
    ledger.settle(hold, request_id="r1", prompt_tokens=0, completion_tokens=5_000)

    clock.now_ms = _utc_ms(*last_second) + 999
    with pytest.raises(errors.InsufficientCredits) as refused:
        ledger.reserve("r2", key, GLM, VERSION, 1, 0)
    assert refused.value.metadata["limit"] == "spend_cap"

    clock.now_ms = _utc_ms(*first_second)
    assert ledger.workspace(ws_id).month_spend_nano == 0
    ledger.reserve("r3", key, GLM, VERSION, 0, 5_000)
    with pytest.raises(errors.InsufficientCredits):
        ledger.reserve("r4", key, GLM, VERSION, 1, 0)


def test_a_hold_from_last_month_is_charged_to_the_month_it_settles_in(
    ledger: Ledger, clock: Clock
) -> None:
    clock.now_ms = _utc_ms(2026, 11, 30, 23, 59, 30)
    ws_id, key, _ = _funded(ledger, 100)
    hold = ledger.reserve("r1", key, GLM, VERSION, 0, 1_000)

    clock.now_ms = _utc_ms(2026, 12, 1, 0, 0, 30)
    ledger.settle(hold, request_id="r1", prompt_tokens=0, completion_tokens=1_000)

    ws = ledger.workspace(ws_id)
    assert ws.month == "2026-12"
    assert ws.month_spend_nano == 1_000 * 2_000


# ---- keys ------------------------------------------------------------------------------------


def test_authenticate_finds_the_key_of_a_secret(ledger: Ledger) -> None:
    _, key, secret = _funded(ledger, 0)

    assert ledger.authenticate(secret) is key


@pytest.mark.parametrize("secret", ["", "corvex-", "corvex-" + "a" * 43, "sk-whatever"])
def test_unknown_secrets_are_invalid_api_keys(ledger: Ledger, secret: str) -> None:
    _funded(ledger, 0)

    with pytest.raises(errors.InvalidApiKey):
        ledger.authenticate(secret)


def test_a_revoked_key_stops_working(ledger: Ledger) -> None:
    _, key, secret = _funded(ledger, 0)
    other, other_secret = ledger.create_key(key.workspace_id, "other", KeyLimits())

    ledger.revoke_key(key.id)

    with pytest.raises(errors.InvalidApiKey) as refused:
        ledger.authenticate(secret)
    assert refused.value.reason is errors.Reason.INVALID_API_KEY
    assert ledger.authenticate(other_secret) is other
    assert ledger.key(key.id).revoked


def test_secrets_have_the_documented_shape_and_only_their_hash_is_stored(
    ledger: Ledger, sink: Recorder
) -> None:
    ws_id, _, _ = _funded(ledger, 0)
    created = [ledger.create_key(ws_id, f"k{i}", KeyLimits()) for i in range(20)]

    secrets_ = [secret for _, secret in created]
    assert all(re.fullmatch(r"corvex-[A-Za-z0-9]{43}", s) for s in secrets_)
    assert len(set(secrets_)) == len(secrets_)
    encodings = [
        msgspec.json.encode(ledger.state),
        msgspec.msgpack.encode(ledger.state),
        msgspec.json.encode(sink.records),
    ]
    for key, secret in created:
        assert key.secret_sha256 == hashlib.sha256(secret.encode()).digest()
        assert key.prefix == secret[:11]
        for encoded in encodings:
            assert secret.encode() not in encoded
            # Not even the part of the secret after its displayed prefix.
            assert secret[11:].encode() not in encoded


def test_key_created_record_carries_the_hash_not_the_secret(ledger: Ledger, sink: Recorder) -> None:
    ws_id, _, _ = _funded(ledger, 0)
    key, secret = ledger.create_key(ws_id, "ci", KeyLimits(requests_per_minute=60))

    record = sink.of(KeyCreated)[-1]
    assert isinstance(record, KeyCreated)
    assert record.secret_sha256 == hashlib.sha256(secret.encode()).digest()
    assert record.limits == KeyLimits(requests_per_minute=60)
    assert record.key_id == key.id


# ---- usage -----------------------------------------------------------------------------------


def test_usage_rows_are_per_key_model_and_utc_day(ledger: Ledger, clock: Clock) -> None:
    clock.now_ms = _utc_ms(2026, 11, 1, 23, 59, 59)
    ws_id, first, _ = _funded(ledger, 10_000)
    second, _ = ledger.create_key(ws_id, "second", KeyLimits())

    def charge(key: ApiKey, rate: ModelRate, prompt: int, completion: int) -> None:
        hold = ledger.reserve(f"r{clock.now_ms}-{key.id}-{rate.id}", key, rate, VERSION, 100, 100)
        ledger.settle(hold, request_id="r", prompt_tokens=prompt, completion_tokens=completion)

    charge(first, DEEPSEEK, 10, 20)
    charge(first, DEEPSEEK, 1, 2)
    charge(first, GLM, 3, 4)
    charge(second, DEEPSEEK, 5, 6)
    clock.advance_ms(1_000)  # 2026-11-02 00:00:00 UTC
    charge(first, DEEPSEEK, 7, 8)
    clock.now_ms = _utc_ms(2026, 11, 3, 12)
    charge(second, GLM, 9, 10)

    rows = ledger.usage(ws_id)
    summary = [
        (r.day, r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows
    ]
    expected = [
        ("2026-11-01", first.id, DEEPSEEK.id, 2, 11, 22),
        ("2026-11-01", first.id, GLM.id, 1, 3, 4),
        ("2026-11-01", second.id, DEEPSEEK.id, 1, 5, 6),
        ("2026-11-02", first.id, DEEPSEEK.id, 1, 7, 8),
        ("2026-11-03", second.id, GLM.id, 1, 9, 10),
    ]
    # Rows sort by day, then key id, then model.
    assert summary == sorted(expected, key=lambda row: (row[0], row[1], row[2]))
    for row in rows:
        rate = DEEPSEEK if row.model == DEEPSEEK.id else GLM
        assert row.cost_nano == rate.cost_nano(row.prompt_tokens, row.completion_tokens)
    spent = sum(r.cost_nano for r in rows)
    assert ledger.workspace(ws_id).balance_nano == 100 * NANO_PER_USD - spent

    def days(rows: list[UsageRow]) -> list[str]:
        return sorted({r.day for r in rows})

    assert days(ledger.usage(ws_id, since="2026-11-02")) == ["2026-11-02", "2026-11-03"]
    assert days(ledger.usage(ws_id, until="2026-11-01")) == ["2026-11-01"]
    assert days(ledger.usage(ws_id, since="2026-11-02", until="2026-11-02")) == ["2026-11-02"]
    assert ledger.usage(ws_id, since="2026-11-04") == []
    by_second = ledger.usage(ws_id, key_id=second.id)
    assert {r.key_id for r in by_second} == {second.id}
    assert [r.day for r in by_second] == ["2026-11-01", "2026-11-03"]


def test_usage_of_an_unknown_workspace_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(errors.NotFound):
        ledger.usage("ws_nope")


# ---- replay ----------------------------------------------------------------------------------


def _durable(ledger: Ledger) -> object:
    """The state as builtins, as a reader sees it now (months rolled), without the holds."""
    for ws in ledger.workspaces():
        ledger.keys(ws.id)
    state = msgspec.to_builtins(ledger.state)
    for ws in state["workspaces"].values():
        del ws["held_nano"]
    return state


def test_records_replay_into_the_same_state(ledger: Ledger, clock: Clock, sink: Recorder) -> None:
    clock.now_ms = _utc_ms(2026, 11, 30, 23, 0)
    a, key_a, _ = _funded(ledger, 500, "a")
    b, key_b, _ = _funded(ledger, 0, "b")
    ledger.add_credits(b, 3 * NANO_PER_USD, "manual", "topup-1")
    ledger.add_credits(b, 3 * NANO_PER_USD, "manual", "topup-1")  # replayed, no record
    ledger.set_spend_cap(a, 2 * NANO_PER_USD)
    ledger.set_auto_reload(a, enabled=True, threshold_nano=NANO_PER_USD, amount_nano=10**10)
    ledger.record_auto_reload_failure(a, "card declined")
    limited, _ = ledger.create_key(a, "limited", KeyLimits(tokens_per_minute=5_000))
    ledger.set_key_limits(limited.id, KeyLimits(requests_per_minute=3))
    for i, (key, rate) in enumerate([(key_a, DEEPSEEK), (key_b, GLM), (limited, DEEPSEEK)]):
        hold = ledger.reserve(f"h{i}", key, rate, VERSION, 1_000, 2_000)
        ledger.settle(hold, request_id=f"h{i}", prompt_tokens=900, completion_tokens=1_500 + i)
    open_hold = ledger.reserve("open", key_b, GLM, VERSION, 10, 10)
    clock.now_ms = _utc_ms(2026, 12, 1, 1, 0)  # a new month
    hold = ledger.reserve("dec", key_a, GLM, VERSION, 100, 100)
    ledger.settle(hold, request_id="dec", prompt_tokens=50, completion_tokens=60)
    ledger.revoke_key(key_b.id)
    assert ledger.workspace(b).held_nano == open_hold.amount_nano

    replica = Ledger(clock=clock, state=LedgerState())
    for record in sink.records:
        replica.apply(record)

    assert _durable(replica) == _durable(ledger)
    assert replica.workspace(b).held_nano == 0  # holds are not records
    assert replica.workspace(a).month_spend_nano == ledger.workspace(a).month_spend_nano
    with pytest.raises(errors.InvalidApiKey):
        replica.authenticate("corvex-" + "x" * 43)


def test_replay_keeps_keys_usable(ledger: Ledger, clock: Clock, sink: Recorder) -> None:
    _, key, secret = _funded(ledger, 100)

    replica = Ledger(clock=clock)
    for record in sink.records:
        replica.apply(record)

    assert replica.authenticate(secret).id == key.id
