"""The federated sum: how an FoE federation's C clusters add up their contributions.

Flat: one all-reduce over the C members. Two-level, when several members share a node and the
federation spans nodes: reduce-scatter inside the node, all-reduce each 1/m slice across nodes
among the members with the same local index, all-gather inside the node. Each node then sends
2(N-1)/N of the summed tensor across nodes instead of the flat ring's 2(C-1)/C, and the
m members of a node share that traffic. It takes three calls instead of one, so a sum smaller
than ``two_level_min_bytes`` (parallel.two_level_min_bytes: a decode step's) stays flat.

A sum can also be started and waited for later (``start_sum``): it then runs on the
federation's sending thread while the caller computes, which is how an inference layer hides
one half of its batch's sum behind the other half's work (``model.layer``).

Autograd keeps the replicated residual's gradient in shares: each cluster holds its own
share of it (what its cluster-local work contributes), and the true gradient is their sum over
the federation. Cluster-local uses of the residual then need no communication in backward; a
federated sum adds the shares up once, where the true gradient is needed: for the summed
contributions (``federated_sum``: forward sum, backward sum). Two boundaries turn shares into
the true gradient: the embedding (``model.head``: it sums the shares over the federation, of
the tokens' gradient or of its table's, whichever is smaller) and the head, whose input's
gradient shares (one per cluster's vocabulary rows) are summed too (``model.head``); the
model's last sum (``final_federated_sum``) therefore receives the true gradient and passes it
on as is. One backward sum per layer instead of megatron's pair (a backward sum at every entry
into cluster work, two per layer).

The layers add the residual inside the sum: the federation's ``first`` member adds it to its
term, so a sum's result is the next residual and no member adds it afterwards. In backward the
residual then receives the true gradient on the first member and nothing on the others, which
is again a split into shares.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renames these two (``*_single``); the old names work on every torch we support,
# and megatron-core and the communication recorder use them too
for _name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
    warnings.filterwarnings("ignore", message=f".*{_name}.* is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class Federation:
    """The groups of this rank's federation: ``group`` (all members), and for the two-level
    sum ``local`` (members on this node) and ``cross`` (one member per node)."""

    group: dist.ProcessGroup
    local: dist.ProcessGroup | None = None
    cross: dist.ProcessGroup | None = None
    two_level_min_bytes: int = 0
    overlap_min_bytes: int | None = None

    @property
    def two_level(self) -> bool:
        return self.local is not None

    @cached_property
    def first(self) -> bool:
        """Whether this rank is the federation's first member (the one that adds the residual
        to its term of a sum)."""
        return dist.get_rank(self.group) == 0

    def overlaps(self, nbytes: int) -> bool:
        """Whether a sum of ``nbytes`` is worth hiding behind other work
        (parallel.overlap_min_bytes) in a federation of several members."""
        return (self.overlap_min_bytes is not None and dist.get_world_size(self.group) > 1
                and nbytes >= self.overlap_min_bytes)

    @cached_property
    def _sender(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="federated-sum")

    def start_sum(self, x: torch.Tensor) -> Future:
        """The federated sum of ``x`` (consumed), started on the federation's one sending
        thread; ``.result()`` waits for it. Sums run one at a time in the order started, so
        every member issues the same collectives in the same order; meanwhile the caller must
        not sum over this federation itself."""
        return self._sender.submit(self.all_reduce, x, True)

    def all_reduce(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The sum over the federation of ``x``; ``inplace`` lets the flat sum reuse x's
        storage (as megatron's reduce does) where nothing else reads x afterwards."""
        if not self.two_level or x.numel() * x.element_size() < self.two_level_min_bytes:
            out = x.contiguous() if inplace else x.contiguous().clone()
            dist.all_reduce(out, group=self.group)
            return out
        m = dist.get_world_size(self.local)
        flat = x.contiguous().view(-1)
        pad = -flat.numel() % m
        if pad:
            flat = F.pad(flat, (0, pad))
        part = flat.new_empty(flat.numel() // m)
        dist.reduce_scatter_tensor(part, flat, group=self.local)
        dist.all_reduce(part, group=self.cross)
        out = flat.new_empty(flat.numel())
        dist.all_gather_into_tensor(out, part, group=self.local)
        return out[: x.numel()].view_as(x)


class _Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fed: Federation) -> torch.Tensor:
        ctx.fed = fed
        return fed.all_reduce(x, inplace=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.fed.all_reduce(grad), None


class _FinalSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fed: Federation) -> torch.Tensor:
        return fed.all_reduce(x, inplace=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fed: Federation) -> torch.Tensor:
        ctx.fed = fed
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # not in place: autograd may hand the same gradient tensor to other branches
        return ctx.fed.all_reduce(grad), None


def federated_sum(x: torch.Tensor, fed: Federation) -> torch.Tensor:
    """Forward: the federated sum of ``x`` (x is consumed); backward: the sum of the output's
    gradient shares, the true gradient of every cluster's contribution."""
    return _Sum.apply(x, fed)


def final_federated_sum(x: torch.Tensor, fed: Federation) -> torch.Tensor:
    """Forward: the federated sum of ``x`` (consumed) before the head, whose output layer hands
    back the true gradient; backward: that gradient as is."""
    return _FinalSum.apply(x, fed)


def copy_to_federation(x: torch.Tensor, fed: Federation) -> torch.Tensor:
    """Forward: identity; backward: the sum of the gradient shares (a split embedding's
    tokens)."""
    return _Copy.apply(x, fed)
