"""The load harnesses users bring, guidellm and aiperf, run against the Corvex edge with the
same load as our load generator, so their TTFT, ITL and throughput can be put beside ours.

Each lives in its own virtualenv (`.venv-bench-guidellm`, `.venv-bench-aiperf`, pinned
versions, created on first use) and runs offline: the Hugging Face variables that forbid any
hub access are set, and the tokenizer both need is made here. It is the simulated engine's
(words and punctuation marks are one token each, `\\w+|[^\\w\\s]`): a `tokenizers` WordLevel
model behind that same split, every unknown word one `[UNK]` token, so the harnesses count
exactly what the engine counts. It is written into a Hugging Face cache of its own under the
run's directory (aiperf, offline, looks tokenizers up only in a cache, not on a path). The
prompts are ours too (a dataset file of the load generator's prompts), so all three send the
same requests.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from benchmarks import loadgen, systems, venvs
from benchmarks.loadgen import LoadResult, LoadSpec
from benchmarks.systems import CorvexVariant
from benchmarks.workload import DEFAULT_MODEL, Lengths, Workload, prompt_text

HarnessName = Literal["guidellm", "aiperf"]
# Pinned: their flags and report formats change between releases.
VERSIONS: Final[dict[HarnessName, str]] = {"guidellm": "0.8.1", "aiperf": "0.13.0"}
CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
TOKENIZER_REPO: Final = "corvex/simulated-word-tokenizer"
# Any fixed 40-hex revision: the cache maps refs/main to it.
_TOKENIZER_REVISION: Final = "0" * 39 + "1"
_TOKEN_PATTERN: Final = r"\w+|[^\w\s]"
OFFLINE_ENV: Final = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
RUN_TIMEOUT_S: Final = 600.0


def venv(name: HarnessName) -> Path:
    return venvs.ROOT / f".venv-bench-{name}"


def ensure_installed(name: HarnessName) -> str:
    """The harness's pinned version, installed into its virtualenv if needed."""
    return venvs.ensure(venv(name), f"{name}=={VERSIONS[name]}", name)


# ---- the tokenizer and the prompts --------------------------------------------------------


