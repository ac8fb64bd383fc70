"""The Accounts wire and the domain name the same things: top-up methods and key limits."""

from __future__ import annotations

from corvex.v1 import accounts_pb2
from corvex_core.records import KEY_LIMIT_FIELDS, TopUpMethod


def test_every_top_up_method_has_its_wire_value_and_no_more() -> None:
    wire = {name for name, number in accounts_pb2.TopUpMethod.items() if number}
    assert wire == {f"TOP_UP_METHOD_{m.name}" for m in TopUpMethod}


def test_key_limits_have_the_same_fields_on_the_wire() -> None:
    assert tuple(f.name for f in accounts_pb2.KeyLimits.DESCRIPTOR.fields) == KEY_LIMIT_FIELDS
