"""``python -m loadtest``: ``run`` a load, ``compare`` two results, run a ``scenario``; ``publish`` is internal.

    python -m loadtest run --target 127.0.0.1:50052 --mode open --rate 100 --duration 10 --k 10 \\
        --deadline-ms 200 --users-from ../shared/data --skew 1.0 --unknown-share 0.05 --out runs/lt
    python -m loadtest compare runs/a/results.json runs/b/results.json
    python -m loadtest curve --run before=runs/a-100 --run before=runs/a-300 --run after=runs/b-100 ... \
        --out docs/img/load_curve.png
    python -m loadtest scenario redis-kill --out runs/redis-kill
    python -m loadtest scenario retrieval-freeze --rate 200 --duration 12 --fault-at 3 --fault-s 3

Exit status 2 for a bad argument (the message names it), 1 when the target cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from loadtest.client import run_load
from loadtest.compare import compare, format_rows
from loadtest.config import MODES, RPCS, LoadConfig
from loadtest.curve import format_points, run_curve
from loadtest.output import save_run
from loadtest.publish import FeatureTarget, publish_tiny, republish
from recsys_contracts.signing import signer_for
from recsys_serving.env import MAX_WORKERS
from loadtest.results import format_summary, read_results
from loadtest.scenarios import SCENARIOS, SYNTHETIC_USERS, fault_row, run_and_save, shadow_ab_line

REPO_ROOT = Path(__file__).resolve().parent.parent
# A freshly started stack pays for first calls (lazy initialisation, connections): not the steady state.
SCENARIO_WARMUP_S = 3.0
SERVICE_PREFIXES = ("RECSYS_", "RETRIEVAL_", "RANKING_")


def data_dir() -> Path:
    """$RECSYS_DATA_DIR, else ../shared/data beside the repository (the project's convention)."""
    return Path(os.environ.get("RECSYS_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def _default_out(name: str) -> Path:
    return Path("runs") / "loadtest" / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def _load_options(parser: argparse.ArgumentParser, default_warmup_s: float) -> None:
    parser.add_argument("--rpc", choices=RPCS, default="recommend")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (open loop; a ramp's first step)")
    parser.add_argument("--k", type=int, default=10, help="Recommend's k")
    parser.add_argument("--num-candidates", type=int, default=100, help="Retrieve's num_candidates")
    parser.add_argument("--rank-items", type=int, default=100, help="item ids per Rank request")
    parser.add_argument("--deadline-ms", type=float, default=200.0, help="per-request deadline")
    parser.add_argument("--skew", type=float, default=1.0, help="Zipf exponent over users by activity; 0 = uniform")
    parser.add_argument("--unknown-share", type=float, default=0.05, help="share of never-seen users, in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p99-ms", type=float, default=50.0, help="ramp: the p99 a step must stay within")
    parser.add_argument("--ramp-step", type=float, default=50.0, help="ramp: requests/s added per step")
    parser.add_argument("--step-duration", type=float, default=5.0, help="ramp: seconds per step")
    parser.add_argument("--max-error-share", type=float, default=0.01, help="ramp: failed share a step may have")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--warmup", type=float, default=default_warmup_s, help="seconds of unrecorded load first")
    parser.add_argument("--out", type=Path, help="output directory (default runs/loadtest/<name>-<time>)")
    parser.add_argument("--retry", action="store_true",
                        help="retry UNAVAILABLE / RESOURCE_EXHAUSTED after the server's pushback, under a retry budget")
    parser.add_argument("--channels", type=int, default=1,
                        help="connections to the target, used in turn (a service's N worker processes share "
                             "connections, not calls: give several, the same number in runs compared)")
    parser.add_argument("--throttle", type=float, default=0.0, metavar="K",
                        help="client-side adaptive throttling with this K > 1 (recsys_serving.throttle): requests "
                             "rejected before they leave are counted as THROTTLED; 0 (default) sends every request")


def _config(args: argparse.Namespace, **fields) -> LoadConfig:
    return LoadConfig(rpc=args.rpc, rate=args.rate, k=args.k, num_candidates=args.num_candidates,
                      rank_items=args.rank_items, deadline_ms=args.deadline_ms, skew=args.skew,
                      unknown_share=args.unknown_share, seed=args.seed, p99_target_ms=args.p99_ms,
                      ramp_step=args.ramp_step, step_duration_s=args.step_duration,
                      max_error_share=args.max_error_share, max_requests=args.max_requests,
                      warmup_s=args.warmup, retry=args.retry, channels=args.channels,
                      throttle_k=args.throttle, **fields)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="drive load at a target and write results + plots")
    run.add_argument("--target", default="127.0.0.1:50052", help="gRPC host:port (loopback unless --allow-remote)")
    run.add_argument("--mode", choices=MODES, default="open")
    run.add_argument("--concurrency", type=int, default=8, help="closed loop: requests kept in flight")
    run.add_argument("--duration", type=float, default=10.0, help="seconds of load (a ramp's upper bound)")
    run.add_argument("--users-from", default=None, help="a data directory with ml-100k/u.data, or a user count")
    run.add_argument("--allow-remote", action="store_true", help="permit a non-loopback target")
    run.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the target")
    _load_options(run, default_warmup_s=0.0)

    cmp = commands.add_parser("compare", help="print b's figures as ratios of a's")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)

    curve = commands.add_parser("curve", help="plot latency and goodput against offered load, per variant")
    curve.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                       help="a saved run (its directory) and its variant's label; repeat for each run")
    curve.add_argument("--out", type=Path, required=True, help="the PNG (its table goes beside it as .json)")
    curve.add_argument("--title", default="")

    scenario = commands.add_parser("scenario", help="start a loopback stack, load it, inject a fault")
    scenario.add_argument("name", choices=sorted(SCENARIOS))
    scenario.add_argument("--data-dir", type=Path, default=None, help="the ml-100k folder (default: the data dir's)")
    scenario.add_argument("--synthetic", action="store_true", help="publish the tiny synthetic dataset instead")
    scenario.add_argument("--from-root", type=Path, default=None,
                          help="serve copies of this artifact root's current version (e.g. one `python -m trainer` "
                               "published) instead of tiny untrained models")
    scenario.add_argument("--duration", type=float, default=None, help="seconds of load (default: the scenario's)")
    scenario.add_argument("--fault-at", type=float, default=None, help="seconds into the load the fault starts")
    scenario.add_argument("--fault-s", type=float, default=None, help="how long a kill or freeze lasts (seconds)")
    scenario.add_argument("--ranking-workers", type=int, default=None, metavar="N",
                          help="RANKING_WORKERS: ranking worker processes behind its port (default: the service's, 1)")
    scenario.add_argument("--retrieval-workers", type=int, default=None, metavar="N",
                          help="RETRIEVAL_WORKERS: retrieval worker processes behind its port (default 1)")
    scenario.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE",
                          help="extra environment for both services, e.g. RANKING_DEFAULT_CANDIDATES=100 "
                               "(repeatable)")
    _load_options(scenario, default_warmup_s=SCENARIO_WARMUP_S)

    publish = commands.add_parser("publish", help="(internal) publish versions into an artifact root")
    publish.add_argument("--root", type=Path, required=True)
    publish.add_argument("--from-root", type=Path, default=None, help="republish this root's current version")
    publish.add_argument("--unsigned", action="store_true",
                         help="publish unsigned versions (default: signed with $RECSYS_SIGNING_KEY)")
    publish.add_argument("--data-dir", type=Path, default=None, help="the ml-100k folder; none = synthetic data")
    publish.add_argument("--count", type=int, default=1)
    publish.add_argument("--interval-s", type=float, default=0.0)
    publish.add_argument("--seed", type=int, default=0)
    publish.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    publish.add_argument("--redis-url", default=None, help="write each version's features here before it goes live")
    publish.add_argument("--redis-namespace", default="recsys", help="the services' Redis key namespace")
    return root


