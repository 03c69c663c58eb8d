"""One torchrun launch (4 gloo ranks) for tests/test_deepspeed.py: every case of ``--cases``
(a JSON list of [name, recipe, overrides]) trained ``--steps`` steps by the megatron engine
and by DeepSpeed ZeRO-1 and ZeRO-2, in the same processes, recording each step's loss
(averaged over ranks) and the gradient norm each engine clipped to; then whole foe-train runs
as ``foe-train`` runs them (``train/__main__.py``): ``--reference`` (recipe and overrides)
uninterrupted, and ``--resume`` (the same) continued with ``--resume auto``. Rank 0 writes
the records to ``--out``."""

from __future__ import annotations

import argparse
import gc
import json

import torch.distributed as dist

from foe_train.config import load_config
from foe_train.runtime import all_reduce_values, init_distributed
from foe_train.train.job import build_job
from foe_train.train.loop import run
from foe_train.train.preflight import prepare_run_dir
from foe_train.train.step import train_step

ENGINES = {
    "megatron": [],
    "zero1": ["training.engine=deepspeed", "training.deepspeed.zero_stage=1"],
    "zero2": ["training.engine=deepspeed", "training.deepspeed.zero_stage=2"],
}


def trajectory(recipe: str, overrides: list[str], steps: int) -> dict[str, list[float]]:
    job = build_job(load_config(recipe, overrides))
    losses, norms = [], []
    for step in range(steps):
        result = train_step(job, step)
        losses.append(float(all_reduce_values(result.loss)[0]) / job.topo.world_size)
        norms.append(result.grad_norm)
    return {"loss": losses, "grad_norm": norms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reference", nargs="*", default=[],
                    help="recipe and overrides of a whole run")
    ap.add_argument("--resume", nargs="*", default=[],
                    help="recipe and overrides of a run to continue with --resume auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    init_distributed(600.0)
    records: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, recipe, overrides in json.loads(args.cases):
        records[name] = {}
        for engine, extra in ENGINES.items():
            records[name][engine] = trajectory(recipe, [*overrides, *extra], args.steps)
            gc.collect()
    if args.reference:
        run(load_config(args.reference[0], args.reference[1:]))
    if args.resume:
        cfg = load_config(args.resume[0], args.resume[1:])
        # as train/__main__.py: rank 0 picks the checkpoint, every rank loads it
        picked = [prepare_run_dir(cfg, "auto", False)[0] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(picked, src=0)
        run(cfg, picked[0])
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(records, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
