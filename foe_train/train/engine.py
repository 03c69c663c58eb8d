"""The optimizer side of a training job, behind one small interface so the step, evaluation
and checkpoints do not ask which engine runs: megatron-core's DDP and optimizer
(``training.engine: megatron``) or DeepSpeed ZeRO (``train/deepspeed_engine.py``). Job
building (``train/job.py``) is the one place that picks one."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Engine(Protocol):
    """What a step needs: gradients cleared, a backward pass per micro-batch, then the
    update (gradient reduction over FoE's groups, clipping, optimizer step); and what a
    checkpoint needs: the optimizer state for megatron's dist_checkpointing."""

    module: torch.nn.Module  # forward passes run through it
    optimizer: Any  # whose param_groups the LR schedule drives

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def update(self) -> tuple[bool, float]:
        """Reduce, clip and step; returns (step applied, gradient norm clipped to)."""
        ...

    def optimizer_state(self, model_state: dict[str, Any], loading: bool) -> Any: ...

    def load_optimizer_state(self, state: Any) -> None: ...


class MegatronEngine:
    """megatron-core's DDP (FoE's reduction groups, ``builder.wrap_ddp``) and optimizer."""

    def __init__(self, ddp: torch.nn.Module, optimizer: Any) -> None:
        self.module, self.optimizer = ddp, optimizer

    def zero_grad(self) -> None:
        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> tuple[bool, float]:
        self.module.finish_grad_sync()
        ok, grad_norm, _ = self.optimizer.step()
        return ok, float(grad_norm or 0.0)

    def optimizer_state(self, model_state: dict[str, Any], loading: bool) -> Any:
        # no chained_N prefixes: whether experts form their own optimizer depends on the
        # topology (megatron treats experts as dense at EP = 1), the saved keys must not
        return self.optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata={"chained_optim_avoid_prefix": True}
        )

    def load_optimizer_state(self, state: Any) -> None:
        self.optimizer.load_state_dict(state)
