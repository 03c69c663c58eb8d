"""The split head: an FoE federation's C clusters hold the same tokens, so instead of each
recomputing the output layer and loss, they split them over the vocabulary the way megatron-core
splits them over a tensor-parallel group (the federation is the TP group of the column-parallel
output layer). Each cluster holds V/C rows of the output weights and computes V/C of the logits.

The input embedding is a lookup, free in FLOPs: split over the vocabulary it would cost a
federated sum of the embedded tokens every forward pass (a quarter of the forward
communication of a 2-layer model), so an untied embedding stays whole on every cluster
(``FederatedEmbedding``). The clusters hand it gradient shares (``model.federation``), which it
sums over the federation on the smaller of two tensors: the embedded tokens' gradient (T rows)
or the table's (V rows), so every cluster's copy gets the same, true gradient. A tied embedding
is the output weight and is split with it; its tokens' gradient shares are summed
(``sum_embedded_shares``).

The helpers take this rank's vocabulary shard of the logits ``[..., V/C]`` and the group it is
split over (a singleton group for the baseline, which is then the ordinary full-vocab case).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.utils import VocabUtility

from foe_train.model.federation import Federation, copy_to_federation
from foe_train.topology import embedding_sum_rows


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, weight: torch.Tensor,
                fed: Federation) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.fed, ctx.rows = fed, weight.shape[0]
        return torch.nn.functional.embedding(tokens, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (tokens,) = ctx.saved_tensors
        by_tokens = embedding_sum_rows(tokens.numel(), ctx.rows) == tokens.numel()
        if by_tokens:
            grad = ctx.fed.all_reduce(grad)
        table = torch.ops.aten.embedding_dense_backward(grad, tokens, ctx.rows, -1, False)
        if not by_tokens:
            table = ctx.fed.all_reduce(table, inplace=True)
        return None, table, None


class FederatedEmbedding(VocabParallelEmbedding):
    """The whole (untied) embedding table on every cluster of a federation, whose lookup's
    backward sums the clusters' gradient shares over the federation (module docstring)."""

    def __init__(self, *args: Any, federation: Federation, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if dist.get_world_size(self.tp_group) != 1:
            raise ValueError("FederatedEmbedding holds the whole table: give it a 1-rank tp_group")
        self.federation = federation

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return _Lookup.apply(input_, self.weight, self.federation)


def sum_head_input_shares(output_layer: torch.nn.Module, fed: Federation) -> None:
    """Each cluster's V/C rows of the output layer give a share of its input's gradient.
    megatron's column-parallel layer would sum them with a flat all-reduce over its group;
    here the federation sums them (two-level where clusters share nodes, ``model.federation``),
    so the residual's last sum receives the true gradient."""
    output_layer.allreduce_dgrad = False
    output_layer.disable_grad_reduce = True

    def copy(module: torch.nn.Module, args: tuple) -> tuple:
        return (copy_to_federation(args[0], fed), *args[1:])

    output_layer.register_forward_pre_hook(copy)


def sum_embedded_shares(embedding: torch.nn.Module, fed: Federation) -> None:
    """A split (tied) embedding's output enters the first layer through ``copy_to_federation``,
    so the tokens' gradient shares are summed before its rows take their gradient."""

    def copy(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return copy_to_federation(output, fed)

    embedding.register_forward_hook(copy)


def mark_vocab_shards(gpt: torch.nn.Module) -> None:
    """Tag each weight split over the vocabulary with (index, count) of this rank's rows."""
    for module in (gpt.embedding.word_embeddings, gpt.output_layer):
        weight, group = module.weight, module.tp_group
        if weight is not None and dist.get_world_size(group) > 1:
            weight.vocab_shard = (dist.get_rank(group), dist.get_world_size(group))


def vocab_shard(param: torch.Tensor) -> tuple[int, int] | None:
    """(index, count) of the vocabulary rows this rank holds of a split weight, else None."""
    return getattr(param, "vocab_shard", None)


def head_group(model: torch.nn.Module) -> dist.ProcessGroup:
    """The group the model's output layer splits the vocabulary over (through DDP wrappers)."""
    while hasattr(model, "module"):
        model = model.module
    return model.output_layer.tp_group


def keep_logits_split(gpt: torch.nn.Module) -> None:
    """megatron's GPTModel insists on gathering the vocabulary shards whenever it runs with an
    inference context (``runtime_gather_output=True``); generation here chooses tokens from
    the shards (``greedy`` exchanges two floats per token instead of V/C logits), so the
    output layer is told, per call, to keep them split."""

    def split(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "runtime_gather_output": False}

    gpt.output_layer.register_forward_pre_hook(split, with_kwargs=True)


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _vocab_start(logits: torch.Tensor, group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else logits.shape[-1] * dist.get_rank(group)


def _gathered(rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[shards, *rows.shape]: every shard's ``rows``, in shard order."""
    if _size(group) == 1:
        return rows.unsqueeze(0)
    out = rows.new_empty(_size(group) * rows.numel())
    dist.all_gather_into_tensor(out, rows.contiguous().view(-1), group=group)
    return out.view(_size(group), *rows.shape)


def _mask_padding(logits: torch.Tensor, start: int, vocab_size: int | None) -> torch.Tensor:
    """``logits`` of a shard starting at id ``start`` with ids at or above ``vocab_size`` (the
    model's padding of the tokenizer's vocabulary) set to -inf."""
    if vocab_size is None:
        return logits
    ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


class _CrossEntropy(torch.autograd.Function):
    """megatron's vocab-parallel cross entropy with an explicit group (megatron's own function
    reads the global TP group, which FoE does not use), composed of megatron's helpers, and
    with one collective instead of megatron's two (the max, then the sums against it): each
    shard offers its own max, its sum of exponentials against that max and its raw target
    logit (0 where another shard holds the target), and every shard rescales the sums to the
    global max."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor,
                group: dist.ProcessGroup) -> torch.Tensor:
        logits, own_max = VocabParallelCrossEntropy.calculate_logits_max(logits.clone())
        size = dist.get_world_size(group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.shape[-1], dist.get_rank(group), size
        )
        target_mask, masked_target, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, own_max, start, end
            )
        )
        if size > 1:
            raw = (predicted + own_max).masked_fill(target_mask, 0)
            offers = _gathered(torch.stack([own_max, sum_exp, raw]), group)
            maxes, sums, raws = offers.unbind(1)
            logits_max = maxes.max(0).values
            sum_exp = (sums * torch.exp(maxes - logits_max)).sum(0)
            predicted = raws.sum(0) - logits_max
            norm = torch.exp(own_max - logits_max) / sum_exp
        else:
            norm = sum_exp.reciprocal()
        loss = torch.log(sum_exp) - predicted
        exp_logits.mul_(norm.unsqueeze(-1))  # the softmax
        ctx.save_for_backward(exp_logits, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad_2d, arange, update, grad = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        grad = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange, masked_target, update, grad, grad_output
        )
        return grad, None, None


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Per-token next-token loss (shape of ``target``) from vocab-split logits; one small
    all-gather of three floats per token and shard replaces gathering the logits (none when
    the logits are whole)."""
    return _CrossEntropy.apply(logits, target, group)


def gather_logits(logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Full-vocabulary logits from the shards (to compare a split head with a whole one);
    group None: the logits are not split."""
    return torch.cat(tuple(_gathered(logits, group)), dim=-1)


def greedy(
    logits: torch.Tensor, group: dist.ProcessGroup | None, vocab_size: int | None = None
) -> torch.Tensor:
    """argmax over the whole vocabulary without gathering the logits: each shard offers its best
    (value, id) and the first id with the highest value wins, as ``argmax`` would choose.
    Ids at or above ``vocab_size`` (padding of the tokenizer's vocabulary) never win."""
    start = _vocab_start(logits, group)
    value, index = _mask_padding(logits.float(), start, vocab_size).max(-1)
    if _size(group) == 1:
        return index
    values, ids = _gathered(torch.stack([value, (index + start).to(value.dtype)]), group).unbind(1)
    best = values.max(0).values
    ids = ids.masked_fill(values < best, float("inf"))
    return ids.min(0).values.long()


NUCLEUS_CANDIDATES = 64
"""How many of its likeliest tokens a shard offers for top-p sampling in place of its whole
slice of the vocabulary (when that is smaller: 2 numbers per candidate)."""


def sample(
    logits: torch.Tensor, group: dist.ProcessGroup | None, uniforms: torch.Tensor,
    temperature: float, top_p: float, vocab_size: int | None = None,
) -> torch.Tensor:
    """One id per row, drawn from softmax(logits / temperature) cut to its top-p nucleus, from
    the vocabulary shards without gathering them; ``uniforms`` ([b] in [0, 1), the same on every
    rank of the group) are each row's randomness, so the draw is the same on every rank.

    The draw is the inverse of the distribution's cumulative sum at the row's uniform: over the
    ids in order when top_p is 1 (each shard offers its max and sum of exponentials, and the
    shard whose mass holds the point names the id: two small collectives), over the nucleus in
    order of probability otherwise. The nucleus is found among each shard's
    ``NUCLEUS_CANDIDATES`` likeliest tokens whenever they provably hold it (its last token is
    likelier than any token left out), else among all (the whole shards gathered). Ids at or
    above ``vocab_size`` (padding) are never drawn."""
    start = _vocab_start(logits, group)
    x = _mask_padding(logits.double() / temperature, start, vocab_size)
    uniforms = uniforms.double().to(x.device)
    if top_p == 1:
        return _draw_by_id(x, start, uniforms, group)
    return _draw_nucleus(x, start, uniforms, top_p, group)


def _shard_masses(x: torch.Tensor) -> torch.Tensor:
    """[2, b]: each row's max over this shard (-inf where all is padding) and its sum of
    exponentials against that max."""
    top = x.max(-1).values
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.stack([top, torch.exp(x - safe.unsqueeze(-1)).sum(-1)])


def _global(masses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From every shard's ``_shard_masses`` ([shards, 2, b]): the row max over the whole
    vocabulary and each shard's mass against it ([shards, b])."""
    tops, sums = masses.unbind(1)
    top = tops.max(0).values
    return top, sums * torch.exp(tops - top)


def _draw_by_id(x: torch.Tensor, start: int, uniforms: torch.Tensor,
                group: dist.ProcessGroup | None) -> torch.Tensor:
    top, mass = _global(_gathered(_shard_masses(x), group))
    target = uniforms * mass.sum(0)
    below = mass.cumsum(0) - mass
    shards = torch.arange(mass.shape[0], device=x.device).unsqueeze(-1)
    owner = torch.where((below <= target) & (mass > 0), shards, -1).max(0).values
    me = start // x.shape[-1]  # this shard's index
    weights = torch.exp(x - top.unsqueeze(-1))
    cum = weights.cumsum(-1) + below[me].unsqueeze(-1)
    last = torch.where(weights > 0, torch.arange(x.shape[-1], device=x.device), 0).max(-1).values
    pick = torch.searchsorted(cum, target.unsqueeze(-1), right=True).squeeze(-1)
    ids = torch.where(owner == me, start + torch.minimum(pick, last), -1)
    if _size(group) > 1:
        dist.all_reduce(ids, op=dist.ReduceOp.MAX, group=group)
    return ids


def _draw_nucleus(x: torch.Tensor, start: int, uniforms: torch.Tensor, top_p: float,
                  group: dist.ProcessGroup | None) -> torch.Tensor:
    rows, width = x.shape
    masses = _shard_masses(x)
    k = min(NUCLEUS_CANDIDATES, width)
    if 2 * k < width:
        values, index = x.topk(k, -1)
        offers = _gathered(torch.cat([masses.T, values, (index + start).to(x.dtype)], -1), group)
        values, ids = (part.permute(1, 0, 2).flatten(1) for part in offers[..., 2:].split(k, -1))
        left_out = offers[..., 1 + k].max(0).values
        chosen, exact = _nucleus(offers[..., :2].transpose(1, 2), values, ids, uniforms, top_p,
                                 left_out)
        if bool(exact.all()):
            return chosen
    offers = _gathered(torch.cat([masses.T, x], -1), group)
    values = offers[..., 2:].permute(1, 0, 2).flatten(1)
    ids = torch.arange(values.shape[-1], device=x.device, dtype=x.dtype).expand(rows, -1)
    return _nucleus(offers[..., :2].transpose(1, 2), values, ids, uniforms, top_p, None)[0]


def _nucleus(masses: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
             uniforms: torch.Tensor, top_p: float, left_out: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw from the offered ``values`` of ``ids`` ([b, n]) given every shard's masses, and
    per row whether it is exact: nothing was ``left_out`` (None), or the nucleus' last token is
    likelier than the likeliest one left out (the largest of the shards' last offered values)."""
    top, mass = _global(masses)
    total = mass.sum(0).unsqueeze(-1)
    probs = torch.exp(values - top.unsqueeze(-1)) / total
    order = ids.argsort(dim=-1)
    probs, ids = probs.gather(-1, order), ids.gather(-1, order)
    order = probs.argsort(dim=-1, descending=True, stable=True)
    probs, ids = probs.gather(-1, order), ids.gather(-1, order)
    cum = probs.cumsum(-1)
    last = ((cum - probs) < top_p).sum(-1, keepdim=True) - 1
    kept = cum.gather(-1, last)
    pick = torch.searchsorted(cum, uniforms.unsqueeze(-1) * kept, right=True)
    chosen = ids.gather(-1, torch.minimum(pick, last)).squeeze(-1).long()
    if left_out is None:
        return chosen, torch.ones_like(chosen, dtype=torch.bool)
    bound = torch.exp(left_out - top).unsqueeze(-1) / total
    return chosen, ((probs.gather(-1, last) > bound) & (kept >= top_p)).squeeze(-1)
