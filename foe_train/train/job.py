"""Everything a training step needs, built the same way on every rank: recipe -> topology ->
data -> model -> engine (megatron DDP and optimizer, or DeepSpeed ZeRO) and LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from foe_train.config import RecipeConfig
from foe_train.data.loader import ShardedBatches, build_datasets
from foe_train.data.tokenizers import build_tokenizer
from foe_train.model.builder import build_model, wrap_ddp
from foe_train.topology import Topology, build_topology
from foe_train.train.engine import Engine, MegatronEngine


@dataclass
class Job:
    cfg: RecipeConfig
    topo: Topology
    model: torch.nn.Module
    engine: Engine  # forward passes run through engine.module (megatron DDP or DeepSpeed)
    scheduler: OptimizerParamScheduler
    train: ShardedBatches
    valid: ShardedBatches | None
    run_dir: Path
    dtype: torch.dtype


def training_dtype(cfg: RecipeConfig) -> torch.dtype:
    """bf16 on GPUs unless the recipe says otherwise (fp32 main weights and gradient reduction
    either way), fp32 on CPU."""
    bf16 = cfg.training.bf16 if cfg.training.bf16 is not None else torch.cuda.is_available()
    return torch.bfloat16 if bf16 else torch.float32


def build_job(cfg: RecipeConfig) -> Job:
    """The job of this rank; the process group must be initialised."""
    topo = build_topology(cfg.model, cfg.parallel)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    train_ds, valid_ds, _ = build_datasets(cfg.data, cfg.model, cfg.training, tokenizer, cfg.seed)
    dtype = training_dtype(cfg)
    model = build_model(cfg.model, topo, seed=cfg.seed, dtype=dtype,
                        recompute=cfg.training.recompute)
    engine = build_engine(model, cfg, topo, dtype)
    scheduler = lr_scheduler(engine.optimizer, cfg)
    t = cfg.training
    shards = (t.global_batch_size, t.micro_batch_size, topo.token_shards, topo.token_shard)
    train = ShardedBatches(train_ds, *shards)
    valid = ShardedBatches(valid_ds, *shards) if valid_ds is not None and len(valid_ds) else None
    return Job(cfg, topo, model, engine, scheduler, train, valid,
               cfg.logging.resolved_run_dir(), dtype)


def build_engine(
    model: torch.nn.Module, cfg: RecipeConfig, topo: Topology, dtype: torch.dtype
) -> Engine:
    """The one place that picks the engine (``training.engine``); the step, evaluation and
    checkpoints only use the Engine interface."""
    if cfg.training.engine == "deepspeed":
        from foe_train.train.deepspeed_engine import build_deepspeed

        return build_deepspeed(model, cfg, topo, dtype)
    ddp = wrap_ddp(model, topo, cfg.training.distributed_optimizer)
    return MegatronEngine(ddp, megatron_optimizer(ddp, cfg, topo, dtype))


def build_optimizer(
    ddp: torch.nn.Module, cfg: RecipeConfig, topo: Topology, dtype: torch.dtype
) -> tuple[Any, OptimizerParamScheduler]:
    """megatron's optimizer (``megatron_optimizer``) and its warmup + decay schedule."""
    optimizer = megatron_optimizer(ddp, cfg, topo, dtype)
    return optimizer, lr_scheduler(optimizer, cfg)


def megatron_optimizer(
    ddp: torch.nn.Module, cfg: RecipeConfig, topo: Topology, dtype: torch.dtype
) -> Any:
    """megatron's Adam (dense and expert parts chained) with FoE-correct gradient-norm
    groups."""
    t = cfg.training
    topo.mark_shared_duplicates(ddp.module)
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
            bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=t.distributed_optimizer,
        ),
        [ddp],
        use_gloo_process_groups=False,
        pg_collection=topo.optimizer_pg_collection(),
    )


def lr_scheduler(optimizer: Any, cfg: RecipeConfig) -> OptimizerParamScheduler:
    """megatron's warmup + decay schedule of the recipe, driving ``optimizer.param_groups``
    (their ``wd_mult`` keeps weight decay off norms and biases) for either engine."""
    t = cfg.training
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=t.train_iters, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
