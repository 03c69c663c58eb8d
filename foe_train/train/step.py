"""One training step (gradient accumulation over micro-batches, the job's engine) and the
metrics of the steps, kept on the device until the logging interval reads them: no host
synchronisation per micro-batch or per step, one all-reduce per logged row."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from foe_train.model import head
from foe_train.runtime import all_reduce_values, device
from foe_train.train.job import Job


def micro_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one micro-batch [b, s+1], computed in float32."""
    tokens = tokens.to(device(), non_blocking=True)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
    logits = model(inputs, position, None)
    return head.cross_entropy(logits.float(), labels, head.head_group(model)).mean()


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches, on the device
    grad_norm: float
    skipped: bool


def train_step(job: Job, step: int) -> StepResult:
    engine = job.engine
    engine.zero_grad()
    micro = job.train.micro_batches(step)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(micro), device=device()))
    total = torch.zeros((), device=device())
    for tokens in micro:
        loss = micro_loss(engine.module, tokens) / len(micro)
        engine.backward(loss)
        total += loss.detach()
    ok, grad_norm = engine.update()
    job.scheduler.step(increment=1)
    return StepResult(total, grad_norm, not ok)


class ExpertLoad:
    """Tokens routed to each expert in training forwards, summed on the device by forward
    hooks on the routers until ``ratios`` reads them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if name.endswith("mlp.router"):
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module: torch.nn.Module, inputs: object, output: tuple) -> None:
            if module.training:
                counts = output[1].detach().sum(0).float()
                self.counts[name] = self.counts.get(name, 0) + counts
        return record

    def ratio(self) -> torch.Tensor:
        """max/mean tokens per expert (1.0 = even), averaged over this rank's MoE layers;
        the counts start again."""
        ratios = [c.max() / c.mean().clamp_min(1e-9) for c in self.counts.values()]
        self.counts.clear()
        return torch.stack(ratios).mean() if ratios else torch.ones((), device=device())


class Meters:
    """The metrics of the steps since the last row: the last step's loss, expert load per
    cluster and megatron's aux losses (both summed over the interval), training tokens/s
    (wall time of the interval without evaluation and checkpointing). ``read`` makes the one
    all-reduce and host read of the interval."""

    def __init__(self, job: Job) -> None:
        cfg = job.cfg
        self.topo = job.topo
        self.micro_batches = job.train.accumulation_steps
        self.moe_layers = sum(cfg.model.layer_is_moe(i) for i in range(cfg.model.num_layers))
        self.tokens_per_step = cfg.training.global_batch_size * cfg.model.seq_length
        self.load = ExpertLoad(job.model)
        self.steps, self.last, self.paused_s = 0, None, 0.0
        self.since = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.last = result

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) is not training time."""
        start = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - start

    def read(self) -> dict[str, float]:
        """The row of the interval, identical on every rank; the interval starts again."""
        topo, world = self.topo, self.topo.world_size
        tracker = get_moe_layer_wise_logging_tracker()
        names = sorted(tracker)
        per_layer = max(self.steps * self.micro_batches * self.moe_layers, 1)
        means = [self.last.loss.float().reshape(()),
                 *(tracker[n]["values"].sum().float().to(device()) / per_layer for n in names)]
        load = torch.zeros(world, 2, device=device())
        load[topo.rank] = torch.stack([torch.tensor(float(topo.cluster), device=device()),
                                       self.load.ratio()])
        summed = all_reduce_values(torch.cat([torch.stack(means), load.flatten()]))
        values = summed.tolist()
        elapsed = time.perf_counter() - self.since - self.paused_s
        row = {"loss": values[0] / world, "grad_norm": self.last.grad_norm,
               "skipped": float(self.last.skipped),
               "tokens_per_s": self.steps * self.tokens_per_step / elapsed}
        row.update({f"aux/{n}": v / world for n, v in zip(names, values[1:len(means)],
                                                         strict=True)})
        by_cluster: dict[int, list[float]] = {}
        pairs = values[len(means):]
        for cluster, ratio in zip(pairs[::2], pairs[1::2], strict=True):
            by_cluster.setdefault(int(cluster), []).append(ratio)
        row.update({f"expert_load_imbalance/cluster{c}": sum(v) / len(v)
                    for c, v in sorted(by_cluster.items())})
        clear_aux_losses_tracker()
        self.steps, self.paused_s, self.since = 0, 0.0, time.perf_counter()
        return row
