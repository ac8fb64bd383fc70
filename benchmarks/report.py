"""Writing a suite's results: the raw JSON (`latest.json`), a Markdown report (`latest.md`)
with the goals, the scenario tables and the machine, the charts, and the results block of
`benchmarks/README.md` (between its markers). It formats; it computes nothing new."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import msgspec

from benchmarks.capacity import Capacity
from benchmarks.scenarios import CaseResult, SuiteResult
from benchmarks.stats import Spread

BEGIN = "<!-- results:begin (written by `python -m benchmarks`) -->"
END = "<!-- results:end -->"


def _num(value: float, digits: int = 0) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def cell(value: Spread | None, digits: int = 0, scale: float = 1.0) -> str:
    """ "median (min–max)", or just the median when there was one run."""
    if value is None or not value.n:
        return "—"
    mid = _num(value.median * scale, digits)
    if value.n == 1 or value.min == value.max:
        return mid
    return f"{mid} ({_num(value.min * scale, digits)}–{_num(value.max * scale, digits)})"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _cpu_split(result: CaseResult) -> str:
    """ "core 910 (22% sys) + edge 700 (25% sys)": each process's CPU per request, and how much
    of it the kernel spent on its behalf."""
    s = result.summary
    names = sorted(k[4 : -len("_per_request_us")] for k in s if k.endswith("_per_request_us")
                   and k.startswith("cpu_"))  # fmt: skip
    parts = []
    for name in names:
        if s[f"cpu_{name}_per_request_us"].median < 1:
            continue  # idle in this case (the edge, when the load went to gRPC)
        system = s.get(f"cpu_{name}_system_share")
        share = f" ({system.median:.0%} sys)" if system and system.n else ""
        parts.append(f"{name} {cell(s[f'cpu_{name}_per_request_us'])}{share}")
    return " + ".join(parts) or "—"


def _case_row(result: CaseResult) -> list[str]:
    s = result.summary
    return [
        result.case.title,
        str(result.case.load.concurrency) if result.case.load.mode == "closed" else "open",
        cell(s["requests_per_s"]),
        cell(s["output_tokens_per_s"]),
        cell(s["e2e_p50_ms"], 2),
        cell(s["e2e_p99_ms"], 2),
        cell(s["ttft_p50_ms"], 2),
        cell(s["server_cpu_per_request_us"]),
        _cpu_split(result),
        cell(s["server_cpu_per_token_us"], 1),
        cell(s["errors"]),
    ]


CASE_HEADER = [
    "case", "conc.", "req/s", "output tok/s", "p50 ms", "p99 ms", "TTFT p50 ms",
    "server CPU µs/req", "per process µs/req", "CPU µs/token", "errors",
]  # fmt: skip


def _cases(cases: Mapping[str, CaseResult], group: str) -> list[str]:
    rows = [_case_row(r) for r in cases.values() if r.case.group == group]
    return _table(CASE_HEADER, rows) if rows else ["(not run)", ""]


def _goals(result: SuiteResult) -> list[str]:
    rows = [[g.goal, g.target, g.measured, g.status, g.gap] for g in result.goals]
    return _table(["goal", "target", "measured: median (min–max)", "status", "gap"], rows)


DERIVED_LABELS: dict[str, dict[str, tuple[str, int, float]]] = {
    "throughput": {
        "rest_vs_skeleton_throughput": ("Corvex REST ÷ skeleton (unary hop), req/s", 2, 1.0),
        "rest_vs_skeleton_fold_throughput": ("Corvex REST ÷ skeleton (16-message hop)", 2, 1.0),
        "rest_vs_aiohttp_throughput": ("Corvex REST ÷ bare aiohttp, req/s", 2, 1.0),
        "rest_vs_litellm_1w_throughput": ("Corvex REST ÷ LiteLLM 1 worker, req/s", 1, 1.0),
        "rest_vs_litellm_2w_throughput": ("Corvex REST ÷ LiteLLM 2 workers, req/s", 1, 1.0),
        "grpc_vs_rest_throughput": ("Corvex gRPC ÷ Corvex REST, req/s", 2, 1.0),
    },
    "latency": {
        "engine_in_process_p50_ms": ("engine called in-process, p50 ms", 3, 1.0),
        "added_latency_p50_ms": ("added latency REST, c=1, p50 ms", 2, 1.0),
        "added_latency_grpc_p50_ms": ("added latency gRPC, c=1, p50 ms", 2, 1.0),
        "added_latency_unmetered_p50_ms": ("… with metering off, p50 ms", 2, 1.0),
        "added_latency_nojournal_p50_ms": ("… with the journal disabled, p50 ms", 2, 1.0),
        "skeleton_latency_p50_ms": ("skeleton (unary hop) latency, c=1, p50 ms", 2, 1.0),
        "skeleton_fold_latency_p50_ms": ("skeleton (16-message hop), c=1, p50 ms", 2, 1.0),
    },
    "metering": {
        "metering_throughput_ratio_rest": ("req/s metered ÷ unmetered, REST, closed loop", 2, 1.0),
        "metering_cpu_share_rest": ("metering share of server CPU/req, REST, %", 1, 100.0),
        "metering_cpu_share_rest_core": ("metering share of core CPU/req, REST, %", 1, 100.0),
        "metering_cpu_share_grpc": ("metering share of core CPU/req, gRPC, %", 1, 100.0),
        "metering_logic_cpu_share_rest": ("… of which without the journal, %", 1, 100.0),
        "metering_latency_ratio_rest_p50": ("p50 latency metered ÷ unmetered, REST", 2, 1.0),
        "metering_latency_ratio_grpc_p50": ("p50 latency metered ÷ unmetered, gRPC", 2, 1.0),
        "accounting_ns_per_request": ("authenticate + admit + settle in-process, µs", 1, 0.001),
        "accounting_share_of_core_cpu": ("… as a share of core CPU/req, %", 1, 100.0),
    },
    "durability": {
        "journal_fsync_core_cpu_us": ("core CPU/req, journal with fsync, µs", 0, 1.0),
        "journal_nofsync_core_cpu_us": ("core CPU/req, journal without fsync, µs", 0, 1.0),
        "journal_off_core_cpu_us": ("core CPU/req, journal disabled, µs", 0, 1.0),
        "journal_fsync_cpu_share": ("journal (fsync) share of server CPU/req, %", 1, 100.0),
        "journal_nofsync_cpu_share": ("journal (no fsync) share of server CPU/req, %", 1, 100.0),
        "journal_fsync_latency_ratio_p50": ("p50 latency fsync ÷ disabled", 2, 1.0),
        "journal_nofsync_latency_ratio_p50": ("p50 latency no fsync ÷ disabled", 2, 1.0),
    },
    "streaming": {
        "stream_cpu_per_token_us": ("streaming, 1 event/token: edge+core CPU/token, µs", 1, 1.0),
        "stream_chunks_per_token": ("… SSE content events per token", 2, 1.0),
        "stream_tokens_per_s_per_core": ("… tokens/s one core allows", 0, 1.0),
        "stream_coalesced_cpu_per_token_us": ("instant engine (coalesced), µs/token", 1, 1.0),
        "skeleton_stream_cpu_per_token_us": ("skeleton streaming, µs/token", 1, 1.0),
        "grpc_stream_cpu_per_message_us": ("bare grpc.aio streaming server, µs/message", 1, 1.0),
    },
    "node-load": {
        "paced_core_cpu_per_token_us": ("Corvex core CPU per streamed token, µs", 1, 1.0),
        "paced_edge_cpu_per_token_us": ("Corvex edge CPU per streamed token, µs", 1, 1.0),
        "paced_cpu_per_token_us": ("Corvex core + edge, µs/token", 1, 1.0),
        "paced_skeleton_core_cpu_per_token_us": ("skeleton's echo (core side), µs/token", 1, 1.0),
        "paced_skeleton_edge_cpu_per_token_us": ("skeleton's aiohttp (edge), µs/token", 1, 1.0),
        "paced_skeleton_cpu_per_token_us": ("paced skeleton, both, µs/token", 1, 1.0),
        "paced_vs_ceiling_cpu_per_token": ("Corvex ÷ skeleton, CPU per token, per round", 2, 1.0),
        "paced_core_vs_ceiling_cpu_per_token": ("… core ÷ skeleton's echo", 2, 1.0),
        "paced_edge_vs_ceiling_cpu_per_token": ("… edge ÷ skeleton's aiohttp", 2, 1.0),
        "paced_grpc_core_cpu_per_token_us": ("Corvex gRPC direct: core µs/token", 1, 1.0),
        "paced_echo_cpu_per_token_us": ("bare grpc.aio paced echo, µs/token", 1, 1.0),
        "paced_grpc_vs_echo_cpu_per_token": ("Corvex gRPC ÷ bare echo, CPU per token", 2, 1.0),
        "paced_calls_core_cpu_per_token_us": ("Corvex, a call per request: core µs/token", 1, 1.0),
        "paced_calls_edge_cpu_per_token_us": ("Corvex, a call per request: edge µs/token", 1, 1.0),
        "paced_streams_vs_calls_cpu_per_token": (
            "Streams ÷ a call per request, CPU per token", 2, 1.0
        ),
        "paced_vs_ceiling_throughput": ("Corvex ÷ skeleton, output tok/s", 2, 1.0),
        "paced_tokens_per_s": ("Corvex REST output tok/s", 0, 1.0),
        "paced_itl_p50_ms": ("Corvex REST ITL p50, ms (step 20)", 2, 1.0),
        "paced_skeleton_itl_p50_ms": ("skeleton ITL p50, ms", 2, 1.0),
        "paced_events_per_token": ("Corvex SSE content events per token", 2, 1.0),
    },
}  # fmt: skip


def _derived(result: SuiteResult, section: str) -> list[str]:
    return _derived_of(result.derived, section)


def _derived_of(derived: Mapping[str, Spread], section: str) -> list[str]:
    rows = []
    for name, (label, digits, scale) in DERIVED_LABELS[section].items():
        rows.append([label, cell(derived.get(name), digits, scale)])
    return _table(["figure", "median (min–max)"], rows)


def _capacity(found_all: Sequence[Capacity]) -> list[str]:
    """Each shape's probes, in the order measured, and its capacity."""
    if not found_all:
        return ["(not run)", ""]
    lines: list[str] = []
    for found in found_all:
        rows = []
        for p in found.probes:
            cpu = p.cpu_per_token_us
            rss = " / ".join(
                f"{p.rss_per_thousand_streams_mib(n):,.0f}" for n in sorted(p.rss_peak_bytes)
            )
            rows.append(
                [
                    str(p.concurrency),
                    _num(p.output_tokens_per_s),
                    _num(p.itl_p50_ms, 2),
                    "yes" if p.sustains(found.step_ms, found.tolerance) else "no",
                    _num(cpu.get("core", math.nan), 1),
                    _num(cpu.get("edge", math.nan), 1),
                    _num(p.cpu_total_per_token_us(), 1),
                    rss or "—",
                    str(p.errors),
                ]
            )
        header = [
            "streams",
            "output tok/s",
            "ITL p50 ms",
            "holds",
            "core µs/token",
            "edge µs/token",
            "both µs/token",
            "RSS MiB per 1,000 streams (core / edge)",
            "errors",
        ]
        lines += [f"**{found.shape}** (probes in the order measured):", "", *_table(header, rows)]
    return [*lines, "![CPU per token and ITL vs concurrency](results/capacity.png)", ""]


