"""The edge's choice of core for a model a core said runs elsewhere (a reserved endpoint in a
cluster): it follows the core named in the refusal, remembers it, and forgets it when the
named core is not one it knows. (Routing by health and load: tests/e2e/test_cluster_edge.py.)"""

from __future__ import annotations

import grpc

from gateway.routing import Router, retryable
from tests.gateway.test_errors import failed_call

ADDRESSES = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
MODEL = "acme-0123abcd/prod"


def refusal(core: str) -> grpc.aio.AioRpcError:
    return failed_call(
        grpc.StatusCode.UNAVAILABLE,
        f"The reserved endpoint runs on the core at {core}",
        reason="ENGINE_UNAVAILABLE",
        metadata={"core": core, "admitted": "false"},
    )


async def test_a_refusal_naming_a_core_sends_the_model_there_from_then_on() -> None:
    router = Router(ADDRESSES, grpc.aio.insecure_channel, models_refresh_s=60)
    third = router.links[2]
    for link in router.links:
        link.serving = True
    error = refusal(ADDRESSES[2])
    assert retryable(error)
    assert router.redirected(MODEL, error) is third
    assert all(router.pick(MODEL) is third for _ in range(5))
    assert router.pick(MODEL, exclude=third) is not third
    assert router.pick("another/model") in router.links
    third.serving = False
    assert router.pick(MODEL) is not third  # a home that stopped serving is not insisted on
    # A refusal naming no core this edge knows: forgotten, and the one retry goes elsewhere.
    third.serving = True
    assert router.redirected(MODEL, refusal("10.0.0.9:50051")) is None
    picks = {router.pick(MODEL).address for _ in range(6)}
    assert picks == set(ADDRESSES)
    await router.close()
