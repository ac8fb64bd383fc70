"""The benchmarks' command line, `python -m benchmarks` (and `corvex bench ...`):

python -m benchmarks [suite] [--quick] [--out DIR]   the whole suite (make bench)
python -m benchmarks run --target edge|grpc ...      one custom load, against a running
                                                     server or a stack it starts
python -m benchmarks micro                           the in-process microbenchmarks
python -m benchmarks profile [--target ...]          py-spy profiles of core and edge
python -m benchmarks paced [-c 256]                  node load: paced streams, Corvex and
                                                     the paced ceilings, per round
python -m benchmarks capacity [--grid 64,256,1024]   node capacity (ITL p50 within 10%% of the step)
python -m benchmarks soak [--minutes 10]             RSS over a soak (make bench-soak)
python -m benchmarks harnesses [-c 16]               guidellm and aiperf beside ours
python -m benchmarks report [--from JSON]            re-render the report from results
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec

from benchmarks import capacity, memory, micro, report, scenarios
from benchmarks.loadgen import LoadResult, LoadSpec
from benchmarks.systems import CorvexVariant, System
from benchmarks.targets import Endpoint
from benchmarks.vocabulary import Slo
from benchmarks.workload import Lengths, Workload, parse_model_mix

COMMANDS = ("suite", "run", "micro", "profile", "report", "harnesses", "paced", "capacity",
            "soak", "stalls", "cluster")  # fmt: skip
DEFAULT_OUT = Path("benchmarks/results")
DEFAULT_README = Path("benchmarks/README.md")


def _progress(args: argparse.Namespace) -> bool | None:
    return False if getattr(args, "no_progress", False) else None


# ---- arguments -----------------------------------------------------------------------------


def _suite_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--quick", action="store_true", help="1 repeat, shorter runs (~2 min)")
    parser.add_argument("--repeats", type=int, help="repeats per case (default 3; quick 1)")
    parser.add_argument("--no-peer", action="store_true", help="skip the LiteLLM peer")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity search")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README,
                        help="README whose results block to rewrite")  # fmt: skip
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")


def _load_args(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=32,
        help="clients (closed loop) or most requests in flight (open loop)",
    )
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--requests", "-n", type=int, default=2000, help="stop after this many")
    load.add_argument("--duration", type=float, default=60.0, help="stop after this many s")
    load.add_argument("--warmup", type=int, default=0, help="unmeasured requests first")
    load.add_argument(
        "--ramp",
        type=float,
        metavar="S",
        help="closed loop: start the clients spread over S seconds (desynchronizes streams)",
    )
    load.add_argument(
        "--steady",
        action="store_true",
        help="closed loop, measured at its steady state: clients ramp in (default over one "
        "answer at --tpot-ms), the window opens once --warmup requests (default half the "
        "clients) ended and lasts --duration s while the clients keep going; rates and CPU "
        "count what arrived inside it",
    )
    work = parser.add_argument_group("workload")
    work.add_argument("--stream", action="store_true")
    work.add_argument(
        "--max-tokens", type=Lengths.parse, default=Lengths.fixed(16), metavar="N|LOW-HIGH"
    )
    work.add_argument(
        "--prompt-tokens",
        type=Lengths.parse,
        default=Lengths.fixed(64),
        metavar="N|LOW-HIGH",
        help="prompt words (one simulated token each)",
    )
    work.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID[=WEIGHT]",
        help="repeat for a mix (default the catalogue's DeepSeek V4 Flash)",
    )
    work.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="repeat to spread requests over several keys",
    )
    work.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="let the model end answers early (default: exact max_tokens)",
    )
    work.add_argument("--seed", type=int, default=0)  # fmt: skip


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        choices=["edge", "grpc"],
        default="edge",
        help="the REST edge (OpenAI JSON/SSE) or the core's gRPC API",
    )
    parser.add_argument("--url", help="edge base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--address", help="core gRPC address, e.g. 127.0.0.1:50051")
    parser.add_argument(
        "--pid",
        action="append",
        default=[],
        metavar="NAME=PID",
        help="measure this server process's CPU (repeatable)",
    )
    stack = parser.add_argument_group("without --url/--address: start a Corvex stack")
    stack.add_argument("--unmetered", action="store_true", help="benchmark_unmetered on")
    stack.add_argument("--journal", choices=["fsync", "nofsync", "off"], default="fsync")
    stack.add_argument("--tpot-ms", type=float, default=0.0, help="simulated ms per token")
    stack.add_argument(
        "--batch-slowdown",
        type=float,
        default=0.0,
        help="step growth per running request (0: the step stays --tpot-ms; engine default 0.01)",
    )
    stack.add_argument("--keys", type=int, default=4, help="API keys to create and use")
    stack.add_argument(
        "--ceiling",
        choices=["grpc", "skeleton"],
        help="start a ceiling instead of Corvex, paced at --tpot-ms per message: the bare "
        "grpc.aio echo (with --target grpc) or the aiohttp→grpc SSE skeleton (--target edge)",
    )
    slo = parser.add_argument_group("goodput: requests that meet every objective given")
    slo.add_argument("--slo-ttft-ms", type=float, help="time to first token")
    slo.add_argument("--slo-itl-ms", type=float, help="a request's mean inter-token latency")
    slo.add_argument("--slo-tpot-ms", type=float, help="(E2E − TTFT) / (tokens − 1)")
    slo.add_argument("--slo-e2e-ms", type=float, help="end-to-end latency")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    _load_args(parser)  # fmt: skip


def _capacity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tpot-ms", type=float, default=scenarios.PACED_STEP_MS,
                        help="engine step, ms")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=scenarios.PACED_TOKENS)
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per probe")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")


def _profile_args(prof: argparse.ArgumentParser) -> None:
    prof.add_argument("--target", choices=["edge", "grpc"], default="edge")
    prof.add_argument("--tpot-ms", type=float, default=0.0, help="simulated ms per token")
    prof.add_argument("--unmetered", action="store_true", help="benchmark_unmetered on")
    prof.add_argument("--journal", choices=["fsync", "nofsync", "off"], default="fsync")
    prof.add_argument("--out", type=Path, default=DEFAULT_OUT / "profiles")
    prof.add_argument("--keep-raw", action="store_true", help="also keep py-spy's raw stacks")
    _load_args(prof)


def _harnesses_args(har: argparse.ArgumentParser) -> None:
    har.add_argument("--harness", action="append", choices=["guidellm", "aiperf"],
                     help="which (repeatable; default both)")  # fmt: skip
    har.add_argument("--concurrency", "-c", type=int, default=16)
    har.add_argument("--requests", "-n", type=int, default=64)
    har.add_argument("--max-tokens", type=int, default=256)
    har.add_argument("--prompt-tokens", type=int, default=64, help="prompt words")
    har.add_argument("--tpot-ms", type=float, default=20.0, help="simulated ms per step")
    har.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")


def _paced_args(paced: argparse.ArgumentParser) -> None:
    paced.add_argument("--concurrency", "-c", type=int, default=scenarios.PACED_STREAMS)
    paced.add_argument("--duration", type=float, default=10.0, help="measured s per case")
    paced.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    paced.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")


def _cluster_args(clu: argparse.ArgumentParser) -> None:
    clu.add_argument("--concurrency", "-c", type=int, default=32)
    clu.add_argument("--duration", type=float, default=5.0, help="measured s per case")
    clu.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    clu.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="no progress line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _suite_args(sub.add_parser("suite", help="the whole suite (the default)", parents=[common]))
    _run_args(sub.add_parser("run", help="one custom load", parents=[common]))
    micro_parser = sub.add_parser("micro", help="in-process microbenchmarks")
    micro_parser.add_argument("--iterations", type=int, default=20_000)
    micro_parser.add_argument("--repeats", type=int, default=5)
    prof = sub.add_parser(
        "profile", help="py-spy profiles of core and edge under load", parents=[common]
    )
    _profile_args(prof)
    har = sub.add_parser(
        "harnesses", help="guidellm and aiperf beside our load generator, same load"
    )
    _harnesses_args(har)
    paced = sub.add_parser(
        "paced", help="node load: paced streams against Corvex and the paced ceilings",
        parents=[common],
    )  # fmt: skip
    _paced_args(paced)
    cap = sub.add_parser(
        "capacity", help="node capacity: highest tok/s, ITL p50 within 10%% of the step",
        parents=[common],
    )  # fmt: skip
    _capacity_args(cap)
    cap.add_argument("--grid", type=lambda t: tuple(int(x) for x in t.split(",")),
                     default=capacity.GRID, metavar="C1,C2,...",
                     help="concurrencies always measured (default 64,256,1024)")  # fmt: skip
    cap.add_argument("--max-search", type=int, default=capacity.MAX_SEARCH,
                     help="bisection probes after the grid")  # fmt: skip
    sub.add_parser(
        "stalls",
        help="another call's latency while one maximal request runs (issue 12's bound)",
    )
    soak = sub.add_parser("soak", help="RSS over a long run at a fraction of capacity",
                          parents=[common])  # fmt: skip
    _capacity_args(soak)
    soak.add_argument("--minutes", type=float, default=10.0, help="soaked, after the warm-up")
    soak.add_argument("--warmup-minutes", type=float, default=2.0,
                      help="of the same load first, outside the verdict")  # fmt: skip
    soak.add_argument("--fraction", type=float, default=0.75, help="of the capacity's streams")
    soak.add_argument("--streams", type=int, help="this many streams (skips the capacity)")
    clu = sub.add_parser(
        "cluster",
        help="1 core vs 2 cores vs the default; charges committed to PostgreSQL vs journaled",
        parents=[common],
    )
    _cluster_args(clu)
    rep = sub.add_parser("report", help="re-render latest.md, charts and README from JSON")
    rep.add_argument("--from", dest="source", type=Path, default=DEFAULT_OUT / "latest.json")
    _suite_args(rep)
    return parser


# ---- commands ------------------------------------------------------------------------------


def _workload(args: argparse.Namespace, keys: tuple[str, ...]) -> Workload:
    mix = parse_model_mix(args.model) if args.model else Workload().models
    return Workload(
        models=mix,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        stream=args.stream,
        ignore_eos=not args.no_ignore_eos,
        api_keys=tuple(args.api_key) or keys,
        seed=args.seed,
    )


def _spec(args: argparse.Namespace) -> LoadSpec:
    steady = args.steady and not args.rate
    answer_s = args.max_tokens.high * getattr(args, "tpot_ms", 0.0) / 1000
    ramp = args.ramp if args.ramp is not None else (answer_s if steady else 0.0)
    warmup = args.warmup or (max(1, args.concurrency // 2) if steady else 0)
    return LoadSpec(
        concurrency=args.concurrency,
        rate_rps=args.rate,
        requests=args.requests,
        duration_s=args.duration,
        warmup_requests=warmup,
        seed=args.seed,
        ramp_s=ramp,
        continuous=steady,
    )


def _slo(args: argparse.Namespace) -> Slo:
    return Slo(ttft_ms=args.slo_ttft_ms, itl_ms=args.slo_itl_ms, tpot_ms=args.slo_tpot_ms,
               e2e_ms=args.slo_e2e_ms)  # fmt: skip


@contextlib.contextmanager
def _system(args: argparse.Namespace) -> Iterator[System]:
    """The server named on the command line, or a Corvex stack started for the run."""
    if args.url or args.address:
        pids = dict(item.split("=", 1) for item in args.pid)
        yield System("external", {k: int(v) for k, v in pids.items()}, http_url=args.url,
                     grpc_address=args.address)  # fmt: skip
        return
    from benchmarks import systems

    if args.ceiling:
        with tempfile.TemporaryDirectory(prefix="corvex-ceiling-") as tmp:
            step_ms = args.tpot_ms if args.stream else 0.0
            start = systems.grpc_echo if args.ceiling == "grpc" else systems.skeleton
            with start(Path(tmp), step_ms=step_ms) as system:
                yield system
        return
    variant = CorvexVariant(metered=not args.unmetered, journal=args.journal,
                            tpot_ms=args.tpot_ms, batch_slowdown=args.batch_slowdown,
                            max_batch=max(256, args.concurrency), keys=args.keys)  # fmt: skip
    with systems.corvex("corvex", variant) as system:
        yield system


def _endpoint(args: argparse.Namespace, system: System) -> Endpoint:
    if args.ceiling == "grpc":
        return system.endpoint("grpc-stream" if args.stream else "grpc-unary")
    return system.endpoint("rest" if args.target == "edge" else "grpc")


def command_run(args: argparse.Namespace) -> int:
    from benchmarks import loadgen

    if args.ceiling == "grpc" and args.target != "grpc":
        raise SystemExit("--ceiling grpc is a gRPC server: add --target grpc")
    if args.ceiling == "skeleton" and args.target != "edge":
        raise SystemExit("--ceiling skeleton is an HTTP server: use --target edge")
    with _system(args) as system:
        result = loadgen.run(_endpoint(args, system), _workload(args, system.api_keys),
                             _spec(args), watch=system.processes, label=f"{args.target}",
                             progress=_progress(args), slo=_slo(args))  # fmt: skip
    print(format_result(result))
    if args.json:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=1))
    return 0 if result.ok else 1


def format_result(result: LoadResult) -> str:
    """A short human summary of one run."""
    lines = [
        f"{result.target}, {result.workload}, {result.mode} loop, concurrency "
        f"{result.concurrency}" + (f", {result.rate_rps:g} req/s offered" if result.rate_rps
                                   else ""),
        f"  requests   {result.ok} ok of {result.sent} sent in {result.duration_s:.2f} s; "
        f"errors {result.errors or 'none'}" + (f"; dropped {result.dropped}" if result.dropped
                                               else ""),
        f"  throughput {result.requests_per_s:,.1f} req/s, {result.output_tokens_per_s:,.0f} "
        f"output tok/s ({result.completion_tokens} tokens in {result.chunks} chunks)",
    ]  # fmt: skip
    if result.window_tokens:
        lines.append(f"  steady     rates and CPU of the {result.duration_s:.2f} s window: "
                     f"{result.window_tokens:,.0f} tokens arrived inside it")  # fmt: skip
    dists = (("e2e", result.e2e), ("ttft", result.ttft), ("itl", result.itl),
             ("tpot", result.tpot))  # fmt: skip
    for name, dist in dists:
        if dist.count:
            lines.append(f"  {name:10} p50 {dist.p50_ms:.3f}  p90 {dist.p90_ms:.3f}  "
                         f"p99 {dist.p99_ms:.3f}  max {dist.max_ms:.3f} ms")  # fmt: skip
    if result.goodput is not None:
        g = result.goodput
        lines.append(f"  goodput    {g.requests_per_s:,.1f} req/s, {g.output_tokens_per_s:,.0f} "
                     f"output tok/s: {g.good_requests} requests ({g.share:.1%}) met "
                     f"{g.slo.describe()}")  # fmt: skip
    for name, cpu in result.cpu.items():
        lines.append(f"  cpu {name:6} {cpu.cpu_s:.2f} s ({cpu.system_s:.2f} s system) = "
                     f"{cpu.per_request_us:,.0f} µs/request, "
                     f"{cpu.per_token_us:,.1f} µs/output token")  # fmt: skip
    lines += _memory_lines(result)
    lines.append(f"  load generator CPU {result.loadgen_cpu_s:.2f} s")
    return "\n".join(lines)


def _memory_lines(result: LoadResult) -> list[str]:
    trace = result.memory
    if trace is None:
        return []
    lines = []
    for name, before in trace.before_bytes.items():
        peak = trace.peak_bytes(name)
        per_k = memory.per_thousand_streams_mib(before, peak, result.concurrency)
        per = f", {per_k:,.1f} MiB per 1,000 concurrent requests" if result.mode == "closed" else ""
        lines.append(f"  rss {name:6} {before / memory.MIB:,.1f} MiB before → "
                     f"{peak / memory.MIB:,.1f} MiB peak during{per}")  # fmt: skip
    return lines


def command_micro(args: argparse.Namespace) -> int:
    result = micro.run(iterations=args.iterations, repeats=args.repeats)
    for name, value in result.ns_per_op.items():
        print(f"{name:40} {report.cell(value)} ns/op")
    print(f"{'simulated engine call (p50)':40} {result.engine_call.p50_ms * 1000:,.0f} µs")
    return 0


def command_profile(args: argparse.Namespace) -> int:
    from benchmarks import profiling

    variant = CorvexVariant(metered=not args.unmetered, journal=args.journal,
                            tpot_ms=args.tpot_ms)  # fmt: skip
    result, profiles = profiling.profile(args.target, _workload(args, ()), _spec(args), args.out,
                                         variant=variant, keep_raw=args.keep_raw)  # fmt: skip
    print(format_result(result))
    for condensed in profiles:
        print(profiling.render(condensed))
    print(f"profiles written to {args.out}")
    return 0


def _publish(args: argparse.Namespace, result: scenarios.SuiteResult) -> None:
    for path in report.write(result, args.out):
        print(f"wrote {path}", file=sys.stderr)
    if not args.no_readme and report.update_readme(args.readme, result):
        print(f"updated the results block of {args.readme}", file=sys.stderr)
    print(report.markdown(result))


def command_suite(args: argparse.Namespace) -> int:
    options = scenarios.SuiteOptions.make(
        quick=args.quick, repeats=args.repeats, peer=not args.no_peer, progress=_progress(args),
        capacity=not args.no_capacity,
    )  # fmt: skip
    _publish(args, scenarios.run_suite(options))  # fmt: skip
    return 0


def command_report(args: argparse.Namespace) -> int:
    _publish(args, report.load(args.source))
    return 0


def command_harnesses(args: argparse.Namespace) -> int:
    from benchmarks import harnesses

    load = harnesses.HarnessLoad(
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_words=args.prompt_tokens,
        max_tokens=args.max_tokens,
    )
    names = args.harness or ["guidellm", "aiperf"]
    with tempfile.TemporaryDirectory(prefix="corvex-harnesses-") as tmp:
        comparison = harnesses.compare(load, args.tpot_ms, names, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    encoded = msgspec.json.format(msgspec.json.encode(comparison), indent=1)
    (args.out / "harnesses.json").write_bytes(encoded + b"\n")
    table = harnesses.markdown(comparison)
    (args.out / "harnesses.md").write_text(table)
    print(table)
    return 0 if all(r.ok for r in comparison.reports) else 1


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(value), indent=1) + b"\n")
    print(f"wrote {path}", file=sys.stderr)


def command_paced(args: argparse.Namespace) -> int:
    from benchmarks.analysis import node_load

    options = msgspec.structs.replace(scenarios.SuiteOptions(), repeats=args.repeats,
                                      paced_s=args.duration, progress=_progress(args))  # fmt: skip
    results: dict[str, scenarios.CaseResult] = {}
    with tempfile.TemporaryDirectory(prefix="corvex-paced-") as tmp:
        scenarios.run_paced(options, Path(tmp), results, args.concurrency)
    runs = {name: r.runs for name, r in results.items()}
    derived = node_load(runs)
    _write_json(args.out / "paced.json", {"cases": results, "derived": derived})
    print(report.paced_markdown(results, derived))
    for index, (corvex, ceiling) in enumerate(zip(runs["paced.corvex"], runs["paced.skeleton"],
                                                  strict=False), 1):  # fmt: skip
        ratio = corvex.server_cpu_per_token_us / ceiling.server_cpu_per_token_us
        print(f"round {index}: Corvex {corvex.server_cpu_per_token_us:.1f} µs/token ÷ skeleton "
              f"{ceiling.server_cpu_per_token_us:.1f} = {ratio:.2f}×")  # fmt: skip
    return 0


def _settings(args: argparse.Namespace) -> capacity.Settings:
    return capacity.Settings(step_ms=args.tpot_ms, tokens=args.max_tokens,
                             duration_s=args.duration, progress=_progress(args))  # fmt: skip


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def command_capacity(args: argparse.Namespace) -> int:
    settings = msgspec.structs.replace(_settings(args), grid=args.grid,
                                       max_search=args.max_search)  # fmt: skip
    found = [capacity.measure_stack(shape, settings, _say) for shape in capacity.SHAPES]
    _write_json(args.out / "capacity.json", found)
    try:
        from benchmarks import charts
    except ImportError as exc:
        print(f"chart skipped ({exc}); install the bench extra", file=sys.stderr)
    else:
        print(f"wrote {charts.capacity_chart(found, args.out / 'capacity.png')}", file=sys.stderr)
    print(report.capacity_markdown(found))
    return 0


def command_soak(args: argparse.Namespace) -> int:
    from benchmarks import soak

    result = soak.run(minutes=args.minutes, fraction=args.fraction,
                      warmup_minutes=args.warmup_minutes, settings=_settings(args),
                      streams=args.streams, capacity_json=args.out / "capacity.json",
                      say=_say)  # fmt: skip
    _write_json(args.out / "soak.json", result)
    try:
        from benchmarks import charts
    except ImportError as exc:
        print(f"chart skipped ({exc}); install the bench extra", file=sys.stderr)
    else:
        print(f"wrote {charts.soak_chart(result, args.out / 'soak_rss.png')}", file=sys.stderr)
    print(soak.describe(result))
    return 0 if all(f.flat for f in result.flatness.values()) else 1


def command_cluster(args: argparse.Namespace) -> int:
    from benchmarks import cluster

    args.progress = _progress(args)
    return cluster.command(args)


def command_stalls(args: argparse.Namespace) -> int:
    from benchmarks import stalls

    print(stalls.report(stalls.run()))
    return 0


def _raise_open_files_limit() -> None:
    """Lifts the soft limit on open files to the hard one: 1,024 streams are 1,024 sockets in
    the load generator and as many in the edge it starts (which inherits the limit), past the
    1,024 many systems allow by default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str]) -> int:
    """Entry point of `python -m benchmarks` and `corvex bench`. The suite is the default."""
    _raise_open_files_limit()
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["suite", *argv]
    args = build_parser().parse_args(argv)
    handlers = {"suite": command_suite, "run": command_run, "micro": command_micro,
                "profile": command_profile, "report": command_report,
                "harnesses": command_harnesses, "paced": command_paced,
                "capacity": command_capacity, "soak": command_soak,
                "stalls": command_stalls, "cluster": command_cluster}  # fmt: skip
    return handlers[args.command](args)
