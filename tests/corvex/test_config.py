"""Configuration: defaults, file, CORVEX_* environment and flags, in that precedence, with
errors that name the offending path; and every YAML example in the docs is a valid config."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from corvex.config import ConfigError, load_section
from corvex_core.config import CoreConfig, SimulatedEngineConfig, VllmEngineConfig
from gateway.config import EdgeConfig


def test_defaults_serve_the_catalogue_on_simulated_engines() -> None:
    core = load_section("core", CoreConfig, path=None, environ={})
    assert core.port == 50051 and core.rate_card == "infrastructure/metronome/config.yaml"
    assert isinstance(core.engines.for_model("any/model"), SimulatedEngineConfig)
    assert load_section("edge", EdgeConfig, path=None, environ={}).port == 8000


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "corvex.yaml"
    path.write_text("core:\n  port: 1000\n  journal: {max_batch: 7}\nedge:\n  port: 2000\n")
    env = {"CORVEX_CORE_PORT": "1001", "CORVEX_CORE_JOURNAL_MAX_BATCH": "8"}
    core = load_section("core", CoreConfig, path=path, environ=env)
    assert (core.port, core.journal.max_batch) == (1001, 8)
    flagged = load_section("core", CoreConfig, path=path, environ=env, flags={("port",): 1002})
    assert flagged.port == 1002
    assert load_section("edge", EdgeConfig, path=path, environ={}).port == 2000


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("core:\n  prot: 1\n", "prot"),
        ("core:\n  port: many\n", "$.port"),
        ("core:\n  engines: {default: {backend: tpu}}\n", "backend"),
        ("core: [1, 2]\n", "must be a mapping"),
        ("core: {port: 1\n", "not valid YAML"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_section("core", CoreConfig, path=path, environ={})


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_section("core", CoreConfig, path=tmp_path / "nope.yaml", environ={})


def test_every_yaml_example_in_the_docs_is_a_valid_config() -> None:
    checked = 0
    for doc in ("docs/deploy-gpu.md", "README.md"):
        for block in re.findall(r"```yaml\n(.*?)```", Path(doc).read_text(), re.S):
            data = msgspec.yaml.decode(block.encode())
            if isinstance(data, dict) and "core" in data:
                core = msgspec.convert(data["core"], CoreConfig)
                assert all(isinstance(e, VllmEngineConfig | SimulatedEngineConfig)
                           for e in core.engines.models.values())  # fmt: skip
                checked += 1
    assert checked >= 4


def test_the_make_run_config_is_valid() -> None:
    core = load_section("core", CoreConfig, path="corvex.yaml", environ={})
    edge = load_section("edge", EdgeConfig, path="corvex.yaml", environ={})
    assert edge.core == f"{core.host}:{core.port}"


@pytest.mark.parametrize(
    "text",
    [
        "edge: {body_timeout_s: 0}\n",
        "edge: {header_timeout_s: 0}\n",
        "edge: {max_connections: 0}\n",
        "edge: {core_keepalive_s: -1}\n",
    ],
)
def test_edge_timeouts_and_bounds_must_be_positive(tmp_path: Path, text: str) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    field = text.split("{")[1].split(":")[0]
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_section("edge", EdgeConfig, path=path, environ={})


def test_edge_connection_settings_come_from_the_environment_too() -> None:
    env = {"CORVEX_EDGE_IDLE_TIMEOUT_S": "5", "CORVEX_EDGE_METRICS_PORT": "-1"}
    edge = load_section("edge", EdgeConfig, path=None, environ=env)
    assert (edge.idle_timeout_s, edge.metrics_port) == (5.0, -1)
