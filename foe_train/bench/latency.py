"""Worker of ``foe-bench latency``: forward latency, TTFT and TBT of both members of a recipe
pair, measured interleaved in one run (after warm-up) on the same processes, plus the time
and bytes each collective kind takes during a prefill.

Every timed region starts after a barrier and ends when the slowest rank is done (its time is
the max over ranks). Each FoE token shard serves batch/shards of the prompts; the baseline
splits the same batch over all ranks.

Weights are random (``--pair``: the recipes) or trained (``--checkpoints``: foe-train runs, each
with its own recipe), so the routers route as they would in service. Each row reports the
expert imbalance of that prefill per member: the token copies each rank's experts received, and
max/mean over the job's ranks per MoE layer, averaged over layers. An expert-parallel
all-to-all and the experts after it wait for the most loaded rank of their group: the
baseline's group is the whole job, an FoE cluster's only its own L ranks, and with L = 1 a
cluster's router can only pick its own rank's experts, so every rank gets the same load.
Beside the ratio of the medians each row gives the ratio of every repetition (``per_rep``):
how far it spreads tells a ratio near 1 from noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from foe_train import checkpoint
from foe_train.bench.comm import CommRecorder, gather_summaries
from foe_train.bench.comm_run import emit, mean_over_ranks
from foe_train.bench.stats import paired_ratios, summary
from foe_train.config import RecipeConfig, load_config
from foe_train.infer.generate import decode_step, inference_config, new_context, prefill
from foe_train.model.builder import build_model
from foe_train.model.head import greedy
from foe_train.runtime import all_reduce_values, device, init_distributed, synchronize
from foe_train.topology import Topology, build_topology


@dataclass
class Member:
    name: str
    cfg: RecipeConfig
    topo: Topology
    model: torch.nn.Module
    weights: str


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds of the slowest rank), the GPU's queued work waited for at both ends."""
    dist.barrier()
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    elapsed = all_reduce_values([time.perf_counter() - start], op=dist.ReduceOp.MAX)
    return out, float(elapsed[0])


