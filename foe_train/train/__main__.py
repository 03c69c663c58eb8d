"""``torchrun ... -m foe_train.train --config PATH [--resume ...] [key=value ...]``: one
training rank. The entry point composes the run: recipe, process group, checks, and the
communication recorder around the first step when ``logging.comm_report`` asks for it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn

import torch.distributed as dist

from foe_train.bench.comm_run import record_step
from foe_train.config import ConfigError, load_config
from foe_train.runtime import init_distributed
from foe_train.train.loop import run
from foe_train.train.preflight import preflight, prepare_run_dir


def main(argv: list[str] | None = None) -> None:
    """A bad recipe, run directory or --resume ends every rank with exit 2 and one line on
    stderr from rank 0."""
    ap = argparse.ArgumentParser(prog="foe-train")
    ap.add_argument("--config")
    ap.add_argument("--resume", help="'auto' (newest intact checkpoint of this run), a run "
                                     "directory or an iter_N checkpoint directory")
    ap.add_argument("--overwrite", action="store_true",
                    help="move an existing run directory aside and start over")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("foe_train").setLevel(logging.INFO)

    def fail(msg: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {msg}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(2)

    if not args.config:
        fail("--config: required; pass a recipe, e.g. --config configs/quickstart/foe.yaml")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        fail(str(exc))
    init_distributed(cfg.training.collective_timeout_s)
    try:
        preflight(cfg, dist.get_world_size())
        # rank 0 checks the run directory and picks the checkpoint; every rank loads that one
        picked: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                target, warnings = prepare_run_dir(cfg, args.resume, args.overwrite)
                for line in warnings:
                    print(line, file=sys.stderr, flush=True)
                picked = [target]
            except ConfigError as exc:
                picked = [exc]
        dist.broadcast_object_list(picked, src=0)
        if isinstance(picked[0], ConfigError):
            raise picked[0]
        run(cfg, picked[0], record_step if cfg.logging.comm_report else None)
    except ConfigError as exc:
        fail(str(exc))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
