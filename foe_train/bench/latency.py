"""Worker of ``foe-bench latency``: forward latency, TTFT and TBT of both members of a recipe
pair, measured interleaved in one run (after warm-up) on the same processes, plus the time
and bytes each collective kind takes during a prefill.

Every timed region starts after a barrier and ends when the slowest rank is done (its time is
the max over ranks). Each FoE token shard serves batch/shards of the prompts; the baseline
splits the same batch over all ranks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from foe_train.bench.comm import CommRecorder, gather_summaries
from foe_train.bench.comm_run import emit, mean_over_ranks
from foe_train.config import ConfigError, RecipeConfig, load_config
from foe_train.infer.generate import decode_step, new_context, prefill
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
    samples: dict[str, list[float]] = field(default_factory=dict)


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
    shards = member.topo.token_shards
    if batch % shards:
        raise ConfigError(f"--batch {batch}: not divisible by the {shards} token shards of "
                          f"{member.name}; use a multiple of {shards}")
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


def comm_profile(member: Member, tokens: torch.Tensor) -> dict[str, dict[str, float]]:
    """Seconds, bytes and calls per collective kind during one prefill (mean over ranks)."""
    context = new_context(tokens.shape[0], tokens.shape[1])
    topo = member.topo
    with CommRecorder(group_kinds=topo.group_kinds(), node_of_rank=topo.node_of_rank) as rec:
        prefill(member.model, context, tokens)
    return mean_over_ranks(gather_summaries(rec, by="op_kind"))


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


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
        row[m.name] = {key: _stats(values) for key, values in samples[m.name].items()}
        row[m.name]["comm"] = comm_profile(m, prompts[m.name])
    a, b = (m.name for m in members)
    row["ratio"] = {key: row[b][key]["median"] / row[a][key]["median"]
                    for key in ("forward", "ttft", "tbt")}
    return row


def format_table(rows: list[dict[str, Any]], names: tuple[str, str]) -> str:
    a, b = names
    lines = [f"{'batch':>5} {'prompt':>6}  {'metric':<12} {a:>10} {b:>10} {b + '/' + a:>9}"]
    for row in rows:
        for key, unit, scale in (("forward", "ms", 1e3), ("ttft", "ms", 1e3),
                                 ("tbt", "ms", 1e3), ("tokens_per_s", "tok/s", 1)):
            va, vb = row[a][key]["median"] * scale, row[b][key]["median"] * scale
            lines.append(f"{row['batch']:>5} {row['prompt_len']:>6}  {key + ' ' + unit:<12} "
                         f"{va:>10.2f} {vb:>10.2f} {vb / va:>9.2f}")
        for name in names:
            comm = ", ".join(f"{k} {v['seconds'] * 1e3:.1f}ms/{v['bytes'] / 1e6:.2f}MB"
                             for k, v in row[name]["comm"].items())
            lines.append(f"{'':>13}comm {name}: {comm or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="foe-bench latency (worker)")
    ap.add_argument("--pair", nargs=2, required=True)
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
    members = []
    for path in args.pair:
        cfg = load_config(path, args.overrides)
        topo = build_topology(cfg.model, cfg.parallel)
        model = build_model(cfg.model, topo, seed=cfg.seed, dtype=dtype).eval()
        members.append(Member(cfg.model.kind, cfg, topo, model))
    if members[0].name == members[1].name:
        members[1].name += "-b"
    rows = [measure(members, batch, prompt_len, args.gen_len, args.reps, args.warmup)
            for prompt_len in args.prompt_len for batch in args.batch]
    if dist.get_rank() == 0:
        report = {"rows": rows, "nodes": len(set(members[0].topo.node_of_rank)),
                  "world_size": dist.get_world_size()}
        emit(report, format_table(rows, (members[0].name, members[1].name)), args.json,
             args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
