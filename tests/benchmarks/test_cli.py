"""Every benchmarks command parses and answers --help (argparse formats help lazily, so a
stray % only shows when someone asks)."""

from __future__ import annotations

import pytest

from benchmarks.cli import COMMANDS, build_parser


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_steady_run_defaults_to_one_answer_of_ramp_and_half_the_clients_warming() -> None:
    from benchmarks.cli import _spec

    args = build_parser().parse_args(
        ["run", "--stream", "--max-tokens", "256", "--tpot-ms", "20", "-c", "256", "--steady"]
    )
    spec = _spec(args)
    assert (spec.continuous, spec.warmup_requests, spec.ramp_s) == (True, 128, pytest.approx(5.12))
