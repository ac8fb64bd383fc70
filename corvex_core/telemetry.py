"""Telemetry of the core: Prometheus metrics and one structured log line per call.

The error interceptor opens a `CallRecord` for every Corvex RPC and closes it with the call's
status; the servicers fill in what only they know (model, key, tokens, cost, first token) on
the record of the call they serve, found through a context variable. Money counters are fed
from the ledger's records, so starter credits, top-ups, auto-reloads and charges are all
counted exactly once. Label sets are bounded: models come from the catalogue (never from
user input), and no label holds a key, workspace or request id.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from typing import Final, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from corvex.money import NANO_PER_USD
from corvex_core import records
from corvex_core.errors import CorvexError, Reason

log = logging.getLogger("corvex.requests")
# The *_created series double every counter's lines and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
_TOKEN_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1,
)  # fmt: skip
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Quiet RPCs are logged at debug: clients poll them.
_QUIET: Final = frozenset({"ListModels"})


class CallRecord:
    """What is known about one call, filled in as it runs."""

    __slots__ = (
        "completion_tokens",
        "cost_nano",
        "first_token_at",
        "key_id",
        "model",
        "prompt_tokens",
        "request_id",
        "rpc",
        "started",
        "workspace_id",
    )

    def __init__(self, rpc: str, request_id: str) -> None:
        self.rpc = rpc
        self.request_id = request_id
        self.started = time.perf_counter()
        self.model = ""
        self.key_id = ""
        self.workspace_id = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_nano = 0
        self.first_token_at: float | None = None


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "corvex_call", default=None
)


def current() -> CallRecord | None:
    """The record of the call this task serves (None outside a Corvex RPC)."""
    return _current.get()


class _CallMetrics(NamedTuple):
    requests: Counter
    duration: Histogram
    ttft: Histogram
    tpot: Histogram


class Telemetry:
    """The core's metrics, in a registry of its own (several cores can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "corvex_requests", "RPCs by method, model and status.", ["rpc", "model", "status"],
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "corvex_request_duration_seconds", "End-to-end RPC latency.", ["rpc", "model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "corvex_time_to_first_token_seconds", "Time to the first token of a chat.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "corvex_time_per_output_token_seconds",
            "Mean time between output tokens of a chat (one observation per request).",
            ["model"], buckets=_TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "corvex_tokens", "Tokens charged, by model and kind (prompt, completion).",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "corvex_rejections",
            "Requests refused: insufficient_credits, spend_cap, rate_limit, token_limit, "
            "overload, unavailable.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.credits_added = Counter(
            "corvex_credits_added_usd", "Prepaid credits added, USD.", ["method"], registry=r
        )
        self.charged = Counter(
            "corvex_charged_usd", "Charged to balances, USD.", ["model"], registry=r
        )
        self.journal_sync = Histogram(
            "corvex_journal_sync_seconds", "Time to commit one journal batch (with fsync).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.journal_batch = Histogram(
            "corvex_journal_batch_records", "Records per journal commit.",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.reload_failures = Counter(
            "corvex_rate_card_reload_failures", "Rate-card reloads refused.", registry=r
        )
        self._refreshers: list[Callable[[], None]] = []
        # Labelled children, looked up once: prometheus_client's labels() takes a lock and
        # builds a key on every call, which the hot path should not pay per request.
        self._children: dict[tuple[str, ...], _CallMetrics] = {}
        self._per_model: dict[str, tuple[Counter, Counter, Counter]] = {}

    def gauge(self, name: str, documentation: str, function: Callable[[], float]) -> None:
        """A gauge read at scrape time."""
        Gauge(name, documentation, registry=self.registry).set_function(function)

    def labelled_gauge(
        self, name: str, documentation: str, label: str, values: Callable[[], dict[str, float]]
    ) -> None:
        """A gauge per label value, read at scrape time."""
        gauge = Gauge(name, documentation, [label], registry=self.registry)

        def refresh() -> None:
            for value, number in values().items():
                gauge.labels(value).set(number)

        self._refreshers.append(refresh)

    def refresh(self) -> None:
        """Updates the labelled gauges; called right before each scrape."""
        for refresh in self._refreshers:
            refresh()

    # ---- calls -------------------------------------------------------------------------------

    def begin(self, rpc: str, request_id: str) -> CallRecord:
        record = CallRecord(rpc, request_id)
        _current.set(record)
        return record

    def _call_metrics(self, rpc: str, model: str, status: str) -> _CallMetrics:
        key = (rpc, model, status)
        metrics = self._children.get(key)
        if metrics is None:
            metrics = self._children[key] = _CallMetrics(
                self.requests.labels(rpc, model, status),
                self.duration.labels(rpc, model),
                self.ttft.labels(model),
                self.tpot.labels(model),
            )
        return metrics

    def end(self, record: CallRecord, status: str, error: CorvexError | None = None) -> None:
        elapsed = time.perf_counter() - record.started
        model = record.model
        metrics = self._call_metrics(record.rpc, model, status)
        metrics.requests.inc()
        metrics.duration.observe(elapsed)
        if record.first_token_at is not None:
            metrics.ttft.observe(record.first_token_at - record.started)
            if record.completion_tokens > 1:
                decode = time.perf_counter() - record.first_token_at
                metrics.tpot.observe(decode / (record.completion_tokens - 1))
        if error is not None:
            rejection = _rejection(error)
            if rejection:
                self.rejections.labels(rejection).inc()
        level = logging.DEBUG if record.rpc in _QUIET else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s %s",
                record.rpc,
                status,
                extra={
                    "request_id": record.request_id,
                    "rpc": record.rpc,
                    "status": status,
                    "model": model,
                    "key_id": record.key_id,
                    "workspace_id": record.workspace_id,
                    "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "cost_nano_usd": record.cost_nano,
                    "duration_ms": round(elapsed * 1000, 3),
                    "ttft_ms": (
                        round((record.first_token_at - record.started) * 1000, 3)
                        if record.first_token_at is not None
                        else None
                    ),
                },
            )

    # ---- money and journal ---------------------------------------------------------------------

    def on_record(self, record: records.Record) -> None:
        """Counts the money of every ledger record as it is committed."""
        if isinstance(record, records.Charged):
            charged, prompt, completion = self._model_counters(record.model)
            charged.inc(record.cost_nano / NANO_PER_USD)
            prompt.inc(record.prompt_tokens)
            completion.inc(record.completion_tokens)
        elif isinstance(record, records.CreditsAdded):
            self.credits_added.labels(record.method).inc(record.amount_nano / NANO_PER_USD)
        elif isinstance(record, records.StarterClaimed):
            starter = records.TopUpMethod.STARTER
            self.credits_added.labels(starter).inc(record.amount_nano / NANO_PER_USD)

    def _model_counters(self, model: str) -> tuple[Counter, Counter, Counter]:
        counters = self._per_model.get(model)
        if counters is None:
            counters = self._per_model[model] = (
                self.charged.labels(model),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
        return counters

    def on_journal_batch(self, count: int, seconds: float) -> None:
        self.journal_sync.observe(seconds)
        self.journal_batch.observe(count)


def _rejection(error: CorvexError) -> str | None:
    match error.reason:
        case Reason.INSUFFICIENT_CREDITS:
            by_cap = error.metadata.get("limit") == "spend_cap"
            return "spend_cap" if by_cap else "insufficient_credits"
        case Reason.RATE_LIMIT_EXCEEDED:
            return "rate_limit"
        case Reason.TOKEN_LIMIT_EXCEEDED:
            return "token_limit"
        case Reason.ENGINE_UNAVAILABLE:
            return "overload"
        case Reason.SERVICE_UNAVAILABLE:
            return "unavailable"
    return None