def tokenizer_files(words: Sequence[str]) -> dict[str, dict[str, Any]]:
    """tokenizer.json and tokenizer_config.json of the simulated engine's tokenizer, with
    `words` in its vocabulary (so prompts made of them round-trip) and [UNK] for the rest."""
    vocab = {"[UNK]": 0}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    unk = {"id": 0, "content": "[UNK]", "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}  # fmt: skip
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [unk],
        "normalizer": {"type": "Lowercase"},
        # Keep what the pattern matches (invert), drop what lies between (whitespace): the
        # engine's count_text_tokens.
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": _TOKEN_PATTERN},
            "behavior": "Removed",
            "invert": True,
        },
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]",
              "model_max_length": 1_000_000}  # fmt: skip
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def install_tokenizer(hf_home: Path, words: Sequence[str]) -> str:
    """Writes the tokenizer into the Hugging Face cache at `hf_home` (the layout
    `snapshot_download(local_files_only=True)` resolves); returns its repository name."""
    repo = hf_home / "hub" / ("models--" + TOKENIZER_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / _TOKENIZER_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in tokenizer_files(words).items():
        (snapshot / name).write_text(json.dumps(content, indent=1))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(_TOKENIZER_REVISION)
    return TOKENIZER_REPO


class HarnessLoad(msgspec.Struct, frozen=True):
    """The load every harness (and our generator) sends: `requests` streamed requests,
    `concurrency` at a time, each a prompt of `prompt_words` words and exactly `max_tokens`
    output tokens (ignore_eos)."""

    concurrency: int = 16
    requests: int = 64
    prompt_words: int = 64
    max_tokens: int = 256
    model: str = DEFAULT_MODEL
    endpoint: str = CHAT

    def prompt(self) -> str:
        return prompt_text(self.prompt_words)


def write_dataset(path: Path, harness: HarnessName, load: HarnessLoad) -> Path:
    """One JSON line per request, in the harness's own column names."""
    if harness == "guidellm":
        row: dict[str, Any] = {"prompt": load.prompt(), "output_tokens_count": load.max_tokens}
    else:
        row = {"text": load.prompt(), "output_length": load.max_tokens}
    line = json.dumps(row) + "\n"
    path.write_text(line * load.requests)
    return path


# ---- the commands -------------------------------------------------------------------------


def guidellm_argv(
    url: str, api_key: str, load: HarnessLoad, data: Path, out: Path, tokenizer: str
) -> list[str]:
    backend = (f"kind=openai_http,target={url},model={load.model},api_key={api_key},"
               f"request_format={load.endpoint}")  # fmt: skip
    return [
        str(venv("guidellm") / "bin" / "guidellm"), "run",
        "--backend", backend,
        "--profile", f"kind=concurrent,streams={load.concurrency}",
        "--constraint", f"kind=max_requests,count={load.requests}",
        "--tokenizer", f"kind=hf_auto,model={tokenizer}",
        "--data", f"kind=json_file,path={data}",
        "--output", f"kind=json,path={out / 'guidellm.json'}",
        "--disable-progress",
    ]  # fmt: skip


def aiperf_argv(
    url: str, api_key: str, load: HarnessLoad, data: Path, out: Path, tokenizer: str
) -> list[str]:
    endpoint_type = "chat" if load.endpoint == CHAT else "completions"
    return [
        str(venv("aiperf") / "bin" / "aiperf"), "profile",
        "--model", load.model,
        "--url", url,
        "--endpoint-type", endpoint_type,
        "--streaming",
        "--api-key", api_key,
        "--tokenizer", tokenizer,
        "--input-file", str(data),
        "--custom-dataset-type", "single_turn",
        "--concurrency", str(load.concurrency),
        "--request-count", str(load.requests),
        "--extra-inputs", "ignore_eos:true",
        "--artifact-dir", str(out / "aiperf"),
        "--ui-type", "simple",
    ]  # fmt: skip


def shown(argv: Sequence[str], secret: str) -> str:
    """The command as a person would type it: the key as $CORVEX_API_KEY, the venv relative."""
    text = shlex.join(argv).replace(secret, "$CORVEX_API_KEY")
    return text.replace(str(venvs.ROOT) + "/", "")


# ---- their reports, in our vocabulary -----------------------------------------------------


class Figures(msgspec.Struct, frozen=True, omit_defaults=True):
    """One distribution in milliseconds; 0 where the harness does not report it."""

    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0


class Report(msgspec.Struct):
    """What one harness (or our load generator) measured, under our names: `tpot` is
    (E2E − TTFT)/(n − 1) per request (aiperf's and guidellm's "inter-token latency"), `itl`
    the gaps between content events (aiperf's "inter chunk latency"; guidellm has none)."""

    source: str
    version: str
    command: str
    ok: bool
    note: str = ""
    requests: int = 0
    ttft_ms: Figures = Figures()
    tpot_ms: Figures = Figures()
    itl_ms: Figures = Figures()
    e2e_ms: Figures = Figures()
    output_tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    output_tokens_per_request: float = 0.0
    wall_s: float = 0.0


def _guidellm_figures(metric: Mapping[str, Any], scale: float = 1.0) -> Figures:
    ok = metric.get("successful") or {}
    pct = ok.get("percentiles") or {}
    return Figures(
        mean=float(ok.get("mean") or 0) * scale,
        p50=float(pct.get("p50") or 0) * scale,
        p90=float(pct.get("p90") or 0) * scale,
        p99=float(pct.get("p99") or 0) * scale,
    )


def parse_guidellm(report: Mapping[str, Any]) -> dict[str, Any]:
    """Our fields from guidellm's JSON report (its first benchmark)."""
    metrics = report["benchmarks"][0]["metrics"]
    return {
        "requests": int(metrics["request_totals"]["successful"]),
        "ttft_ms": _guidellm_figures(metrics["time_to_first_token_ms"]),
        # guidellm's ITL is (last token − first token)/(n − 1): our TPOT's definition, ending
        # at the last token rather than the end of the stream.
        "tpot_ms": _guidellm_figures(metrics["inter_token_latency_ms"]),
        "e2e_ms": _guidellm_figures(metrics["request_latency"], 1000.0),
        "output_tokens_per_s": float(metrics["output_tokens_per_second"]["successful"]["mean"]),
        "requests_per_s": float(metrics["requests_per_second"]["successful"]["mean"]),
        "output_tokens_per_request": float(
            metrics["output_token_count"]["successful"]["mean"] or 0
        ),
    }


def _aiperf_figures(metric: Mapping[str, Any] | None) -> Figures:
    if not metric:
        return Figures()
    return Figures(*(float(metric.get(k) or 0) for k in ("avg", "p50", "p90", "p99")))


def parse_aiperf(report: Mapping[str, Any]) -> dict[str, Any]:
    """Our fields from aiperf's profile_export_aiperf.json."""

    def value(name: str) -> float:
        return float((report.get(name) or {}).get("avg") or 0)

    return {
        "requests": int(value("request_count")),
        "ttft_ms": _aiperf_figures(report.get("time_to_first_token")),
        "tpot_ms": _aiperf_figures(report.get("inter_token_latency")),
        "itl_ms": _aiperf_figures(report.get("inter_chunk_latency")),
        "e2e_ms": _aiperf_figures(report.get("request_latency")),
        "output_tokens_per_s": value("output_token_throughput"),
        "requests_per_s": value("request_throughput"),
        "output_tokens_per_request": value("output_sequence_length"),
    }


def ours(result: LoadResult, command: str) -> Report:
    """Our load generator's run in the same shape."""

    def figures(d: Any) -> Figures:
        return Figures(d.mean_ms, d.p50_ms, d.p90_ms, d.p99_ms)

    return Report(
        source="corvex loadgen",
        version="",
        command=command,
        ok=result.ok > 0 and not result.errors,
        note=f"errors {result.errors}" if result.errors else "",
        requests=result.ok,
        ttft_ms=figures(result.ttft),
        tpot_ms=figures(result.tpot),
        itl_ms=figures(result.itl),
        e2e_ms=figures(result.e2e),
        output_tokens_per_s=result.output_tokens_per_s,
        requests_per_s=result.requests_per_s,
        output_tokens_per_request=result.completion_tokens / result.ok if result.ok else 0.0,
        wall_s=result.duration_s,
    )


# ---- running one --------------------------------------------------------------------------


def endpoint_exists(url: str, path: str, api_key: str) -> bool:
    """Whether the edge routes `path` (anything but 404/405 to an empty POST)."""
    request = urllib.request.Request(
        url + path, data=b"{}", method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + api_key},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code not in (404, 405)
    except (urllib.error.URLError, TimeoutError):
        return False


def run(harness: HarnessName, url: str, api_key: str, load: HarnessLoad, workdir: Path) -> Report:
    """Runs one harness once against `url` and reads its report. Never raises for the
    harness's own failures: the report says what went wrong."""
    try:
        version = ensure_installed(harness)
    except venvs.VenvError as exc:
        return Report(harness, VERSIONS[harness], "", False, f"not installed: {exc}")
    out = workdir / harness
    out.mkdir(parents=True, exist_ok=True)
    hf_home = workdir / "hf"
    tokenizer = install_tokenizer(hf_home, load.prompt().split())
    data = write_dataset(out / "data.jsonl", harness, load)
    build = guidellm_argv if harness == "guidellm" else aiperf_argv
    argv = build(url, api_key, load, data, out, tokenizer)
    command = shown(argv, api_key)
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(hf_home)}
    start = time.perf_counter()
    log = out / "output.log"
    try:
        with log.open("wb") as sink:
            done = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                  timeout=RUN_TIMEOUT_S, cwd=out)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Report(harness, version, command, False, f"over {RUN_TIMEOUT_S:.0f} s")
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        return Report(harness, version, command, False, f"exit {done.returncode}: {tail}")
    try:
        if harness == "guidellm":
            fields = parse_guidellm(json.loads((out / "guidellm.json").read_text()))
        else:
            path = out / "aiperf" / "profile_export_aiperf.json"
            fields = parse_aiperf(json.loads(path.read_text()))
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        return Report(harness, version, command, False, f"report unreadable: {exc!r}")
    return Report(harness, version, command, True, wall_s=wall, **fields)