def _run(args: argparse.Namespace) -> int:
    users_from = args.users_from if args.users_from is not None else str(data_dir())
    config = _config(args, target=args.target, mode=args.mode, concurrency=args.concurrency,
                     duration_s=args.duration, users_from=users_from, allow_remote=args.allow_remote,
                     connect_timeout_s=args.connect_timeout)
    document, outcomes = asyncio.run(run_load(config))
    out = args.out or _default_out(args.mode)
    save_run(out, document, outcomes, f"{config.rpc} {config.mode} at {config.target}")
    print(format_summary(document["summary"]))
    if "ramp" in document:
        ramp = document["ramp"]
        for step in ramp["steps"]:
            print(f"  step {step['rate']:.0f}/s: p99={step['latency_ms']['p99']:.1f} ms failed={step['failed']} "
                  f"held={step['held']}")
        print(f"highest rate held at p99 <= {ramp['p99_target_ms']:g} ms: {ramp['highest_rate_held']}")
    print(f"{client_line(document)}; results in {out}")
    return 0


def client_line(document: dict) -> str:
    """The harness's own cost: its CPU, and its collector's longest pause during the load (a pause
    delays every request in flight, so one over the latencies reported would have shown in them)."""
    gc_ = document["client_gc"]
    return (f"client CPU {document['client_cpu_s']:.1f} s, its collector's longest pause "
            f"{gc_['longest_ms']:.1f} ms ({gc_['full_collections']} full of {gc_['collections']})")


