"""Multi-rank checks of KV-cached inference, run under torchrun by tests/test_inference.py (one
launch per world size, every topology of that size): cached decoding against recomputing the
whole sequence, the cache's KV-head shapes, greedy generation against a no-cache reference,
determinism, and identical tokens on all ranks. Rank 0 writes JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from foe_train.config import RecipeConfig
from foe_train.infer.generate import (
    Sampling,
    decode_step,
    generate,
    new_context,
    prefill,
    shard_prompts,
)
from foe_train.model import head
from foe_train.model.builder import build_model
from foe_train.model.federation import Federation
from foe_train.runtime import init_distributed
from foe_train.topology import Topology, build_topology
from tests import dist_checks

TINY = {**dist_checks.TINY, "init_method_std": 0.2}
SEQUENCES, LENGTH, PREFILL = 4, 12, 5
PROMPT_LENGTHS, NEW_TOKENS = (3, 7, 4, 5, 6), 6
TOP_P = Sampling(temperature=0.8, top_p=0.9, seed=7)
SAMPLED_ROWS, SAMPLED_VOCAB = 8, 1024


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _full_last(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the whole sequence, no cache."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None)[:, -1]


def _everyone(value: Any, topo: Topology) -> list[Any]:
    out: list[Any] = [None] * topo.world_size
    dist.all_gather_object(out, value)
    return out


@torch.no_grad()
def cache_check(model: GPTModel, topo: Topology) -> dict:
    """Prefill PREFILL tokens, decode the rest one at a time; every step's logits against the
    full-sequence forward's last position. Also the cache tensors' shapes."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, TINY["vocab_size"], (SEQUENCES, LENGTH), generator=gen)
    seq = data[shard_prompts([[0]] * SEQUENCES, topo)]
    context = new_context(seq.shape[0], LENGTH)
    errors = [_rel(prefill(model, context, seq[:, :PREFILL]), _full_last(model, seq[:, :PREFILL]))]
    for pos in range(PREFILL, LENGTH):
        logits = decode_step(model, context, seq[:, pos])
        errors.append(_rel(logits, _full_last(model, seq[:, :pos + 1])))
    shapes = {str(layer): [list(k.shape), list(v.shape)]
              for layer, (k, v) in sorted(context.key_value_memory_dict.items())}
    return {"errors": errors, "cache_shapes": shapes, "local_batch": seq.shape[0]}


@torch.no_grad()
def greedy_by_recompute(model: GPTModel, topo: Topology, prompts: list[list[int]]) -> list:
    """The reference: greedy tokens from the full forward of the whole prefix at every step,
    in the same lockstep over ranks as ``generate``."""
    mine = shard_prompts(prompts, topo)
    lengths = torch.tensor([len(prompts[i]) for i in mine])
    total = max(PROMPT_LENGTHS) + NEW_TOKENS
    seq = torch.zeros(len(mine), total, dtype=torch.long)
    for row, i in enumerate(mine):
        seq[row, :len(prompts[i])] = torch.tensor(prompts[i])
    for pos in range(min(PROMPT_LENGTHS), total):
        chosen = head.greedy(_full_last(model, seq[:, :pos]), topo.vocab_group)
        seq[:, pos] = torch.where(pos >= lengths, chosen, seq[:, pos])
    out = {i: seq[row, len(prompts[i]):len(prompts[i]) + NEW_TOKENS].tolist()
           for row, i in enumerate(mine)}
    merged = {i: ids for part in _everyone(out, topo) for i, ids in part.items()}
    return [merged[i] for i in range(len(prompts))]


def generation_check(model: GPTModel, topo: Topology) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist()
               for n in PROMPT_LENGTHS]
    greedy = generate(model, topo, prompts, NEW_TOKENS)
    sampled = generate(model, topo, prompts, NEW_TOKENS, TOP_P)
    return {
        "greedy": greedy,
        "greedy_repeat_equal": generate(model, topo, prompts, NEW_TOKENS) == greedy,
        "greedy_equals_recompute": greedy_by_recompute(model, topo, prompts) == greedy,
        "top_p": sampled,
        "top_p_repeat_equal": generate(model, topo, prompts, NEW_TOKENS, TOP_P) == sampled,
        "same_on_all_ranks": all(o == [greedy, sampled] for o in _everyone([greedy, sampled],
                                                                           topo)),
    }


