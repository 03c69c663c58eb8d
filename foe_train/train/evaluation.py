"""Validation loss: the same batches every time, so values compare across steps, runs and
topologies (training's periodic evaluation and foe-eval's ``val`` task alike)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from foe_train.data.loader import ShardedBatches
from foe_train.runtime import all_reduce_values, device
from foe_train.train.job import Job
from foe_train.train.step import micro_loss


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module, batches: ShardedBatches, iters: int,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> float:
    """Mean loss over the first ``iters`` batches, averaged over ranks (every token shard
    weighs the same); ``progress`` wraps the batch indices (e.g. in a progress bar)."""
    total, count = torch.zeros((), device=device()), 0
    for i in progress(range(iters)):
        for tokens in batches.micro_batches(i):
            total += micro_loss(model, tokens)
            count += 1
    return float(all_reduce_values(total / max(count, 1))[0]) / dist.get_world_size()


def evaluate(job: Job) -> float:
    """The validation loss of the model being trained, at training.eval_iters batches."""
    module = job.engine.module
    module.eval()
    loss = mean_loss(module, job.valid, job.cfg.training.eval_iters)
    module.train()
    return loss