# ---- all of them against one stack --------------------------------------------------------


class Comparison(msgspec.Struct):
    """Our load generator and each harness, one after the other, against one Corvex stack
    whose engine steps every `tpot_ms`."""

    load: HarnessLoad
    tpot_ms: float
    reports: list[Report]
    notes: list[str]


def our_command(load: HarnessLoad, tpot_ms: float) -> str:
    return (f"python -m benchmarks run --stream --max-tokens {load.max_tokens} "
            f"--prompt-tokens {load.prompt_words} --tpot-ms {tpot_ms:g} "
            f"-c {load.concurrency} -n {load.requests}")  # fmt: skip


def compare(
    load: HarnessLoad, tpot_ms: float, names: Sequence[HarnessName], workdir: Path
) -> Comparison:
    """Runs ours, then each harness, with the same load on one fresh Corvex stack."""
    variant = CorvexVariant(tpot_ms=tpot_ms, max_batch=max(256, load.concurrency))
    reports: list[Report] = []
    notes: list[str] = []
    with systems.corvex("corvex", variant) as stack:
        assert stack.http_url
        key = stack.api_keys[0]
        workload = Workload(prompt_tokens=Lengths.fixed(load.prompt_words),
                            max_tokens=Lengths.fixed(load.max_tokens), stream=True,
                            api_keys=(key,))  # fmt: skip
        spec = LoadSpec(concurrency=load.concurrency, requests=load.requests, duration_s=600)
        result = loadgen.run(stack.endpoint("rest"), workload, spec, progress=False)
        reports.append(ours(result, our_command(load, tpot_ms)))
        for endpoint in (CHAT, COMPLETIONS):
            if endpoint == COMPLETIONS and not endpoint_exists(stack.http_url, endpoint, key):
                notes.append(f"{endpoint}: the edge does not serve it yet (404); the "
                             "harnesses' completions runs were skipped")  # fmt: skip
                continue
            this = msgspec.structs.replace(load, endpoint=endpoint)
            for name in names:
                report = run(name, stack.http_url, key, this, workdir / endpoint.strip("/"))
                if endpoint != CHAT:
                    report.source += f" {endpoint}"
                reports.append(report)
    return Comparison(load, tpot_ms, reports, notes)


