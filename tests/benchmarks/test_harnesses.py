"""The harness glue on made-up data: the tokenizer files, the datasets, the commands as shown,
and reading guidellm's and aiperf's reports into our names. No harness is run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import harnesses
from benchmarks.harnesses import HarnessLoad


def test_tokenizer_splits_like_the_simulated_engine(tmp_path: Path) -> None:
    files = harnesses.tokenizer_files(["Benchmark", "tokens", "benchmark"])
    tokenizer = files["tokenizer.json"]
    assert tokenizer["pre_tokenizer"]["pattern"]["Regex"] == r"\w+|[^\w\s]"
    assert tokenizer["pre_tokenizer"]["invert"] is True
    assert tokenizer["model"]["vocab"] == {"[UNK]": 0, "benchmark": 1, "tokens": 2}
    repo = harnesses.install_tokenizer(tmp_path, ["core"])
    cache = tmp_path / "hub" / "models--corvex--simulated-word-tokenizer"
    revision = (cache / "refs" / "main").read_text()
    assert repo == "corvex/simulated-word-tokenizer"
    assert json.loads((cache / "snapshots" / revision / "tokenizer.json").read_text())


@pytest.mark.parametrize(("harness", "keys"), [("guidellm", {"prompt", "output_tokens_count"}),
                                               ("aiperf", {"text", "output_length"})])  # fmt: skip
def test_dataset_has_one_line_per_request(tmp_path: Path, harness: str, keys: set[str]) -> None:
    load = HarnessLoad(requests=5, prompt_words=10, max_tokens=32)
    path = harnesses.write_dataset(tmp_path / "d.jsonl", harness, load)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == keys
    assert len(next(v for v in rows[0].values() if isinstance(v, str)).split()) == 10


def test_commands_are_shown_without_the_key(tmp_path: Path) -> None:
    argv = harnesses.aiperf_argv("http://127.0.0.1:1", "corvex-secret", HarnessLoad(),
                                 tmp_path / "d.jsonl", tmp_path, "tok")  # fmt: skip
    shown = harnesses.shown(argv, "corvex-secret")
    assert "corvex-secret" not in shown and "$CORVEX_API_KEY" in shown
    assert shown.startswith(".venv-bench-aiperf/bin/aiperf profile")


def _guidellm_metric(mean: float, p50: float) -> dict[str, object]:
    return {"successful": {"mean": mean, "percentiles": {"p50": p50, "p90": p50, "p99": p50}}}


def test_guidellm_report_in_our_names() -> None:
    metrics = {
        "request_totals": {"successful": 24},
        "time_to_first_token_ms": _guidellm_metric(40, 37),
        "inter_token_latency_ms": _guidellm_metric(20.4, 20.3),
        "request_latency": _guidellm_metric(1.33, 1.32),
        "output_tokens_per_second": {"successful": {"mean": 369.0}},
        "requests_per_second": {"successful": {"mean": 5.76}},
        "output_token_count": {"successful": {"mean": 64.0}},
    }
    fields = harnesses.parse_guidellm({"benchmarks": [{"metrics": metrics}]})
    assert fields["requests"] == 24
    assert fields["ttft_ms"].p50 == 37 and fields["tpot_ms"].mean == 20.4
    assert fields["e2e_ms"].p50 == pytest.approx(1320)  # seconds in, milliseconds out
    assert fields["output_tokens_per_s"] == 369.0


def test_aiperf_report_in_our_names() -> None:
    def metric(avg: float) -> dict[str, float]:
        return {"avg": avg, "p50": avg, "p90": avg, "p99": avg}

    report = {
        "request_count": {"avg": 24.0},
        "time_to_first_token": metric(42.0),
        "inter_token_latency": metric(20.6),
        "inter_chunk_latency": metric(20.4),
        "request_latency": metric(1351.0),
        "output_token_throughput": {"avg": 373.0},
        "request_throughput": {"avg": 5.83},
        "output_sequence_length": {"avg": 64.0},
    }
    fields = harnesses.parse_aiperf(report)
    assert (fields["requests"], fields["tpot_ms"].p50, fields["itl_ms"].p50) == (24, 20.6, 20.4)
    assert fields["requests_per_s"] == 5.83
