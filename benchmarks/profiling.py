"""Where the time goes: samples the Corvex core and edge with py-spy while the load generator
drives them, and condenses the collapsed stacks into shares by function (self and inclusive)
and by area of the code (accounting, journal, gRPC, aiohttp, protobuf, logging, ...).
Only the thread holding the GIL is sampled (`--gil`): the shares are of Python CPU time,
not of time spent waiting; C work done without the GIL (gRPC's core, fsync) is not in them.
py-spy is an optional tool (`pip install py-spy`); nothing else needs it."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

from benchmarks import loadgen, systems
from benchmarks.loadgen import LoadResult, LoadSpec
from benchmarks.systems import CorvexVariant
from benchmarks.workload import Workload

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Areas of the code, by a fragment of the frame's file path; the first match wins.
AREAS = (
    ("accounting (metering, ledger, limits)",
     ("corvex_core/metering", "corvex_core/ledger", "corvex_core/limits")),
    ("journal", ("corvex_core/journal", "sqlite3")),
    ("telemetry + logging", ("corvex_core/telemetry", "corvex/logs", "logging/")),
    ("engine (simulated)", ("corvex_core/engines",)),
    # py-spy names some files by their base name only.
    ("servicers", ("corvex_core/servicers", "inference.py", "status.py", "accounts.py")),
    ("gateway handlers", ("gateway/",)),
    ("grpc", ("grpc/", "grpc_")),
    ("protobuf", ("google/protobuf",)),
    ("aiohttp", ("aiohttp/", "multidict", "yarl")),
    ("msgspec", ("msgspec",)),
    ("event loop and C code below it (uvloop, grpc's Cython)", ("asyncio/", "uvloop")),
)  # fmt: skip


class Profile(msgspec.Struct):
    """One process's samples, condensed."""

    process: str
    samples: int
    self_top: list[tuple[str, float]]
    # The same by source line: which statement the process was on.
    lines_top: list[tuple[str, float]]
    inclusive_top: list[tuple[str, float]]
    areas: list[tuple[str, float]]


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frames(stack: str) -> list[tuple[str, str, str]]:
    """(function, file, line) of each frame, outermost first; thread markers dropped."""
    frames = []
    for text in stack.split(";"):
        match = _FRAME.match(text.strip())
        if match and not text.startswith(("thread ", "process ")):
            frames.append((match["func"], match["file"], match["line"] or "?"))
    return frames


def _label(func: str, file: str) -> str:
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{func} ({short})"


def _area(file: str) -> str | None:
    for area, fragments in AREAS:
        if any(fragment in file for fragment in fragments):
            return area
    return None


def _leaf_area(frames: list[tuple[str, str, str]]) -> str:
    """The area of the innermost frame that belongs to one, so areas partition the samples."""
    for _, file, _ in reversed(frames):
        area = _area(file)
        if area is not None:
            return area
    return "other"


def condense(process: str, lines: Iterable[str], top: int = 25) -> Profile:
    """Shares of samples: leaf function (self), any frame (inclusive), and area (the
    innermost frame's, so the areas add up to 100%)."""
    self_count: collections.Counter[str] = collections.Counter()
    line_count: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        frames = _frames(stack)
        if not frames or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        self_count[_label(*frames[-1][:2])] += count
        line_count[_label(frames[-1][0], f"{frames[-1][1]}:{frames[-1][2]}")] += count
        for label in {_label(func, file) for func, file, _ in frames}:
            inclusive[label] += count
        areas[_leaf_area(frames)] += count

    def shares(counter: collections.Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, c / total) for name, c in counter.most_common(n)] if total else []

    return Profile(process, total, shares(self_count, top), shares(line_count, top),
                   shares(inclusive, top * 2), shares(areas, len(AREAS) + 1))  # fmt: skip


def render(profile: Profile) -> str:
    lines = [f"# {profile.process}: {profile.samples} samples", "", "## by area (innermost)"]
    lines += [f"{share:6.1%}  {name}" for name, share in profile.areas]
    lines += ["", "## by function, self"]
    lines += [f"{share:6.1%}  {name}" for name, share in profile.self_top]
    lines += ["", "## by source line, self"]
    lines += [f"{share:6.1%}  {name}" for name, share in profile.lines_top]
    lines += ["", "## by function, inclusive"]
    lines += [f"{share:6.1%}  {name}" for name, share in profile.inclusive_top]
    return "\n".join(lines) + "\n"


def _record(tool: str, pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    argv = [tool, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
            "--format", "raw", "--nonblocking", "--gil", "--output", str(output)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile(
    endpoint_kind: str,
    workload: Workload,
    spec: LoadSpec,
    out: Path,
    *,
    variant: CorvexVariant | None = None,
    keep_raw: bool = False,
) -> tuple[LoadResult, list[Profile]]:
    """Runs the load against a fresh Corvex stack while py-spy samples core and edge; writes
    the condensed profiles to `out` (and py-spy's raw stacks, with `keep_raw`)."""
    tool = py_spy()
    if tool is None:
        raise RuntimeError("py-spy is not installed: `.venv/bin/pip install py-spy`")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corvex-profile-") as tmp:
        raw_dir = out if keep_raw else Path(tmp)
        result, raws = _sample(tool, endpoint_kind, workload, spec, raw_dir, variant)
        profiles = []
        for name, raw in raws.items():
            condensed = condense(name, raw.read_text().splitlines())
            if condensed.samples:  # an idle process (the edge, under gRPC load) has none
                (out / f"profile-{name}.txt").write_text(render(condensed))
                profiles.append(condensed)
    return result, profiles


def _sample(
    tool: str,
    endpoint_kind: str,
    workload: Workload,
    spec: LoadSpec,
    raw_dir: Path,
    variant: CorvexVariant | None,
) -> tuple[LoadResult, dict[str, Path]]:
    with systems.corvex("corvex", variant or CorvexVariant()) as system:
        kind: Literal["rest", "grpc"] = "rest" if endpoint_kind in ("rest", "edge") else "grpc"
        workload = msgspec.structs.replace(workload, api_keys=system.api_keys)
        warm = msgspec.structs.replace(spec, duration_s=1.0, requests=spec.warmup_requests or 200)
        loadgen.run(system.endpoint(kind), workload, warm, progress=False)
        raws = {name: raw_dir / f"profile-{name}.raw.txt" for name in system.processes}
        recorders = [_record(tool, pid, spec.duration_s, raws[name])
                     for name, pid in system.processes.items()]  # fmt: skip
        result = loadgen.run(system.endpoint(kind), workload, spec, watch=system.processes,
                             label="profiling")  # fmt: skip
        for recorder in recorders:
            _, err = recorder.communicate(timeout=spec.duration_s + 60)
            if recorder.returncode:
                raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    return result, raws
