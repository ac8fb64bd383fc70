"""The edge in front of several cores: each request goes to a core that serves its model, the
load is spread, a draining core is taken out (what it refuses before admitting is sent to the
other core once, so no client sees it). `--workers` is tested with the races
(test_cluster_races.py), whose edge runs two processes on one port."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from corvex_core.pg.server import PgServer
from corvex_ops.admin import Client
from corvex_ops.stack import Cluster, running_cluster
from tests.conftest import FAST_ENGINE, MODEL
from tests.e2e.cluster import cluster_config, cluster_database, fetch, new_workspace, via_edge

pytestmark = pytest.mark.e2e

OTHER_MODEL = "moonshotai/Kimi-K2.6"


def only_deepseek() -> dict[str, Any]:
    """A core whose engines serve one model of the rate card (a GPU node hosting some of it)."""
    config = cluster_config()
    config["core"]["engines"] = {
        "default": None,
        "models": {MODEL: {**FAST_ENGINE, "tpot_ms": 5}},
    }
    return config


def everything_slowly() -> dict[str, Any]:
    config = cluster_config()
    config["core"]["engines"] = {"default": {**FAST_ENGINE, "tpot_ms": 5}}
    return config


@pytest.fixture(scope="module")
def cluster(pg_server: PgServer) -> Iterator[Cluster]:
    configs = [only_deepseek(), everything_slowly()]
    with (
        cluster_database(pg_server) as dsn,
        running_cluster(dsn=dsn, config=cluster_config(), core_configs=configs) as running,
    ):
        yield running


def charged_by_core(cluster: Cluster, workspace_id: str) -> dict[str, int]:
    rows = asyncio.run(
        fetch(
            cluster.dsn,
            "SELECT core_id, count(*) AS n FROM charges WHERE workspace_id = $1 GROUP BY core_id",
            workspace_id,
        )
    )
    ids = {(cluster.core_data_dir(i) / "core_id").read_text().strip(): i for i in range(2)}
    return {f"core-{ids[r['core_id']] + 1}": r["n"] for r in rows}


def test_requests_go_to_cores_that_serve_their_model_and_are_spread(cluster: Cluster) -> None:
    admin = Client(cluster.grpc_address, cluster.admin_token or "")
    workspace_id, _, secret = new_workspace(admin, credits_cents=10_000)
    admin.close()

    async def requests(model: str, count: int) -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=cluster.http_url + "/v1", api_key=secret, max_retries=0
        ) as client:

            async def one() -> str:
                reply = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "x"}], max_tokens=20,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                return reply.choices[0].finish_reason or ""

            return await asyncio.gather(*(one() for _ in range(count)))

    assert asyncio.run(requests(OTHER_MODEL, 12)) == ["length"] * 12
    assert charged_by_core(cluster, workspace_id) == {"core-2": 12}
    assert asyncio.run(requests(MODEL, 40)) == ["length"] * 40
    spread = charged_by_core(cluster, workspace_id)
    assert spread.get("core-1", 0) >= 5 and spread["core-2"] - 12 >= 5, spread
    # /v1/models lists what some core serves: the whole card here.
    with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=secret) as client:
        assert {MODEL, OTHER_MODEL} <= {m.id for m in client.models.list().data}


def test_a_draining_core_is_taken_out_and_nothing_it_refuses_reaches_a_client(
    pg_server: PgServer,
) -> None:
    config = everything_slowly()
    config["core"]["drain_grace_s"] = 30
    with (
        cluster_database(pg_server) as dsn,
        running_cluster(dsn=dsn, config=config) as cluster,
    ):
        admin = Client(cluster.grpc_addresses[1], cluster.admin_token or "")
        _, _, secret = new_workspace(admin, credits_cents=10_000)
        admin.close()

        async def scenario() -> tuple[list[str], str]:
            async with openai.AsyncOpenAI(
                base_url=cluster.http_url + "/v1", api_key=secret, max_retries=0, timeout=60
            ) as client:
                # Long streams keep core 1 draining (not stopped) for a while.
                long = [asyncio.create_task(via_edge(client, 400)) for _ in range(4)]
                await asyncio.sleep(0.3)
                cluster.cores[0].signal(signal.SIGTERM)
                # Sent at once, before and after the edge heard of it: none may fail.
                answers = await asyncio.gather(*(via_edge(client, 5) for _ in range(30)))
                finished = await asyncio.gather(*long)
                return [a[0] for a in answers], ",".join(sorted({f[0] for f in finished}))

        answers, long_outcomes = asyncio.run(scenario())
        assert answers == ["ok"] * 30
        assert long_outcomes == "ok"  # the draining core let its streams finish
        assert cluster.cores[0].popen.wait(30) == 0