def service_cpu_line(figures: dict) -> str:
    """CPU milliseconds per answered request by process over the load window, then by thread group
    within each service when the run recorded them (groups under 0.005 ms left out of the line, not
    out of the JSON: gRPC's timer and allocator threads, which barely run)."""
    per_ok = ", ".join(f"{name} {ms:.2f}" for name, ms in figures["cpu_ms_per_ok"].items() if ms is not None)
    total = figures["services_cpu_ms_per_ok"]
    line = (f"service CPU ms per OK answer: {per_ok}" +
            (f"; both services {total:.2f}" if total is not None else " (no OK answer)"))
    for service, groups in figures.get("threads_cpu_ms_per_ok", {}).items():
        shown = ", ".join(f"{group} {ms:.2f}" for group, ms in groups.items() if ms is not None and ms >= 0.005)
        if shown:
            line += f"\n  {service} by thread: {shown}"
    return line


def service_env(pairs: list[str]) -> dict[str, str]:
    """NAME=VALUE strings as a dict; the services themselves validate names and values at start-up."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith(SERVICE_PREFIXES):
            raise ValueError(f"service_env must be NAME=VALUE with NAME starting {', '.join(SERVICE_PREFIXES)}, "
                             f"got {pair!r}")
        env[name] = value
    return env


def workers_env(args: argparse.Namespace) -> dict[str, str]:
    """``--ranking-workers`` / ``--retrieval-workers`` as the services' settings; ValueError naming the
    flag for a value the services would refuse (before a stack is started)."""
    chosen = {"RANKING_WORKERS": ("--ranking-workers", args.ranking_workers),
              "RETRIEVAL_WORKERS": ("--retrieval-workers", args.retrieval_workers)}
    for flag, value in chosen.values():
        if value is not None and not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"{flag} must be an integer in [1, {MAX_WORKERS}], got {value!r}")
    return {name: str(value) for name, (_, value) in chosen.items() if value is not None}


def _scenario(args: argparse.Namespace) -> int:
    data = None if args.synthetic else (args.data_dir or data_dir() / "ml-100k")
    config = _config(args, users_from=SYNTHETIC_USERS if data is None else str(data))
    out = args.out or _default_out(f"scenario-{args.name}")
    document = run_and_save(args.name, config, data, out, source_root=args.from_root, seed=args.seed,
                            service_env={**service_env(args.service_env), **workers_env(args)},
                            lengths={"duration_s": args.duration, "fault_at_s": args.fault_at,
                                     "fault_s": args.fault_s})
    print(format_summary(document["summary"], f"{args.name} overall: "))
    for phase, summary in document.get("phases", {}).items():
        if summary is not None:
            print(format_summary(summary, f"{phase}: "))
    if "fault" in document:
        print("fault: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in document["fault"].items() if k != "windows"))
    if "recovery" in document:
        print(f"recovery after the fault's end: {document['recovery']['recovery_s']} s "
              f"(first 1 s window with p99 <= {document['recovery']['deadline_ms']:g} ms and nothing failed)")
        print("| scenario | req/s | requests | failed | p99 ms | p99 ms during | recovery |")
        print(fault_row(document))
    if "shadow_ab" in document:
        print(shadow_ab_line(document["shadow_ab"]))
    if "ramp" in document:
        print(f"highest rate held at p99 <= {document['ramp']['p99_target_ms']:g} ms: "
              f"{document['ramp']['highest_rate_held']}")
    print(service_cpu_line(document["service_cpu"]))
    print(f"{client_line(document)}; results in {out}")
    return 0


def _curve(args: argparse.Namespace) -> int:
    print(format_points(run_curve(args.run, args.out, args.title)))
    print(f"plot in {args.out}, table in {args.out.with_suffix('.json')}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    print(format_rows(compare(read_results(args.a), read_results(args.b))))
    return 0


def _publish(args: argparse.Namespace) -> int:
    if args.nice:
        os.nice(args.nice)
    features = None if args.redis_url is None else FeatureTarget(args.redis_url, args.redis_namespace)
    signer = signer_for(unsigned=args.unsigned)     # $RECSYS_SIGNING_KEY, as the trainer
    if args.from_root is not None:
        versions = republish(args.root, args.from_root, args.count, args.interval_s, features, signer=signer)
    else:
        versions = publish_tiny(args.root, args.data_dir, args.count, args.interval_s, args.seed, features,
                                signer=signer)
    print(f"published versions {versions} into {args.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {"run": _run, "compare": _compare, "curve": _curve, "scenario": _scenario, "publish": _publish}
    try:
        return handlers[args.command](args)
    except ValueError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
