"""RMSNorm for megatron's local (CPU) layers, with a backward of five passes over the activations.

megatron's local spec builds ``torch.nn.RMSNorm`` (``WrappedTorchNorm``). On a CPU torch has no
fused RMSNorm, so it runs the decomposed op: five passes over the activations forward (square,
mean, scale, weight, with a copy each) and autograd differentiates it in about fifteen, most of
a norm's time in training. Here the forward takes three (one norm, two scalings) with or
without gradients, and the backward five. Every norm runs once per token a rank holds, and an
FoE rank holds its federation's C-fold tokens, so this weighs on FoE C times as much as on the
baseline (both members use this norm). The math and the parameters are torch's: same
``weight``, same checkpoints; elsewhere (CUDA, other dtypes) it is torch's own.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer import TransformerConfig


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension, in one pass over x."""
    rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow_(2).div_(x.shape[-1])
    return rstd.add_(eps).rsqrt_()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = _rstd(x, eps)
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        # y = x_hat * w with x_hat = x * rstd:
        # dx = rstd * (g*w - x_hat * mean(g*w * x_hat)), dw = sum over tokens of g * x_hat
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        grad_x = grad * weight
        dot = torch.linalg.vecdot(grad_x, x_hat).unsqueeze(-1).div_(-x.shape[-1])
        return grad_x.addcmul_(x_hat, dot).mul_(rstd), grad_weight, None


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built the way megatron's specs build a norm, differentiated by
    ``_RMSNorm`` for float32 CPU activations."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or x.dtype != torch.float32:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return (x * _rstd(x, self.eps)).mul_(self.weight)
