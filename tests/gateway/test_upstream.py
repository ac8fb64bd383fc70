"""The edge's link to the core: keepalive pings both ends agree on, and only metadata that gRPC
can carry (the caller's key is never forwarded, or quoted, when it cannot be a key)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import msgspec
import pytest

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core.server import Core
from gateway import upstream
from gateway.config import EdgeConfig
from gateway.errors import ApiError
from tests.conftest import core_config, started_core

PING_INTERVAL_S = 1.0


@pytest.fixture
async def pinged_core(tmp_path: Path) -> AsyncIterator[Core]:
    """A core that accepts pings every half interval, like the production pair (10 s vs 30 s)."""
    config = msgspec.structs.replace(
        core_config(tmp_path / "data"), keepalive_min_ping_interval_s=PING_INTERVAL_S / 2
    )
    async with started_core(config) as instance:
        yield instance


async def test_an_idle_channel_keeps_its_connection_and_serves_the_next_request(
    pinged_core: Core,
) -> None:
    config = EdgeConfig(
        core=f"127.0.0.1:{pinged_core.port}",
        core_keepalive_s=PING_INTERVAL_S,
        core_keepalive_timeout_s=PING_INTERVAL_S,
    )
    async with upstream.open_channel(config) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
        # Idle for five ping intervals: a core without a ping policy answers the third ping
        # without data with GOAWAY too_many_pings, and the channel drops to IDLE.
        await asyncio.sleep(5 * PING_INTERVAL_S)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        reply = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    assert reply.models


def test_channel_options_ping_while_idle_at_the_configured_interval() -> None:
    options = dict(upstream.channel_options(EdgeConfig(core_keepalive_s=30)))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0


def test_metadata_carries_the_key_and_the_request_id() -> None:
    assert upstream.metadata("Bearer corvex-abc", "rid-1") == (
        ("x-request-id", "rid-1"),
        ("authorization", "Bearer corvex-abc"),
    )
    assert upstream.metadata(None, "rid-1") == (("x-request-id", "rid-1"),)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer é",
        "Bearer corvex-abc\udce9",  # a trailing \xe9 byte, as aiohttp decodes it
        "Bearer\tcorvex-abc",
        "Bearer corvex-abc\x7f",
        "Bearer " + "a" * 2000,
    ],
)
def test_a_header_grpc_cannot_carry_is_an_invalid_key(authorization: str) -> None:
    with pytest.raises(ApiError) as refused:
        upstream.metadata(authorization, "rid-1")
    assert refused.value.status == 401
    assert refused.value.body.code == "invalid_api_key"
    assert "corvex-abc" not in refused.value.body.message
