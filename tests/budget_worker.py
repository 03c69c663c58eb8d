"""Under torchrun (gloo): build the real megatron-core model of each recipe given as JSON and
write its whole-model parameter count, so tests/test_budget.py can hold budget() to it. One
launch builds every recipe (one spawn, not one per model). Rank 0 writes a JSON list."""

import argparse
import json

import torch.distributed as dist

from foe_train.config import RecipeConfig
from foe_train.model.builder import build_model, count_parameters
from foe_train.runtime import init_distributed
from foe_train.topology import build_topology


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", required=True, help="JSON list of recipe mappings")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    init_distributed()
    counts = []
    for recipe in json.loads(args.recipes):
        cfg = RecipeConfig.model_validate(recipe)
        topo = build_topology(cfg.model, cfg.parallel)
        gpt = build_model(cfg.model, topo, seed=cfg.seed)
        counts.append(count_parameters(gpt, cfg.model, topo))
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(counts, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