def _prompts(member: Member, batch: int, prompt_len: int) -> torch.Tensor:
    shards = member.topo.token_shards  # the CLI checked that they divide the batch
    gen = torch.Generator().manual_seed(member.topo.token_shard)
    tokens = torch.randint(0, member.cfg.model.vocab_size, (batch // shards, prompt_len),
                           generator=gen)
    return tokens.to(device())


def one_request(member: Member, tokens: torch.Tensor, gen_len: int) -> dict[str, list[float]]:
    """A full forward (no cache), then prefill + gen_len-1 decode steps with the cache."""
    position = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        _, forward = timed(lambda: member.model(tokens, position, None))
    context = new_context(tokens.shape[0], tokens.shape[1] + gen_len)
    group = member.topo.vocab_group
    nxt, ttft = timed(lambda: greedy(prefill(member.model, context, tokens), group))
    steps = []
    for _ in range(gen_len - 1):
        nxt, step = timed(lambda t=nxt: greedy(decode_step(member.model, context, t), group))
        steps.append(step)
    total = ttft + sum(steps)
    return {"forward": [forward], "ttft": [ttft], "tbt": steps,
            "tokens_per_s": [tokens.shape[0] * member.topo.token_shards * gen_len / total]}


@contextmanager
def routed_counts(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Per MoE layer (in call order), the token copies this rank's router sent to each expert
    of its expert-parallel group during the block."""
    counts: list[torch.Tensor] = []

    def record(module: torch.nn.Module, inputs: object, output: tuple) -> None:
        counts.append(output[1].detach().sum(0).float())

    hooks = [module.register_forward_hook(record) for name, module in model.named_modules()
             if name.endswith("mlp.router")]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def expert_imbalance(topo: Topology, counts: list[torch.Tensor]) -> dict[str, Any]:
    """Copies received per rank and layer (every rank's routers summed over its EP group, the
    rank's own block of experts) and max/mean over ranks per layer, averaged over layers
    (1.0: balanced; the module docstring says why the baseline's spread is job-wide)."""
    if not counts:
        return {"max_over_mean": 1.0, "per_layer": [], "copies": []}
    world = topo.world_size
    mine = torch.stack(counts)  # [layers, experts of the EP group]
    every = torch.empty(world * mine.numel(), device=mine.device)
    dist.all_gather_into_tensor(every, mine.reshape(-1))
    every = every.view(world, *mine.shape)
    grid, ep = topo.grid, "cluster_ep" if topo.kind == "foe" else "ep"
    received = []
    for rank in range(world):
        members = grid.group(ep, rank)
        width = mine.shape[1] // len(members)
        at = members.index(rank) * width
        received.append(every[members, :, at:at + width].sum(dim=(0, 2)))
    copies = torch.stack(received, dim=1).tolist()  # [layers][ranks]; read once, untimed
    per_layer = [max(layer) / max(sum(layer) / world, 1e-9) for layer in copies]
    return {"max_over_mean": sum(per_layer) / len(per_layer), "per_layer": per_layer,
            "copies": copies}


def prefill_profile(member: Member, tokens: torch.Tensor) -> dict[str, Any]:
    """One untimed prefill: seconds, bytes and calls per collective kind (mean over ranks)
    and the expert imbalance it met."""
    context = new_context(tokens.shape[0], tokens.shape[1])
    topo = member.topo
    with (CommRecorder(group_kinds=topo.group_kinds(), node_of_rank=topo.node_of_rank) as rec,
          routed_counts(member.model) as counts):
        prefill(member.model, context, tokens)
    return {"comm": mean_over_ranks(gather_summaries(rec, by="op_kind")),
            "imbalance": expert_imbalance(topo, counts)}


def measure(members: list[Member], batch: int, prompt_len: int, gen_len: int, reps: int,
            warmup: int) -> dict[str, Any]:
    prompts = {m.name: _prompts(m, batch, prompt_len) for m in members}
    samples: dict[str, dict[str, list[float]]] = {m.name: {} for m in members}
    for rep in range(warmup + reps):
        for m in members:  # interleaved: both see the same machine state
            result = one_request(m, prompts[m.name], gen_len)
            if rep >= warmup:
                for key, values in result.items():
                    samples[m.name].setdefault(key, []).extend(values)
    row: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
    for m in members:
        row[m.name] = {key: summary(values) for key, values in samples[m.name].items()}
        row[m.name].update(prefill_profile(m, prompts[m.name]))
    a, b = (m.name for m in members)
    row["ratio"] = {key: row[b][key]["median"] / row[a][key]["median"]
                    for key in ("forward", "ttft", "tbt")}
    row["per_rep"] = {key: paired_ratios(samples[b][key], samples[a][key])
                      for key in ("forward", "ttft", "tbt")}
    return row


def format_table(rows: list[dict[str, Any]], names: tuple[str, str]) -> str:
    """One line per row and metric: both members' medians and the first member's speedup
    (the second's time over the first's; for tokens/s the first's over the second's), so
    > 1 means the first member is faster on every line."""
    a, b = names
    lines = [f"{'batch':>5} {'prompt':>6}  {'metric':<12} {a:>10} {b:>10} {a + ' speedup':>13}"
             f"  per rep p10-p90"]
    for row in rows:
        for key, unit, scale in (("forward", "ms", 1e3), ("ttft", "ms", 1e3),
                                 ("tbt", "ms", 1e3), ("tokens_per_s", "tok/s", 1)):
            va, vb = row[a][key]["median"] * scale, row[b][key]["median"] * scale
            speedup = va / vb if key == "tokens_per_s" else vb / va
            spread = row["per_rep"].get(key)
            lines.append(f"{row['batch']:>5} {row['prompt_len']:>6}  {key + ' ' + unit:<12} "
                         f"{va:>10.2f} {vb:>10.2f} {speedup:>13.2f}"
                         + (f"  {spread['p10']:.2f}-{spread['p90']:.2f}" if spread else ""))
        for name in names:
            comm = ", ".join(f"{k} {v['seconds'] * 1e3:.1f}ms/{v['bytes'] / 1e6:.2f}MB"
                             for k, v in row[name]["comm"].items())
            lines.append(f"{'':>13}comm {name}: {comm or 'none'}; expert load max/mean "
                         f"{row[name]['imbalance']['max_over_mean']:.2f}")
    return "\n".join(lines)


def member_config(path: str, overrides: list[str],
                  trained: bool) -> tuple[RecipeConfig, Path | None]:
    """A member's recipe and weights: a recipe file (random weights) or a foe-train run's
    newest checkpoint with its own recipe (overrides may change only its layout)."""
    if trained:
        return inference_config(path, None, overrides)
    return load_config(path, overrides), None


def build_member(path: str, overrides: list[str], dtype: torch.dtype, trained: bool) -> Member:
    cfg, weights = member_config(path, overrides, trained)
    topo = build_topology(cfg.model, cfg.parallel)
    model = build_model(cfg.model, topo, seed=cfg.seed, dtype=dtype)
    if weights is not None:
        checkpoint.load_weights(model, cfg.model, topo, weights)
    return Member(cfg.model.kind, cfg, topo, model.eval(), str(weights or "random"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="foe-bench latency (worker)")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--pair", nargs=2)
    source.add_argument("--checkpoints", nargs=2)
    ap.add_argument("--batch", nargs="+", type=int, required=True)
    ap.add_argument("--prompt-len", nargs="+", type=int, required=True)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    here = init_distributed()
    dtype = torch.bfloat16 if here.type == "cuda" else torch.float32
    members = [build_member(path, args.overrides, dtype, trained=args.checkpoints is not None)
               for path in args.checkpoints or args.pair]
    if members[0].name == members[1].name:
        members[1].name += "-b"
    rows = [measure(members, batch, prompt_len, args.gen_len, args.reps, args.warmup)
            for prompt_len in args.prompt_len for batch in args.batch]
    if dist.get_rank() == 0:
        report = {"rows": rows, "nodes": len(set(members[0].topo.node_of_rank)),
                  "world_size": dist.get_world_size(),
                  "members": {m.name: {"weights": m.weights,
                                       "parallel": m.cfg.parallel.model_dump()}
                              for m in members}}
        emit(report, format_table(rows, (members[0].name, members[1].name)), args.json,
             args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
