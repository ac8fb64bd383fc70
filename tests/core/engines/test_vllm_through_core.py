"""The vLLM adapter inside the real core: gRPC in, metering, the fake AsyncLLM underneath.

The same requests a simulated model serves, served by `backend: vllm`, metered with the
engine's own token counts; a cancelled call aborts in vLLM; a dead engine answers 503-style
ENGINE_UNAVAILABLE; a chat model refuses embeddings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import msgspec
import pytest

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core.config import VllmEngineConfig
from corvex_core.server import Core
from tests.conftest import MODEL, core_config, started_core
from tests.core.servicers.test_inference_grpc import auth, chat, error_info, make_key


@pytest.fixture
async def vllm_core(fake_vllm: ModuleType, tmp_path: Path) -> AsyncIterator[Core]:
    config = core_config(tmp_path / "data")
    engines = msgspec.structs.replace(
        config.engines, default=None, models={MODEL: VllmEngineConfig(model="/weights/flash")}
    )
    async with started_core(msgspec.structs.replace(config, engines=engines)) as core:
        yield core


def fake_llm(fake_vllm: ModuleType) -> Any:
    return fake_vllm.ENGINES[-1]


async def test_chat_through_the_core_is_metered_with_vllms_counts(
    vllm_core: Core, fake_vllm: ModuleType
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{vllm_core.port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        models = await stub.ListModels(inference_pb2.ListModelsRequest())
        assert [(m.id, m.engine) for m in models.models] == [(MODEL, "vllm")]
        secret = await make_key(channel)
        chunks = [
            c async for c in stub.Chat(chat(max_tokens=20, ignore_eos=True), metadata=auth(secret))
        ]
    final = chunks[-1]
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert sum(c.completion_tokens for c in chunks) == final.usage.completion_tokens == 20
    text = "".join(c.text for c in chunks)
    assert len(text.split()) == 20  # the toy model emits one word per token
    prompt = final.usage.prompt_tokens
    assert prompt > 0 and final.usage.cost_nano_usd == prompt * 350 + 20 * 1400
    [row] = vllm_core.ledger.usage(vllm_core.ledger.workspaces()[0].id)
    assert (row.prompt_tokens, row.completion_tokens) == (prompt, 20)


async def test_cancelled_call_aborts_in_vllm(vllm_core: Core, fake_vllm: ModuleType) -> None:
    llm = fake_llm(fake_vllm)
    llm.hold()  # the fake steps only when told, so the request stays in flight
    async with grpc.aio.insecure_channel(f"127.0.0.1:{vllm_core.port}") as channel:
        secret = await make_key(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Chat(chat(max_tokens=500, ignore_eos=True), metadata=auth(secret))
        for _ in range(100):
            if vllm_core.ledger.held_total_nano():
                break
            await asyncio.sleep(0.01)
        llm.step()
        await call.read()
        call.cancel()
        for _ in range(200):
            if llm.aborted and vllm_core.ledger.held_total_nano() == 0:
                break
            await asyncio.sleep(0.01)
    assert len(llm.aborted) == 1
    assert vllm_core.ledger.held_total_nano() == 0


async def test_a_dead_engine_is_unavailable_and_chat_models_do_not_embed(
    vllm_core: Core, fake_vllm: ModuleType
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{vllm_core.port}") as channel:
        secret = await make_key(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as no_embed:
            await stub.Embed(
                inference_pb2.EmbedRequest(
                    model=MODEL, inputs=[inference_pb2.EmbedInput(text="x")]
                ),
                metadata=auth(secret),
            )
        assert no_embed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fake_llm(fake_vllm).kill()
        with pytest.raises(grpc.aio.AioRpcError) as dead:
            async for _ in stub.Chat(chat(max_tokens=5), metadata=auth(secret)):
                pass
        assert dead.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(dead.value).reason == "ENGINE_UNAVAILABLE"
        assert vllm_core.ledger.held_total_nano() == 0
