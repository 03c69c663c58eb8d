"""Validation loss during training: the same batches every time, so values compare across
steps, runs and topologies."""

from __future__ import annotations

import torch

from foe_train.runtime import all_reduce_values, device
from foe_train.train.job import Job
from foe_train.train.step import micro_loss


@torch.no_grad()
def evaluate(job: Job) -> float:
    """Mean loss over the first eval_iters validation batches, averaged over ranks (every
    token shard weighs the same)."""
    job.ddp.eval()
    total, count = torch.zeros((), device=device()), 0
    for i in range(job.cfg.training.eval_iters):
        for tokens in job.valid.micro_batches(i):
            total += micro_loss(job.ddp, tokens)
            count += 1
    job.ddp.train()
    return float(all_reduce_values(total / max(count, 1))[0]) / job.topo.world_size
