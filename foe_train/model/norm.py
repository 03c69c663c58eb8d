"""RMSNorm for megatron's local (CPU) layers, with a backward of five passes over the activations.

megatron's local spec builds ``torch.nn.RMSNorm`` (``WrappedTorchNorm``). On a CPU torch has no
fused RMSNorm, so it runs the decomposed op: five passes over the activations forward (square,
mean, scale, weight, with a copy each) and autograd differentiates it in about fifteen, most of
a norm's time in training. Here the forward takes three (one norm, two scalings) with or
without gradients, and the backward five. Every norm runs once per token a rank holds, and an
FoE rank holds its federation's C-fold tokens, so this weighs on FoE C times as much as on the
baseline (both members use this norm). The math and the parameters are torch's: same
``weight``, same checkpoints; elsewhere (CUDA, other dtypes) it is torch's own.

Where a norm feeds one linear layer whose output is narrower than its input, as an FoE
cluster's attention input feeds its QKV projection of 1/C of the heads, the two fuse the way
Transformer Engine's LayerNormLinear does (``NormColumnParallelLinear``).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension, in one pass over x (differentiable:
    the steps after the pass are on one value per token)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return (norm.square() / x.shape[-1] + eps).rsqrt()


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


class _NormLinear(torch.autograd.Function):
    """y = rstd(x) * (x (W * g)^T): an RMSNorm with weight g and a linear layer W without
    bias, whose normalised input is never materialised."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor,
                eps: float) -> torch.Tensor:
        rstd = _rstd(x, eps)
        scaled = weight * norm_weight
        y = torch.matmul(x, scaled.t()).mul_(rstd)
        ctx.save_for_backward(x, rstd, weight, norm_weight, scaled, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # z = x (W g)^T, y = rstd z, d rstd / dx = -rstd^3 x / d:
        # dx = (rstd dy) (W g) - x rstd^3 <dy, z> / d = dz (W g) - x rstd^2 <dy, y> / d
        x, rstd, weight, norm_weight, scaled, y = ctx.saved_tensors
        grad_z = grad * rstd
        dot = torch.linalg.vecdot(grad, y).unsqueeze(-1).mul_(rstd.square()).div_(-x.shape[-1])
        grad_x = torch.matmul(grad_z, scaled).addcmul_(x, dot)
        grad_scaled = grad_z.flatten(0, -2).t().matmul(x.flatten(0, -2))
        return grad_x, grad_scaled * norm_weight, (grad_scaled * weight).sum(0), None


class NormColumnParallelLinear(ColumnParallelLinear):
    """megatron's column-parallel linear layer fused with the RMSNorm before it, for float32
    CPU activations on one tensor-parallel rank: norm(x) W^T = rstd(x) * (x (W * g)^T), with g
    the norm's weight and rstd one value per token (``_NormLinear``). The normalised input
    [T, d] is never written; the output is scaled by rstd. Forward and backward pass over
    [T, d] once each besides the matmuls, where the norm alone takes three forward and five
    backward; the output's scaling costs a pass over the output instead, so it pays when the
    output is narrower than d: an FoE cluster's QKV projection has (H + 2G)/C heads' width.
    The norm stays its own module, with its weight under its own name (checkpoints
    unchanged), and is attached with ``fuse``; its owner then hands this layer the
    un-normalised input."""

    input_norm: RMSNorm | None = None

    def fuse(self, norm: RMSNorm) -> None:
        """Normalise this layer's input with ``norm`` (kept out of this module's parameters)."""
        if self.bias is not None or self.tp_group.size() != 1:
            raise ValueError("a norm fuses only into a linear layer without bias on one TP rank")
        object.__setattr__(self, "input_norm", norm)

    def forward(
        self, input_: torch.Tensor, weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        norm = self.input_norm
        if norm is None:
            return super().forward(input_, weight, runtime_gather_output)
        if input_.is_cuda or input_.dtype != torch.float32 or weight is not None:
            return super().forward(norm(input_), weight, runtime_gather_output)
        return _NormLinear.apply(input_, self.weight, norm.weight, norm.eps), None
