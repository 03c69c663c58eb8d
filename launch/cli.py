"""foe-launch: the torchrun command of every node, or a SLURM batch script (written, printed or
submitted), for a recipe on a cluster. The placement of ranks on nodes is checked first: a
layout that cannot run is refused in one line on stderr (exit 2) before anything is written
or submitted, instead of minutes later on the cluster."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NoReturn

from foe_train.config import ConfigError, RecipeConfig, load_config
from launch.cluster import load_cluster, placement
from launch.slurm import BatchJob, render, submit

# The README's example; a recipe's D*C*L must fill nodes x GPUs (here 2 x 8 = 16).
EXAMPLE = """example (2 nodes of 8 H100s, the paper pair's 8 clusters twice over):
  foe-launch slurm --config configs/paper/foe.yaml --cluster configs/clusters/h100-8x.yaml \\
      --nodes 2 --dry-run parallel.data=2
  (--cluster or --venv says how the job finds foe-train; drop --dry-run to submit)"""


def _fail(msg: str, code: int = 2) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def torchrun_lines(
    cfg: RecipeConfig, config: str, overrides: list[str], nodes: int, gpus_per_node: int,
    master: str, port: int,
) -> list[str]:
    """The placement as comments, then each node's torchrun command (the same on every node:
    the c10d rendezvous gives out the node ranks)."""
    lines = [f"# {config} on {nodes} node{'s' if nodes > 1 else ''} x {gpus_per_node} GPUs",
             *[f"# {line}" for line in placement(cfg, nodes, gpus_per_node)]]
    cmd = ["torchrun", f"--nproc-per-node={gpus_per_node}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{port}",
                f"--rdzv-id=foe-{cfg.logging.name}"]
        lines.append(f"# the c10d rendezvous runs on {master}; start the first command there")
    cmd += ["-m", "foe_train.train", "--config", config, "--resume", "auto", *overrides]
    for node in range(nodes):
        lines += [f"# on node {node}:", shlex.join(cmd)]
    return lines


def _recipe_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", required=True, help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides (last)")


def main(argv: list[str] | None = None) -> None:
    """foe-launch torchrun|slurm --config PATH ... [key=value ...] (see --help)."""
    first_sentence = " ".join(__doc__.split(". ")[0].split()) + "."
    ap = argparse.ArgumentParser(
        prog="foe-launch", description=textwrap.fill(first_sentence),
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("torchrun", help="print the torchrun command of every node")
    _recipe_args(tr)
    tr.add_argument("--nodes", type=int, required=True)
    tr.add_argument("--gpus-per-node", type=int, required=True)
    tr.add_argument("--master", default=socket.gethostname(),
                    help="host of the rendezvous, the first node (default: this machine)")
    tr.add_argument("--port", type=int, default=29500)

    sl = sub.add_parser("slurm", help="write a SLURM batch script and submit it")
    _recipe_args(sl)
    sl.add_argument("--cluster", help="cluster description, e.g. configs/clusters/h100-8x.yaml")
    sl.add_argument("--nodes", type=int)
    sl.add_argument("--gpus-per-node", type=int)
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--time", help="[days-]HH:MM:SS")
    env = sl.add_mutually_exclusive_group()
    env.add_argument("--container-image", help="run in this image (pyxis/enroot)")
    env.add_argument("--venv", help="run with this virtualenv")
    sl.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    sl.add_argument("--output-dir", help="where to write the script (default: the run dir)")
    sl.add_argument("--workdir", default=os.getcwd(),
                    help="directory the job runs in, on the cluster's shared filesystem; "
                         "relative recipe paths are taken from there (default: here)")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.config, args.overrides)
        if args.cmd == "torchrun":
            if min(args.nodes, args.gpus_per_node) < 1:
                raise ConfigError("--nodes and --gpus-per-node must be at least 1")
            print("\n".join(torchrun_lines(cfg, args.config, args.overrides, args.nodes,
                                           args.gpus_per_node, args.master, args.port)))
            return
        cluster = load_cluster(
            args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            partition=args.partition, account=args.account, time=args.time,
            container_image=args.container_image,
            venv=os.path.abspath(args.venv) if args.venv else None,
        )
        lines = placement(cfg, cluster.nodes, cluster.gpus_per_node)
    except ConfigError as exc:
        _fail(str(exc))
    job = BatchJob(args.config, args.overrides, cfg, cluster, Path(os.path.abspath(args.workdir)),
                   lines)
    print("\n".join(lines), file=sys.stderr)
    out_dir = Path(args.output_dir) if args.output_dir else job.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / f"{job.name}.sbatch"
    script.write_text(render(job))
    print(f"wrote {script}", file=sys.stderr)
    if args.dry_run:
        print(script.read_text(), end="")
        return
    job.run_dir.mkdir(parents=True, exist_ok=True)  # sbatch --output needs it
    try:
        print(submit(script))
    except FileNotFoundError:
        _fail("sbatch: not found; run on a SLURM login node, or use --dry-run", 1)
    except subprocess.CalledProcessError as exc:
        _fail(f"sbatch refused {script}: {(exc.stderr.strip().splitlines() or ['?'])[-1]}", 1)


if __name__ == "__main__":
    main()