def _micro(result: SuiteResult) -> list[str]:
    rows = [[name, cell(value)] for name, value in result.micro.ns_per_op.items()]
    engine = result.micro.engine_call
    rows.append(["simulated engine call, 16 tokens (p50, µs)", _num(engine.p50_ms * 1000)])
    return _table(["operation (in-process)", "ns/op: median (min–max)"], rows)


def _machine(result: SuiteResult) -> str:
    m = result.machine
    packages = ", ".join(f"{p} {m[p]}" for p in ("grpcio", "aiohttp", "uvloop", "msgspec",
                                                 "protobuf"))  # fmt: skip
    return (
        f"{m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; {packages}"
    )


def markdown(result: SuiteResult) -> str:
    o = result.options
    lines = [
        f"Run {result.started_utc}, {result.elapsed_s / 60:.1f} min, "
        f"{'quick, ' if o.quick else ''}{o.repeats} repeat(s) of {o.duration_s:g} s per case; "
        "every figure is the median with min–max over the repeats.",
        "",
        f"Machine: {_machine(result)}.",
        "",
        "### Goals",
        "",
        *_goals(result),
        "### 1. Ceilings",
        "",
        *_cases(result.cases, "ceilings"),
        "### 2. Corvex, full stack (metering, auth, limits, journal with fsync)",
        "",
        *_cases(result.cases, "corvex"),
        *_derived(result, "throughput"),
        "### 3–4. Metering and durability overhead",
        "",
        "Closed loop, for the throughput ratio:",
        "",
        *_cases(result.cases, "metering"),
        "At equal load (the same Poisson arrival rate for every variant), for CPU per request "
        "and latency:",
        "",
        *_cases(result.cases, "equal-load"),
        *_derived(result, "metering"),
        *_micro(result),
        *_derived(result, "durability"),
        "### 5. Peer: LiteLLM proxy",
        "",
        *_cases(result.cases, "peer"),
        "### 6. Open loop (Poisson arrivals) at fractions of the measured capacity",
        "",
        *_cases(result.cases, "open-loop"),
        "### Added latency at concurrency 1",
        "",
        *_cases(result.cases, "latency"),
        *_derived(result, "latency"),
        "### Streaming CPU per output token",
        "",
        *_cases(result.cases, "streaming"),
        *_derived(result, "streaming"),
        "### Streaming at node load (paced: one token per stream per 20 ms step)",
        "",
        *_cases(result.cases, "node-load"),
        *_derived(result, "node-load"),
        "### Node capacity",
        "",
        *_capacity(result.capacity),
        "### Throughput against concurrency",
        "",
        *_cases(result.cases, "sweep"),
        "![throughput vs concurrency](results/throughput_vs_concurrency.png)",
        "",
        "![latency vs load](results/latency_vs_load.png)",
        "",
    ]
    lines += [f"Note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def paced_markdown(cases: Mapping[str, CaseResult], derived: Mapping[str, Spread]) -> str:
    """The node-load cases and their figures (for `python -m benchmarks paced`)."""
    return "\n".join([*_cases(cases, "node-load"), *_derived_of(derived, "node-load")])


def capacity_markdown(found: Sequence[Capacity]) -> str:
    """The capacity probes and the capacity of each shape."""
    from benchmarks import capacity

    lines = _capacity(found)[:-2] + [f"- {capacity.describe(c)}" for c in found]
    return "\n".join(lines) + "\n"


def write(result: SuiteResult, out: Path) -> list[Path]:
    """latest.json, latest.md and the charts in `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "latest.json", out / "latest.md"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=1) + b"\n")
    md_path.write_text(markdown(result).replace("](results/", "]("))
    written = [json_path, md_path]
    try:
        from benchmarks import charts
    except ImportError as exc:  # matplotlib is in the `bench` extra
        print(f"charts skipped ({exc}); install the bench extra", file=sys.stderr)
        return written
    written += charts.write(result.cases, out)
    if result.capacity:
        written.append(charts.capacity_chart(result.capacity, out / "capacity.png"))
    return written


def update_readme(readme: Path, result: SuiteResult) -> bool:
    """Replaces the results block of the README; False when it has no markers."""
    text = readme.read_text() if readme.exists() else ""
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n\n" + markdown(result) + "\n" + END + tail)
    return True


def load(path: Path) -> SuiteResult:
    """A suite's results back from its JSON (to re-render the report)."""
    return msgspec.json.decode(path.read_bytes(), type=SuiteResult)
