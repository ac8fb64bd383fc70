"""The ledger's customers (issue 16): users, sessions and the starter claim, with a fake clock,
through the journal's snapshot and replay."""

from __future__ import annotations

from pathlib import Path

import pytest

from corvex_core import errors
from corvex_core.journal import Journal
from corvex_core.ledger import MAX_SESSIONS_PER_USER, Ledger
from corvex_core.records import TopUpMethod

HOUR_MS = 3_600_000


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_are_bounded_and_expire() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    user = ledger.sign_up("Ada@Example.com ", "scrypt$hash", "Engines")
    assert user.email == "ada@example.com"
    assert ledger.workspace(user.workspace_ids[0]).owner_user_id == user.id
    tokens = [ledger.start_session(user.id, HOUR_MS)[1] for _ in range(MAX_SESSIONS_PER_USER + 5)]
    # The oldest ones were ended to make room; the newest work.
    for token in tokens[:5]:
        with pytest.raises(errors.InvalidSession):
            ledger.session(token)
    for token in tokens[5:]:
        assert ledger.session(token).user_id == user.id
    assert len(ledger.user(user.id).session_ids) == MAX_SESSIONS_PER_USER
    clock.now += 2 * 3600
    with pytest.raises(errors.InvalidSession):
        ledger.session(tokens[-1])
    # The next sign-in removes the expired ones, and their hashes with them.
    session, token = ledger.start_session(user.id, HOUR_MS)
    assert ledger.user(user.id).session_ids == [session.id]
    assert ledger.session(token) == session
    assert len(ledger.state.sessions) == 1


def test_one_email_one_user() -> None:
    ledger = Ledger()
    ledger.sign_up("ada@example.com", "h", "w")
    with pytest.raises(errors.EmailTaken):
        ledger.sign_up("ADA@example.com", "h", "w")
    with pytest.raises(errors.InvalidRequest):
        ledger.sign_up("not an email", "h", "w")


def test_starter_claim_once_with_its_invoice() -> None:
    ledger = Ledger()
    user = ledger.sign_up("ada@example.com", "h", "w")
    ws_id = user.workspace_ids[0]
    assert ledger.workspace(ws_id).balance_nano == 0
    invoice = ledger.claim_starter(user.id, ws_id, 500_000_000)
    assert invoice.method is TopUpMethod.STARTER and invoice.balance_after_nano == 500_000_000
    with pytest.raises(errors.StarterCreditsUnavailable):
        ledger.claim_starter(user.id, ws_id, 500_000_000)
    assert ledger.workspace(ws_id).balance_nano == 500_000_000


async def test_customers_survive_snapshot_and_replay(tmp_path: Path) -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    journal = Journal(tmp_path)
    journal.recover()
    journal.start()
    ledger.set_sink(journal.append)
    user = ledger.sign_up("ada@example.com", "scrypt$hash", "w")
    _, before = ledger.start_session(user.id, HOUR_MS)
    journal.snapshot(ledger.state)
    ledger.claim_starter(user.id, user.workspace_ids[0], 500_000_000)
    ended, after = ledger.start_session(user.id, HOUR_MS)
    ledger.end_session(ended.id)
    await journal.sync_point()
    await journal.close()

    recovery = Journal(tmp_path).recover()
    assert recovery.state is not None
    rebuilt = Ledger(clock=clock, state=recovery.state)
    for record in recovery.records:
        rebuilt.apply(record)
    assert rebuilt.session(before).user_id == user.id
    with pytest.raises(errors.InvalidSession):
        rebuilt.session(after)
    assert rebuilt.user(user.id).starter_invoice == 1
    assert rebuilt.user_by_email("ADA@example.com") == rebuilt.user(user.id)