def _cells(f: Figures) -> str:
    return f"{f.p50:,.2f} / {f.p90:,.2f} / {f.p99:,.2f}" if f.p50 else "—"


def markdown(comparison: Comparison) -> str:
    """The comparison as a table: TTFT, TPOT, ITL, E2E as p50 / p90 / p99 ms."""
    load = comparison.load
    lines = [
        f"{load.requests} streamed requests, {load.concurrency} at a time, "
        f"{load.prompt_words}-word prompts, exactly {load.max_tokens} output tokens, "
        f"engine step {comparison.tpot_ms:g} ms (batch slowdown 0), one Corvex stack.",
        "",
        "| source | ok | requests | TTFT ms p50/p90/p99 | TPOT ms | ITL (event gaps) ms "
        "| E2E ms | output tok/s | req/s | tokens/request | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in comparison.reports:
        name = f"{r.source} {r.version}".strip()
        lines.append(
            f"| {name} | {'yes' if r.ok else 'no'} | {r.requests} | {_cells(r.ttft_ms)} | "
            f"{_cells(r.tpot_ms)} | {_cells(r.itl_ms)} | {_cells(r.e2e_ms)} | "
            f"{r.output_tokens_per_s:,.0f} | {r.requests_per_s:,.2f} | "
            f"{r.output_tokens_per_request:,.1f} | {r.wall_s:,.1f} |"
        )
    lines.append("")
    for r in comparison.reports:
        lines.append(f"- {r.source}: `{r.command}`" + (f" — {r.note}" if r.note else ""))
    lines += [f"- {note}" for note in comparison.notes]
    return "\n".join(lines) + "\n"