def sampling_check(topo: Topology) -> dict:
    """``head.sample`` on this rank's vocabulary shard against the same draw from the whole
    logits (group None), on synthetic logits wider than the model's, for each way it can go:
    by id (top-p 1), the nucleus among the shards' candidates (peaked logits), and the nucleus
    among all logits (flat ones, where the candidates cannot hold it). Records the sizes of
    the all-gathers the split draw made."""
    group = topo.vocab_group
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    width = SAMPLED_VOCAB // size
    gen = torch.Generator().manual_seed(3)
    out = {}
    for name, scale, top_p in (("by_id", 4.0, 1.0), ("candidates", 4.0, 0.9),
                               ("whole", 0.2, 0.99)):
        full = torch.randn(SAMPLED_ROWS, SAMPLED_VOCAB, generator=gen) * scale
        uniforms = torch.rand(SAMPLED_ROWS, generator=gen, dtype=torch.float64)
        with dist_checks.inputs_to("all_gather_into_tensor") as gathered:
            split = head.sample(full[:, rank * width:(rank + 1) * width], group, uniforms, 0.7,
                                top_p, SAMPLED_VOCAB - 24)
        whole = head.sample(full, None, uniforms, 0.7, top_p, SAMPLED_VOCAB - 24)
        out[name] = {"equal": bool(split.equal(whole)), "distinct": len(set(split.tolist())),
                     "gathered": [t.numel() for t in gathered]}
    return out


def overlap_check(model: GPTModel, cfg: RecipeConfig, topo: Topology) -> dict:
    """The same weights with every federated sum of a batch of two or more sequences split in
    halves and overlapped (parallel.overlap_min_bytes = 0): cached decoding, the full forward
    and greedy generation against the model that sums whole batches."""
    cfg = RecipeConfig.model_validate({"model": cfg.model.model_dump(), "parallel": {
        **cfg.parallel.model_dump(), "overlap_min_bytes": 0}})
    halved = build_model(cfg.model, build_topology(cfg.model, cfg.parallel), seed=cfg.seed)
    halved.eval()
    started, contiguous = [], []
    start_sum = Federation.start_sum
    Federation.start_sum = lambda fed, x: started.append(x.shape) or start_sum(fed, x)
    # a strided half would make the QKV projection a batched matmul (model.layer._term)
    hooks = [layer.self_attention.linear_qkv.register_forward_pre_hook(
        lambda module, args: contiguous.append(args[0].is_contiguous()))
        for layer in halved.decoder.layers]
    try:
        cache = cache_check(halved, topo)
        gen = torch.Generator().manual_seed(2)
        data = torch.randint(0, TINY["vocab_size"], (SEQUENCES, LENGTH), generator=gen)
        seq = data[shard_prompts([[0]] * SEQUENCES, topo)]
        with torch.no_grad():
            full_rel = _rel(_full_last(halved, seq), _full_last(model, seq))
        prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist()
                   for n in PROMPT_LENGTHS]
        same_greedy = (generate(halved, topo, prompts, NEW_TOKENS)
                       == generate(model, topo, prompts, NEW_TOKENS))
    finally:
        Federation.start_sum = start_sum
        for hook in hooks:
            hook.remove()
    per_rank = _everyone({"errors": cache["errors"], "full_rel": full_rel,
                          "halves": len(started), "same_greedy": same_greedy,
                          "qkv_contiguous": bool(contiguous) and all(contiguous)}, topo)
    return {"max_rel_error": max(max(r["errors"]) for r in per_rank),
            "full_rel": max(r["full_rel"] for r in per_rank),
            "halves_summed": min(r["halves"] for r in per_rank),
            "same_greedy": all(r["same_greedy"] for r in per_rank),
            "qkv_inputs_contiguous": all(r["qkv_contiguous"] for r in per_rank)}


def check(kind: str, parallel: dict, mode: str | None) -> dict:
    model_cfg = dict(TINY, kind=kind, **({"residual_sync": mode} if mode else {}))
    cfg = RecipeConfig.model_validate({"model": model_cfg, "parallel": parallel})
    topo = build_topology(cfg.model, cfg.parallel)
    model = build_model(cfg.model, topo, seed=cfg.seed)
    model.eval()
    cache = cache_check(model, topo)
    out = generation_check(model, topo)
    per_rank = _everyone(cache, topo)
    out["max_rel_error"] = max(max(r["errors"]) for r in per_rank)
    out["steps_checked"] = len(cache["errors"])
    out["cache_shapes"] = [r["cache_shapes"] for r in per_rank]
    out["local_batch"] = [r["local_batch"] for r in per_rank]
    if kind == "foe" and mode == "post_attention":
        out["overlap"] = overlap_check(model, cfg, topo)
        out["sampling"] = _everyone(sampling_check(topo), topo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--foe", nargs="*", default=[], help="FoE topologies D,C,L")
    ap.add_argument("--moe", nargs="*", default=[], help="baseline EP sizes")
    args = ap.parse_args()
    init_distributed()
    results: dict[str, dict] = {}
    for spec in args.foe:
        D, C, L = (int(x) for x in spec.split(","))
        parallel = {"data": D, "clusters": C, "ranks_per_cluster": L}
        results[f"foe:{spec}"] = {mode: check("foe", parallel, mode)
                                  for mode in ("post_attention", "post_attention_and_moe")}
    for ep in args.moe:
        results[f"moe:{ep}"] = {"moe": check("moe", {"expert_parallel": int(ep)}, None)}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
