"""In-process microbenchmarks of the accounting path (authenticate, admit + settle, the
ledger's reserve + settle, the limiter's check) and of telemetry (a call's metrics, its JSON log
line, a charge's money counters) in ns/op, and of calling the simulated engine directly, which
the added-latency figure subtracts from a full-stack request. They build the core's own objects
exactly as the core does and never touch a socket."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import msgspec
import uvloop

from benchmarks.stats import Distribution, Spread, distribution, spread
from benchmarks.workload import DEFAULT_MODEL, prompt_text
from corvex.logs import JsonFormatter, trim_records
from corvex.ratecard import ModelRate, load_rate_card
from corvex_core.config import SimulatedEngineConfig
from corvex_core.engines.base import ChatMessage, SamplingOptions
from corvex_core.engines.simulated import SimulatedEngine
from corvex_core.ledger import Ledger
from corvex_core.limits import RateLimiter
from corvex_core.metering import Meter
from corvex_core.records import KeyLimits
from corvex_core.servicers.credentials import bearer_secret
from corvex_core.servicers.metadata import response_metadata
from corvex_core.state import ApiKey
from corvex_core.telemetry import Telemetry

RATE_CARD = "infrastructure/metronome/config.yaml"
PROMPT_TOKENS = 70  # what the benchmarks' 64-word prompt becomes after the chat template
MAX_TOKENS = 16
_FUNDS_NANO = 10**15  # $1M: never runs out


class MicroResult(msgspec.Struct):
    """ns/op of each accounting operation (median, min–max over repeats), and the in-process
    engine call's latency."""

    ns_per_op: dict[str, Spread]
    engine_call: Distribution
    iterations: int
    repeats: int


def _timed_ns(op: Callable[[int], object], iterations: int) -> float:
    start = time.perf_counter_ns()
    for i in range(iterations):
        op(i)
    return (time.perf_counter_ns() - start) / iterations


def _operations(iterations: int, repeat: int) -> dict[str, Callable[[int], object]]:
    """Fresh core objects for one repeat, and the operations to time on them."""
    card = load_rate_card(RATE_CARD)
    rate = card.by_id[DEFAULT_MODEL]
    ledger = Ledger()
    limiter = RateLimiter()
    meter = Meter(ledger, limiter)
    ws, _ = ledger.create_workspace("bench", _FUNDS_NANO)
    limits = KeyLimits(requests_per_minute=10**9, tokens_per_minute=10**12)
    key, secret = ledger.create_key(ws.id, "bench", limits)
    header = "Bearer " + secret  # as the metadata carries it
    ids = [f"req_{repeat}_{i:08x}" for i in range(iterations)]
    ledger_ids = [f"hold_{repeat}_{i:08x}" for i in range(iterations)]

    def admit_settle(i: int) -> object:
        ticket = meter.admit(
            key, rate, card.version, ids[i], prompt_tokens=PROMPT_TOKENS, max_tokens=MAX_TOKENS
        )
        return meter.settle(
            ticket, request_id=ids[i], prompt_tokens=PROMPT_TOKENS, completion_tokens=MAX_TOKENS
        )

    def reserve_settle(i: int) -> object:
        hold = ledger.reserve(ledger_ids[i], key, rate, card.version, PROMPT_TOKENS, MAX_TOKENS)
        return ledger.settle(
            hold,
            request_id=ledger_ids[i],
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=MAX_TOKENS,
        )

    def limiter_admit_settle(i: int) -> None:
        limiter.settle(limiter.admit(key, PROMPT_TOKENS + MAX_TOKENS), PROMPT_TOKENS + MAX_TOKENS)

    return {
        "loop (subtracted from the rest)": lambda i: None,
        "authenticate (Bearer → key)": lambda i: meter.authenticate(bearer_secret(header)),
        "Meter.admit + settle": admit_settle,
        "Ledger.reserve + settle": reserve_settle,
        "limiter check (completion_bound)": lambda i: limiter.completion_bound(
            key, PROMPT_TOKENS, MAX_TOKENS, explicit=True
        ),
        "limiter admit + settle": limiter_admit_settle,
        "x-ratelimit headers": lambda i: response_metadata("r", limiter.state(key)),
        **_telemetry_operations(meter, key, rate, card.version, ids),
    }


