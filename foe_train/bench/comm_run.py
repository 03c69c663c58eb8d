"""Worker of ``foe-bench comm``: one forward (and backward) step of a recipe's model under the
communication recorder, on every rank; rank 0 prints counted vs predicted bytes side by side
with a verdict line (``--json``: the JSON report).
Routing is forced to the balanced round-robin router so that the all-to-all volume is a
function of the configuration, as the §3 formulas assume."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from foe_train.bench.comm import CommRecorder, gather_summaries
from foe_train.bench.comm_model import integral, predict
from foe_train.config import load_config
from foe_train.model.builder import build_model
from foe_train.model.dispatcher import dispatcher_name
from foe_train.runtime import init_distributed
from foe_train.topology import build_topology

if TYPE_CHECKING:
    from foe_train.train.job import Job

# torch's tensor variants of a collective are one operation in the report and the formulas
CANONICAL = {
    "all_to_all_single": "all_to_all",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
}


def record_step(job: Job, step: Callable[[], Any]) -> Any:
    """Run one training step under the communication recorder; rank 0 writes what each
    collective kind sent per rank (mean over ranks) and whether it crossed nodes to the run
    directory's comm_step.json (the training loop's ``first_step`` hook)."""
    topo = job.topo
    with CommRecorder(group_kinds=topo.group_kinds(), node_of_rank=topo.node_of_rank) as rec:
        result = step()
    by_kind = mean_over_ranks(gather_summaries(rec, by="op_kind"))
    spans = _spans(rec, topo.world_size)
    if topo.rank == 0:
        report = {"step": job.scheduler.num_steps, "nodes": len(set(topo.node_of_rank)),
                  "by_kind": by_kind, "collectives": spans}
        (job.run_dir / "comm_step.json").write_text(json.dumps(report, indent=1))
    return result


def _spans(rec: CommRecorder, world_size: int) -> list[tuple]:
    """(op, group kind, crossed nodes) of every collective any rank made."""
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, sorted({(r.op, r.group_kind, r.spans_nodes)
                                             for r in rec.records}))
    return sorted({tuple(s) for per_rank in everyone for s in per_rank})


def mean_over_ranks(summaries: list[dict]) -> dict[str, dict[str, int | float]]:
    """Per-rank traffic averaged over ranks (exact counts; seconds as float), keyed by
    canonical op (and @kind)."""
    total: dict[str, dict[str, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    seconds: dict[str, float] = defaultdict(float)
    for summary in summaries:
        for key_op, vals in summary.items():
            op, _, kind = key_op.partition("@")
            name = CANONICAL.get(op, op) + (f"@{kind}" if kind else "")
            for key in ("bytes", "cross_node_bytes", "calls"):
                total[name][key] += Fraction(vals[key]) / len(summaries)
            seconds[name] += vals.get("seconds", 0.0) / len(summaries)
    return {op: {**{k: integral(v) for k, v in vals.items()}, "seconds": seconds[op]}
            for op, vals in total.items()}


def emit(report: dict, readable: str, as_json: bool, out: str | None) -> None:
    """Print a benchmark's report (readable, or JSON) and write its JSON to ``out``."""
    text = json.dumps(report, indent=1)
    print(text if as_json else readable, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text)


def table(report: dict) -> str:
    """Counted vs predicted per collective (bytes each rank sends, mean over ranks), the part
    that crossed nodes, calls, and the verdict."""
    counted, predicted = report["counted"], report["predicted"]
    topo = report["topology"]
    lines = [f"{topo['kind']} on {topo['world_size']} ranks, {topo['nodes']} node(s); token "
             f"dispatcher {report['dispatcher']}; bytes per rank per step (mean over ranks)",
             f"{'collective':<16}{'counted':>14}{'predicted':>14}{'cross-node':>14}"
             f"{'predicted':>14}{'calls':>7}{'predicted':>10}"]
    for op in sorted(set(counted) | set(predicted)):
        c, p = counted.get(op, {}), predicted.get(op, {})
        lines.append(f"{op:<16}{c.get('bytes', 0):>14,}{p.get('bytes', 0):>14,}"
                     f"{c.get('cross_node_bytes', 0):>14,}{p.get('cross_node_bytes', 0):>14,}"
                     f"{c.get('calls', 0):>7}{p.get('calls', 0):>10}")
    lines.append(f"counted == predicted: {'yes' if counted == predicted else 'NO'}")
    return "\n".join(lines)


def cross_node_per_token(report: dict) -> float:
    """Bytes that crossed nodes in the whole job per token of the step (all collectives)."""
    per_rank = sum(v["cross_node_bytes"] for v in report["counted"].values())
    return per_rank * report["topology"]["world_size"] / report["tokens"]


def compare_line(foe: dict, moe: dict, topk: int) -> str:
    """The FoE/MoE cross-node traffic side by side with the k/N the formulas promise."""
    f, m = cross_node_per_token(foe), cross_node_per_token(moe)
    nodes = moe["topology"]["nodes"]
    ratio = f"{m / f:.2f}" if f else "inf"
    return (f"cross-node bytes per token: MoE {m:,.0f}, FoE {f:,.0f}; MoE/FoE {ratio} "
            f"(k/N = {topk}/{nodes} = {topk / nodes:.2f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="foe-bench comm (worker)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("foe_train").setLevel(logging.INFO)
    here = init_distributed()
    cfg = load_config(args.config, [*args.overrides, "model.balanced_routing=true"])
    topo = build_topology(cfg.model, cfg.parallel)
    dtype = torch.bfloat16 if here.type == "cuda" else torch.float32
    gpt = build_model(cfg.model, topo, seed=cfg.seed, dtype=dtype)
    seq = cfg.model.seq_length
    gen = torch.Generator().manual_seed(topo.token_shard)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, seq), generator=gen)
    tokens = tokens.to(here)
    position = torch.arange(seq, device=here).unsqueeze(0).expand_as(tokens)
    with CommRecorder(group_kinds=topo.group_kinds(), node_of_rank=topo.node_of_rank) as rec:
        logits = gpt(tokens, position, None)
        if args.backward:
            logits.float().logsumexp(-1).mean().backward()
    counted = {op: {k: v for k, v in vals.items() if k != "seconds"}
               for op, vals in mean_over_ranks(gather_summaries(rec, by="op")).items()}
    by_kind = gather_summaries(rec, by="op_kind")
    spans = _spans(rec, topo.world_size)
    if topo.rank == 0:
        nodes = len(set(topo.node_of_rank))
        report = {
            "counted": counted,
            "predicted": predict(
                cfg.model, cfg.parallel, topo.world_size, nodes,
                tokens_per_rank=args.micro_batch * seq,
                elem_bytes=torch.finfo(dtype).bits // 8, backward=args.backward,
            ),
            "by_kind": mean_over_ranks(by_kind),
            "collectives": spans,
            "topology": {"kind": topo.kind, "world_size": topo.world_size, "nodes": nodes},
            "dispatcher": dispatcher_name(gpt),
            "tokens": topo.token_shards * args.micro_batch * seq,
        }
        emit(report, table(report), args.json, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
