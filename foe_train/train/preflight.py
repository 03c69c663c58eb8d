"""Checks a launch runs before starting any process: recipe, layout, data, batch shape. A bad
recipe fails here in a second with one line, not minutes later inside megatron-core."""

from __future__ import annotations

import torch

from foe_train.config import ConfigError, RecipeConfig
from foe_train.data.loader import check_data
from foe_train.data.tokenizers import build_tokenizer
from foe_train.topology import check_layout


def preflight(cfg: RecipeConfig, world_size: int, nodes: int = 1) -> None:
    """Raise ConfigError (one line naming the field) for anything that cannot run."""
    if nodes < 1 or world_size % nodes:
        raise ConfigError(f"--nodes {nodes} must divide the {world_size} processes")
    per_node = world_size // nodes
    check_layout(cfg.model, cfg.parallel, world_size, [r // per_node for r in range(world_size)])
    check_data(cfg.data, cfg.model, build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path))
    p, t = cfg.parallel, cfg.training
    if t.distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError(
            "training.distributed_optimizer: megatron's DistributedOptimizer only wraps CUDA "
            "tensors; set it to false on a machine without GPUs"
        )
    shards = p.data * p.ranks_per_cluster if cfg.model.kind == "foe" else world_size
    if t.global_batch_size % (shards * t.micro_batch_size):
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by {shards} "
            f"token shards x training.micro_batch_size={t.micro_batch_size}; use a multiple of "
            f"{shards * t.micro_batch_size}"
        )