def _telemetry_operations(
    meter: Meter, key: ApiKey, rate: ModelRate, version: str, ids: list[str]
) -> dict[str, Callable[[int], object]]:
    telemetry = Telemetry()
    charge = meter.settle(
        meter.admit(key, rate, version, "t", prompt_tokens=PROMPT_TOKENS, max_tokens=4),
        request_id="t",
        prompt_tokens=PROMPT_TOKENS,
        completion_tokens=4,
    )
    assert charge is not None

    def call_metrics(i: int) -> None:
        record = telemetry.begin("Chat", ids[i])
        record.model, record.key_id, record.workspace_id = rate.id, key.id, key.workspace_id
        record.first_token_at = record.started
        record.completion_tokens = MAX_TOKENS
        telemetry.end(record, "OK")

    return {
        "telemetry: a call's metrics (begin + end)": call_metrics,
        "telemetry: a call's metrics and JSON log line": _logged(call_metrics),
        "telemetry: a charge's money counters": lambda i: telemetry.on_record(charge),
    }


def _restore(logger: logging.Logger, saved: tuple[list[logging.Handler], int, bool]) -> None:
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])  # setLevel, not .level: it also clears isEnabledFor's cache
    logger.propagate = saved[2]


def _logged(op: Callable[[int], None]) -> Callable[[int], None]:
    """`op` with the core's request log on at info, formatted as JSON (to /dev/null), its
    records trimmed as the core's are (`logs.setup`)."""
    logger = logging.getLogger("corvex.requests")
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115  (lives with the run)
    handler.setFormatter(JsonFormatter("core"))

    def logged(i: int) -> None:
        if i == 0:
            trim_records()
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        op(i)

    return logged


def accounting(iterations: int, repeats: int) -> dict[str, Spread]:
    """ns/op of each accounting operation, loop overhead subtracted."""
    runs: dict[str, list[float]] = {}
    logger = logging.getLogger("corvex.requests")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        for repeat in range(repeats):
            ops = _operations(iterations, repeat)
            loop_ns = _timed_ns(ops.pop("loop (subtracted from the rest)"), iterations)
            for name, op in ops.items():
                runs.setdefault(name, []).append(_timed_ns(op, iterations) - loop_ns)
            for handler in logger.handlers[len(saved[0]) :]:
                handler.close()
            _restore(logger, saved)
    finally:
        _restore(logger, saved)
    return {name: spread(values) for name, values in runs.items()}


async def _engine_calls(count: int) -> list[float]:
    config = SimulatedEngineConfig(ttft_ms=0, tpot_ms=0, prefill_ms_per_1k_tokens=0)
    engine = SimulatedEngine(DEFAULT_MODEL, config)
    await engine.start()
    options = SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True)
    messages = [ChatMessage(role="user", content=prompt_text(64))]
    latencies = []
    try:
        for i in range(count):
            start = time.perf_counter()
            prompt = await engine.render_chat(messages)
            async for _ in engine.generate(f"req_{i}", prompt, options):
                pass
            latencies.append(time.perf_counter() - start)
    finally:
        await engine.shutdown()
    return latencies


def engine_call(count: int) -> Distribution:
    """Latency of rendering a prompt and generating MAX_TOKENS tokens on the simulated engine
    with zero timings, in this process, on uvloop (as the core runs it)."""
    latencies: list[float] = uvloop.run(_engine_calls(count))
    return distribution(latencies[count // 10 :])  # the first tenth warms up


def run(*, iterations: int = 20_000, repeats: int = 5, engine_calls: int = 2000) -> MicroResult:
    return MicroResult(
        ns_per_op=accounting(iterations, repeats),
        engine_call=engine_call(engine_calls),
        iterations=iterations,
        repeats=repeats,
    )
