"""The foe-* command-line entry points. Bad input ends in one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys

from foe_train.config import ConfigError, load_config


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def bench_main(argv: list[str] | None = None) -> None:
    """foe-bench comm --config PATH --nproc N [--nodes M] [--backward] [key=value ...]"""
    ap = argparse.ArgumentParser(prog="foe-bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    comm = sub.add_parser("comm", help="count collective bytes of one step vs DESIGN §3")
    comm.add_argument("--config", required=True)
    comm.add_argument("--nproc", type=int, required=True)
    comm.add_argument("--nodes", type=int, default=1)
    comm.add_argument("--backward", action="store_true")
    comm.add_argument("--micro-batch", type=int, default=1)
    comm.add_argument("--out", help="also write the JSON report here")
    comm.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    args = ap.parse_args(argv)

    from foe_train.topology import check_layout

    try:
        cfg = load_config(args.config, args.overrides)
        if args.nodes < 1 or args.nproc % args.nodes:
            raise ConfigError(f"--nodes {args.nodes} must divide --nproc {args.nproc}")
        per_node = args.nproc // args.nodes
        check_layout(cfg.model, cfg.parallel, args.nproc,
                     [r // per_node for r in range(args.nproc)])
    except ConfigError as exc:
        _fail(str(exc))
    from launch.torchrun import run_local

    worker = ["--config", args.config, "--micro-batch", str(args.micro_batch)]
    worker += ["--backward"] if args.backward else []
    worker += ["--out", args.out] if args.out else []
    sys.exit(run_local("foe_train.bench.comm_run", worker + args.overrides, args.nproc, args.nodes))


if __name__ == "__main__":
    bench_main()
