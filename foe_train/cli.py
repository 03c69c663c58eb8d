"""The foe-* command-line entry points. Bad input ends in one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from foe_train.arguments import OneLineParser, at_least, fail, link_rate
from foe_train.config import ConfigError, RecipeConfig, load_config


def bench_main(argv: list[str] | None = None) -> None:
    """foe-bench comm --config PATH --nproc N [--nodes M] [--backward] [key=value ...]
    foe-bench latency --pair A.yaml B.yaml | --checkpoints RUN_A RUN_B --nproc N [--nodes M]
                      [--link-rate RATE] ...
    foe-bench train --pair FOE.yaml MOE.yaml --nproc N [--nodes M] [--steps S] ...
    foe-bench project --pair A.yaml B.yaml --cluster HW.yaml --nodes 1 4 ... (see --help)"""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["project"]:
        from foe_train.bench.projection import project_main

        project_main(argv[1:])
        return
    ap = OneLineParser(prog="foe-bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    comm = sub.add_parser("comm", help="count collective bytes of one step vs DESIGN §3")
    comm.add_argument("--config", required=True)
    comm.add_argument("--nproc", type=at_least(1), required=True)
    comm.add_argument("--nodes", type=at_least(1), default=1)
    comm.add_argument("--backward", action="store_true")
    comm.add_argument("--micro-batch", type=at_least(1), default=1)
    comm.add_argument("--out", help="also write the JSON report here")
    comm.add_argument("--json", action="store_true", help="print the JSON report")
    comm.add_argument("--baseline", metavar="MOE.yaml",
                      help="also count this MoE recipe and compare cross-node bytes per token")
    comm.add_argument("--baseline-out", metavar="PATH",
                      help="also write the baseline's JSON report here (with --baseline)")
    comm.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    lat = sub.add_parser("latency", help="forward latency, TTFT, TBT of a recipe pair")
    weights = lat.add_mutually_exclusive_group(required=True)
    weights.add_argument("--pair", nargs=2, metavar=("A.yaml", "B.yaml"),
                         help="recipes, random weights")
    weights.add_argument("--checkpoints", nargs=2, metavar=("RUN_A", "RUN_B"),
                         help="foe-train runs (or iter_N directories): trained weights and "
                              "their own recipes; overrides may change only parallel.*")
    lat.add_argument("--nproc", type=at_least(1), required=True)
    lat.add_argument("--nodes", type=at_least(1), default=1)
    lat.add_argument("--link-rate", type=link_rate,
                     help="emulate nodes in network namespaces, e.g. 1gbit")
    lat.add_argument("--batch", nargs="+", type=at_least(1), default=[4])
    lat.add_argument("--prompt-len", nargs="+", type=at_least(1), default=[64])
    lat.add_argument("--gen-len", type=at_least(2), default=8,
                     help="tokens per request: the prefill's and at least one decode step")
    lat.add_argument("--reps", type=at_least(1), default=3)
    lat.add_argument("--json", action="store_true")
    lat.add_argument("--out", help="also write the JSON report here")
    lat.add_argument("overrides", nargs="*", help="dotted key=value overrides for both")
    tr = sub.add_parser("train", help="training tokens/s of a FoE/MoE pair, with op profiles")
    tr.add_argument("--pair", nargs=2, required=True, metavar=("A.yaml", "B.yaml"))
    tr.add_argument("--nproc", type=at_least(1), required=True)
    tr.add_argument("--nodes", type=at_least(1), default=1)
    tr.add_argument("--link-rate", type=link_rate,
                    help="emulate nodes in network namespaces, e.g. 1gbit")
    tr.add_argument("--steps", type=at_least(1), default=20, help="timed steps of each member")
    tr.add_argument("--warmup", type=at_least(0), default=3,
                    help="untimed steps of each member first")
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--out", help="also write the JSON report here")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides for both")
    args = ap.parse_args(argv)
    if args.cmd == "latency":
        _latency(args)
        return
    if args.cmd == "train":
        _train_bench(args)
        return

    from foe_train.topology import check_layout, consecutive_nodes

    try:
        cfg = load_config(args.config, args.overrides)
        if args.nproc % args.nodes:
            raise ConfigError(f"--nodes {args.nodes} must divide --nproc {args.nproc}")
        node_of_rank = consecutive_nodes(args.nproc, args.nodes)
        check_layout(cfg.model, cfg.parallel, args.nproc, node_of_rank)
        if args.baseline_out and not args.baseline:
            raise ConfigError("--baseline-out: needs --baseline MOE.yaml to count")
        if args.baseline:
            base = load_config(args.baseline, args.overrides)
            if (cfg.model.kind, base.model.kind) != ("foe", "moe"):
                raise ConfigError("--baseline: give the FoE recipe as --config and the MoE "
                                  "recipe as --baseline")
            check_layout(base.model, base.parallel, args.nproc, node_of_rank)
    except ConfigError as exc:
        fail(str(exc))
    sys.exit(_comm(args, cfg))


def _comm(args: argparse.Namespace, cfg: RecipeConfig) -> int:
    import json
    import tempfile

    from foe_train.bench.comm_run import compare_line
    from launch.torchrun import run_local

    def count(config: str, out: str) -> int:
        worker = ["--config", config, "--micro-batch", str(args.micro_batch), "--out", out]
        worker += ["--backward"] if args.backward else []
        worker += ["--json"] if args.json else []
        return run_local("foe_train.bench.comm_run", worker + args.overrides, args.nproc,
                         args.nodes)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or f"{tmp}/report.json"
        code = count(args.config, out)
        if code or not args.baseline:
            return code
        baseline_out = args.baseline_out or f"{tmp}/baseline.json"
        code = count(args.baseline, baseline_out)
        if code == 0:
            reports = [json.loads(Path(p).read_text()) for p in (out, baseline_out)]
            print(compare_line(*reports, cfg.model.moe_router_topk))
        return code



def _latency(args: argparse.Namespace) -> None:
    from foe_train.bench.latency import member_config
    from foe_train.topology import check_layout, consecutive_nodes

    try:
        if args.nproc % args.nodes:
            raise ConfigError(f"--nodes {args.nodes} must divide --nproc {args.nproc}")
        node_of_rank = consecutive_nodes(args.nproc, args.nodes)
        trained = args.checkpoints is not None
        for path in args.checkpoints or args.pair:
            cfg, _ = member_config(path, args.overrides, trained)
            shards = check_layout(cfg.model, cfg.parallel, args.nproc, node_of_rank).token_shards
            for batch in args.batch:
                if batch % shards:
                    raise ConfigError(f"--batch {batch}: not divisible by the {shards} token "
                                      f"shards of {path}; use a multiple of {shards}")
            if max(args.prompt_len) + args.gen_len > cfg.model.seq_length:
                raise ConfigError(f"--prompt-len + --gen-len exceed model.seq_length="
                                  f"{cfg.model.seq_length} of {path}; shorten them")
    except ConfigError as exc:
        fail(str(exc))
    source = ["--checkpoints", *args.checkpoints] if trained else ["--pair", *args.pair]
    worker = [*source, "--batch", *map(str, args.batch), "--prompt-len",
              *map(str, args.prompt_len), "--gen-len", str(args.gen_len), "--reps",
              str(args.reps)]
    worker += ["--json"] if args.json else []
    worker += ["--out", args.out] if args.out else []
    worker += args.overrides
    if args.link_rate:
        from launch.netns import NetnsError, run_emulated

        try:
            code = run_emulated("foe_train.bench.latency", worker, args.nproc, args.nodes,
                                args.link_rate)
        except NetnsError as exc:
            fail(str(exc))
        sys.exit(code)
    from launch.torchrun import run_local

    sys.exit(run_local("foe_train.bench.latency", worker, args.nproc, args.nodes))


def _train_bench(args: argparse.Namespace) -> None:
    """foe-bench train: refuse a bad pair or layout in one line before any process starts
    (preflight, as foe-train does), then launch the worker like foe-bench latency."""
    from foe_train.train.preflight import preflight

    try:
        cfgs = [load_config(path, args.overrides) for path in args.pair]
        if sorted(cfg.model.kind for cfg in cfgs) != ["foe", "moe"]:
            raise ConfigError(f"--pair: {' and '.join(args.pair)} are model.kind "
                              f"{' and '.join(c.model.kind for c in cfgs)}; pass one foe and "
                              f"one moe recipe")
        for cfg in cfgs:
            preflight(cfg, args.nproc, args.nodes)
    except ConfigError as exc:
        fail(str(exc))
    worker = ["--pair", *args.pair, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    worker += ["--json"] if args.json else []
    worker += ["--out", args.out] if args.out else []
    worker += args.overrides
    # kineto's stage and start/stop lines from every rank would bury the report; 6 is above
    # its highest level (a profiler failure still raises in Python)
    env = {"KINETO_LOG_LEVEL": os.environ.get("KINETO_LOG_LEVEL", "6")}
    if args.link_rate:
        from launch.netns import NetnsError, run_emulated

        try:
            code = run_emulated("foe_train.bench.train_bench", worker, args.nproc, args.nodes,
                                args.link_rate, env=env)
        except NetnsError as exc:
            fail(str(exc))
        sys.exit(code)
    from launch.torchrun import run_local

    sys.exit(run_local("foe_train.bench.train_bench", worker, args.nproc, args.nodes, env=env))


def train_main(argv: list[str] | None = None) -> None:
    """foe-train --config PATH [--nproc N [--nodes M]] [--resume auto|RUN_DIR|CKPT]
    [--overwrite] [key=value ...]

    Under torchrun (LOCAL_RANK set) this process trains; with --nproc it starts torchrun
    itself for a run on this machine, after checking the recipe, the run directory and the
    checkpoint to resume from, so those errors come before any worker starts."""
    ap = OneLineParser(prog="foe-train", description="train an FoE or MoE recipe")
    ap.add_argument("--config", help="recipe YAML (required)")
    ap.add_argument("--nproc", type=at_least(1), help="start N processes on this machine")
    ap.add_argument("--nodes", type=at_least(1), default=1,
                    help="as M emulated nodes (c10d on loopback)")
    ap.add_argument("--resume", help="'auto': this run's newest intact checkpoint (none: start "
                                     "fresh); a run directory; or an iter_N checkpoint")
    ap.add_argument("--overwrite", action="store_true",
                    help="the run directory holds an earlier run: move it aside, start over")
    ap.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    args = ap.parse_args(argv)
    if not args.config:
        fail("--config: required; pass a recipe, e.g. --config configs/quickstart/foe.yaml")
    from foe_train.train.preflight import preflight, prepare_run_dir

    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, world, args.nodes)
        if args.nproc is not None:
            prepare_run_dir(cfg, args.resume, args.overwrite)
    except ConfigError as exc:
        fail(str(exc))
    worker = ["--config", args.config]
    worker += ["--resume", args.resume] if args.resume else []
    if args.nproc is None:
        if "LOCAL_RANK" not in os.environ:
            fail("--nproc: not under torchrun; pass --nproc N to start N processes here")
        from foe_train.train.__main__ import main

        main(worker + (["--overwrite"] if args.overwrite else []) + args.overrides)
        return
    from launch.torchrun import run_local

    sys.exit(run_local("foe_train.train", worker + args.overrides, args.nproc, args.nodes))


def compare_main(argv: list[str] | None = None) -> None:
    """foe-compare RUN_DIR [RUN_DIR ...] [--out DIR] [--baseline NAME] [--bench JSON ...]:
    the runs' summaries side by side; with --out the whole comparison report (report.md,
    report.json, PNG plots; foe_train/report.py)."""
    from foe_train.report import side_by_side, write_report

    ap = OneLineParser(prog="foe-compare", description="compare finished runs")
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", help="write report.md, report.json and PNG plots here")
    ap.add_argument("--baseline", help="member (logging.name) the gaps are taken against "
                                       "(default: the one MoE member)")
    ap.add_argument("--bench", nargs="+", default=[], metavar="JSON",
                    help="foe-bench latency reports (--out files) to add latency ratios from")
    args = ap.parse_args(argv)
    try:
        print(side_by_side(args.run_dirs))
        if args.out:
            write_report([Path(d) for d in args.run_dirs], Path(args.out), args.baseline,
                         args.bench)
            print(f"foe-compare: report {Path(args.out) / 'report.md'}")
    except ConfigError as exc:
        fail(str(exc))


def budget_main(argv: list[str] | None = None) -> None:
    """foe-budget A.yaml B.yaml [--set-a key=value]... [--set-b key=value]...

    Checks that two recipes are an identical-budget pair (docs/design.md §1) before anyone
    compares their results: prints both budgets side by side, exits 0 when every number is
    equal (FoE's per-cluster norms excepted), 1 naming the fields that differ, 2 with one line
    on stderr when a recipe is bad."""
    ap = OneLineParser(
        prog="foe-budget", description="compare the training budgets of two recipes"
    )
    ap.add_argument("a", help="first recipe (YAML)")
    ap.add_argument("b", help="second recipe (YAML)")
    ap.add_argument("--set-a", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override for the first recipe (repeatable)")
    ap.add_argument("--set-b", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override for the second recipe (repeatable)")
    args = ap.parse_args(argv)

    from foe_train.budget import budget, compare, format_side_by_side

    try:
        a = budget(load_config(args.a, args.set_a))
        b = budget(load_config(args.b, args.set_b))
    except ConfigError as exc:
        fail(str(exc))
    mismatches = compare(a, b)
    print(format_side_by_side(args.a, a, args.b, b, mismatches))
    if mismatches:
        print(f"not an identical-budget pair: {', '.join(mismatches)} differ")
        sys.exit(1)
    print("identical-budget pair (every number equal, FoE's per-cluster norm params excepted)")
    sys.exit(0)


if __name__ == "__main__":
    bench_main()
