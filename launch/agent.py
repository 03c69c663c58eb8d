"""One node's task in a multi-node job (what each SLURM task runs):

    python -m launch.agent --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT \\
        --rdzv-id ID -- <foe_train.train arguments>

starts this node's torchrun agent for ``-m foe_train.train`` and turns SIGUSR1 (SLURM's
warning before the time limit) or SIGTERM into SIGTERM for the training workers, which
checkpoint at the end of the step and exit 0.

Why not simply signal torchrun: srun delivers a forwarded signal to every process of the step,
and torchrun dies on a raw SIGUSR1 (default action), so torchrun runs with SIGUSR1 ignored.
And torchrun answers SIGTERM by exiting 1 even when its workers stop cleanly (and kills them
after a 30 s grace period, too short for a large checkpoint), so the stop goes to the
workers, torchrun's children; torchrun then exits 0 once they have, and any other exit code
is a real failure. Before the workers exist, the stop goes to torchrun itself.
"""

from __future__ import annotations

import argparse
import sys

from launch.torchrun import run_agents, torchrun_command


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.agent", description=__doc__.split("\n")[0])
    ap.add_argument("--nnodes", type=int, required=True)
    ap.add_argument("--nproc-per-node", type=int, required=True)
    ap.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of the rendezvous")
    ap.add_argument("--rdzv-id", required=True, help="unique per job run")
    ap.add_argument("train_args", nargs=argparse.REMAINDER,
                    help="-- then the arguments of foe_train.train")
    args = ap.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    command = torchrun_command("foe_train.train", train_args, args.nproc_per_node, args.nnodes,
                               args.rdzv_endpoint, args.rdzv_id)
    sys.exit(run_agents([command]))


if __name__ == "__main__":
    main()
