"""Checks a launch runs before starting any process: recipe, layout, data, batch shape. A bad
recipe fails here in a second with one line, not minutes later inside megatron-core."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from foe_train.config import ConfigError, RecipeConfig
from foe_train.data.loader import check_data
from foe_train.data.tokenizers import build_tokenizer
from foe_train.topology import check_layout, consecutive_nodes


def preflight(cfg: RecipeConfig, world_size: int, nodes: int = 1) -> None:
    """Raise ConfigError (one line naming the field) for anything that cannot run."""
    if nodes < 1 or world_size % nodes:
        raise ConfigError(f"--nodes {nodes} must divide the {world_size} processes")
    grid = check_layout(cfg.model, cfg.parallel, world_size, consecutive_nodes(world_size, nodes))
    check_data(cfg.data, cfg.model, build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path))
    t = cfg.training
    if t.distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError(
            "training.distributed_optimizer: megatron's DistributedOptimizer only wraps CUDA "
            "tensors; set it to false on a machine without GPUs"
        )
    shards = grid.token_shards
    if t.global_batch_size % (shards * t.micro_batch_size):
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by {shards} "
            f"token shards x training.micro_batch_size={t.micro_batch_size}; use a multiple of "
            f"{shards * t.micro_batch_size}"
        )
    if t.engine == "deepspeed":
        from foe_train.train.deepspeed_engine import deepspeed_config
        from foe_train.train.job import training_dtype

        deepspeed_config(cfg, shards, training_dtype(cfg) == torch.bfloat16)


# What a run writes into its run directory; any of them means another run's results are there.
RESULTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")


def prepare_run_dir(
    cfg: RecipeConfig, resume: str | None, overwrite: bool
) -> tuple[Path | None, list[str]]:
    """Make sure starting this run loses nothing: a fresh run may not write into a directory
    holding another run's results (their summary and metrics would be replaced, their
    checkpoints pruned by checkpoint.keep), and ``--resume`` must name a checkpoint this
    recipe can continue. ``overwrite`` moves such a directory aside (and says where), never
    deletes it. Returns the checkpoint to resume from (None: start fresh) and one warning per
    damaged checkpoint skipped on the way; raises ConfigError (one line) otherwise."""
    run_dir = cfg.logging.resolved_run_dir()
    if overwrite and resume:
        raise ConfigError("--overwrite starts the run over and --resume continues it; pass one")
    held = [name for name in RESULTS if (run_dir / name).exists()]
    if resume:
        from megatron.core import dist_checkpointing

        from foe_train.train.checkpoint import check_compatible, resume_target

        path, warnings = resume_target(run_dir, resume)
        if path is None:
            return None, []
        check_compatible(dist_checkpointing.load_common_state_dict(str(path)), cfg, path)
        if held and resume != "auto" and run_dir not in path.resolve().parents:
            raise ConfigError(
                f"logging.run_dir: {run_dir} holds another run's results ({', '.join(held)}); "
                f"to continue {path} in a new run, set another logging.name"
            )
        return path, warnings
    if not held:
        return None, []
    if not overwrite:
        raise ConfigError(
            f"logging.run_dir: {run_dir} holds another run's results ({', '.join(held)}); "
            f"continue it with --resume auto, start over with --overwrite (moves it aside), or "
            f"set another logging.name"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        aside, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}"), n + 1
    run_dir.rename(aside)
    print(f"foe-train: --overwrite: moved the previous run in {run_dir} to {aside}", flush=True)
    return None, []
