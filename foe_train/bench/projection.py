"""Projection of forward latency, TTFT and TBT of a recipe pair (FoE vs its MoE baseline) onto
a described GPU cluster: an alpha-beta model of the collectives plus a compute roofline, so the
paper-scale question ("how much faster is FoE on N nodes of 8 H100?") gets a number on machines
that have no GPU, and the emulated CPU fabric can be projected too and set against its
measurement (foe-bench latency).

Layout: the recipe's ``parallel`` section is adapted to nodes x gpus_per_node. FoE keeps
parallel.clusters C and picks the largest ranks_per_cluster L that keeps each cluster inside a
node (L divides the GPUs per node, the C*L ranks per replica and the E/C experts of a cluster),
the rest is data parallel (D = world/(C*L)): C = 8 on 4 nodes x 8 GPUs gives L = 4, D = 1; on
one node L = 1. The baseline runs EP over every GPU with data-parallel attention.

Metrics, per rank, the slowest being any rank (the layouts are symmetric):
- forward: one full forward over the rank's prompts (no cache), logits for every position;
- ttft: the prefill (the same forward, also writing K/V into the cache) that yields token 1;
- tbt: one decode step, one new token per sequence, against a cache of the prompt length;
- generate: ttft plus the gen_len - 1 decode steps, each priced at its own cache length.
Each is compute + communication (no overlap of the two).

Communication: bytes, cross-node bytes and calls per collective come from bench.comm_model
(DESIGN §3 as code), never re-derived here; time = calls * alpha(scope) +
intra_bytes / beta_intra + cross_bytes / beta_inter, the scope being inter-node when any of the
op's bytes cross nodes. alpha/beta are the cluster description's per scope, or per collective
where it has them (``per_op``: what a calibration on the emulated fabric fits, see
bench.collectives). comm_model's byte counts are means over ranks, so a node's inter-node
traffic is taken as spread evenly over its GPUs' NICs (beta_inter is per GPU), as NCCL's
multi-channel rings approach.

Compute: per rank and per component (attention, router, experts, dense MLP, output layer),
roofline max(FLOPs / peak_flops, bytes / memory_bandwidth), summed over layers. Simplifications:
- matmul FLOPs only (2 per multiply-add); attention scores and values 4*d_h FLOPs per query-key
  pair per head, causal (a prefill of n tokens has n(n+1)/2 pairs per head);
- bytes are the weights the rank touches once per pass plus the K/V cache it reads and writes;
  activations stay on chip (fused kernels), norms, embedding lookups, softmax and sampling are
  free;
- routing is balanced (as bench.comm_model assumes): each rank's experts receive tokens*k copies
  and a pass touches min(local experts, copies) of them;
- FoE splits the embedding and output layer over the federation's vocabulary (as
  foe_train.model.head builds it): every FoE rank computes V/C of the logits of its
  federation's tokens;
- a batch is split evenly over the token shards (FoE D*L, baseline one per rank) and every
  prompt of a request has the same length.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from foe_train.bench.comm_model import Link, comm_seconds, predict
from foe_train.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RecipeConfig,
    cluster_topk,
    load_config,
)
from foe_train.topology import Grid, check_layout, consecutive_nodes, expert_parallel_size

METRICS = ("forward", "ttft", "tbt", "generate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scopes(_Strict):
    """The links of one collective, where it runs unlike the others (a calibration's fit)."""

    intra_node: Link
    inter_node: Link


class Hardware(_Strict):
    """A cluster description (configs/hardware/*.yaml), per GPU. per_op: links of single
    collectives (all_reduce, all_to_all, all_gather) where they differ from the scope's."""

    name: str = "cluster"
    gpus_per_node: int = Field(gt=0)
    intra_node: Link
    inter_node: Link
    per_op: dict[str, Scopes] = {}
    peak_flops: float = Field(gt=0, description="dense FLOP/s at elem_bytes precision")
    memory_bandwidth: float = Field(gt=0, description="bytes/s")
    elem_bytes: int = Field(default=2, gt=0)

    def links(self, op: str) -> tuple[Link, Link]:
        """(intra-node, inter-node) links one collective runs at."""
        scopes = self.per_op.get(op, self)
        return scopes.intra_node, scopes.inter_node


def _scopes(fitted: dict) -> dict[str, Link]:
    return {s: Link(latency=fitted[s]["alpha"], bandwidth=fitted[s]["beta"])
            for s in ("intra_node", "inter_node")}


def load_hardware(path: str | Path, calibration: str | Path | None = None) -> Hardware:
    """A hardware YAML, its links replaced by a calibration's fitted alpha/beta when given
    (pooled per scope, and per collective where the calibration fitted one)."""
    hw = load_config(path, schema=Hardware)
    if calibration is None:
        return hw
    try:
        fitted = json.loads(Path(calibration).read_text())
        update = {**_scopes(fitted), "per_op": {
            op: Scopes(**_scopes(scopes)) for op, scopes in fitted.get("ops", {}).items()}}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--calibration: cannot read fitted alpha/beta from {calibration} "
                          f"({exc}); pass the JSON written by --calibrate") from None
    return hw.model_copy(update=update)


def adapt_parallel(cfg: RecipeConfig, nodes: int, gpus_per_node: int) -> ParallelConfig:
    """The recipe's parallel section refitted to nodes x gpus_per_node (module docstring);
    refuses a layout the model cannot run on, in one line."""
    world, model = nodes * gpus_per_node, cfg.model
    if model.kind == "moe":
        parallel = ParallelConfig(data=world)
    else:
        C = cfg.parallel.clusters
        if world % C:
            raise ConfigError(f"parallel.clusters={C} does not divide the {world} GPUs of "
                              f"{nodes} node(s) x {gpus_per_node}; pick another node count")
        per_replica = world // C
        experts = model.num_experts // C
        L = max(l for l in range(1, per_replica + 1)
                if per_replica % l == 0 and gpus_per_node % l == 0 and experts % l == 0)
        parallel = ParallelConfig(data=per_replica // L, clusters=C, ranks_per_cluster=L)
    try:
        check_layout(model, parallel, world, consecutive_nodes(world, nodes))
    except ConfigError as exc:
        raise ConfigError(f"{model.kind} on {nodes} node(s) x {gpus_per_node} GPUs: "
                          f"{exc}") from None
    return parallel


def token_shards(model: ModelConfig, parallel: ParallelConfig, world: int) -> int:
    """How many ways the batch is split (FoE D*L, the baseline one shard per rank)."""
    return Grid.of(model.kind, parallel, world, [0] * world).token_shards


@dataclass(frozen=True)
class Pass:
    """One forward pass on a rank: `seqs` sequences each adding `new` tokens after `past`
    cached ones; `cache` says whether the new tokens' K/V are written to the cache."""

    seqs: int
    new: int
    past: int
    cache: bool

    @property
    def tokens(self) -> int:
        return self.seqs * self.new


def compute_seconds(model: ModelConfig, parallel: ParallelConfig, world: int, step: Pass,
                    hw: Hardware) -> dict[str, float]:
    """Roofline seconds per component (summed over layers) of one pass on one rank."""
    d, b = model.hidden_size, hw.elem_bytes
    dh = d // model.num_attention_heads
    if model.kind == "foe":
        C, k = parallel.clusters, cluster_topk(model, parallel.clusters)
        pool = model.num_experts // C
        local = pool // parallel.ranks_per_cluster
    else:
        C, k, pool = 1, model.moe_router_topk, model.num_experts
        local = pool // expert_parallel_size(parallel, world)
    heads, groups = model.num_attention_heads // C, model.num_query_groups // C
    fc = 3 if model.swiglu else 2  # (gate,) up, down
    tokens = step.tokens
    moe_layers = sum(model.layer_is_moe(i) for i in range(model.num_layers))

    def roof(flops: float, nbytes: float) -> float:
        return max(flops / hw.peak_flops, nbytes / hw.memory_bandwidth)

    attn_w = d * (heads + 2 * groups) * dh + heads * dh * d
    pairs = step.seqs * (step.new * step.past + step.new * (step.new + 1) / 2)
    kv = step.seqs * (step.past + (step.new if step.cache else 0))
    expert_w = fc * model.moe_ffn_hidden_size * d
    copies = tokens * k
    dense_w = fc * (model.ffn_hidden_size // C) * d
    output_w = model.vocab_size // C * d
    return {
        "attention": model.num_layers * roof(2 * tokens * attn_w + 4 * dh * heads * pairs,
                                             (attn_w + 2 * groups * dh * kv) * b),
        "router": moe_layers * roof(2 * tokens * pool * d, pool * d * b),
        "experts": moe_layers * roof(2 * copies * expert_w, min(local, copies) * expert_w * b),
        "dense": (model.num_layers - moe_layers) * roof(2 * tokens * dense_w, dense_w * b),
        "output": roof(2 * tokens * output_w, output_w * b),
    }


def comm_breakdown(model: ModelConfig, parallel: ParallelConfig, world: int, nodes: int,
                   tokens: int, hw: Hardware) -> dict[str, float]:
    """Seconds per collective of one forward pass on `tokens` tokens per rank, the volume
    from bench.comm_model.predict."""
    traffic = predict(model, parallel, world, nodes, tokens, hw.elem_bytes, backward=False)
    return {op: comm_seconds(v["calls"], v["bytes"], v["cross_node_bytes"], *hw.links(op))
            for op, v in traffic.items()}


def _phase(model: ModelConfig, parallel: ParallelConfig, world: int, nodes: int, step: Pass,
           hw: Hardware) -> dict[str, Any]:
    compute = compute_seconds(model, parallel, world, step, hw)
    comm = comm_breakdown(model, parallel, world, nodes, step.tokens, hw)
    return {"seconds": sum(compute.values()) + sum(comm.values()), "compute": compute,
            "comm": comm}


def project_member(cfg: RecipeConfig, hw: Hardware, nodes: int, batch: int, prompt_len: int,
                   gen_len: int) -> dict[str, Any]:
    """Metrics (seconds) of one recipe serving `batch` prompts of prompt_len tokens."""
    model = cfg.model
    parallel = adapt_parallel(cfg, nodes, hw.gpus_per_node)
    world = nodes * hw.gpus_per_node
    shards = token_shards(model, parallel, world)
    if batch % shards:
        raise ConfigError(f"--batch {batch}: not divisible by the {shards} token shards of "
                          f"{model.kind} on {world} GPUs; use a multiple of {shards}")
    if prompt_len + gen_len > model.seq_length:
        raise ConfigError(f"--prompt-len {prompt_len} + --gen-len {gen_len} exceed "
                          f"model.seq_length={model.seq_length}; shorten them")
    seqs = batch // shards
    forward = _phase(model, parallel, world, nodes, Pass(seqs, prompt_len, 0, False), hw)
    ttft = _phase(model, parallel, world, nodes, Pass(seqs, prompt_len, 0, True), hw)
    steps = [_phase(model, parallel, world, nodes, Pass(seqs, 1, prompt_len + i, True), hw)
             for i in range(gen_len - 1)]
    tbt = _phase(model, parallel, world, nodes, Pass(seqs, 1, prompt_len, True), hw)
    layout = ({"data": parallel.data, "clusters": parallel.clusters,
               "ranks_per_cluster": parallel.ranks_per_cluster} if model.kind == "foe"
              else {"expert_parallel": expert_parallel_size(parallel, world)})
    return {
        "layout": {**layout, "token_shards": shards, "seqs_per_rank": seqs},
        "forward": forward["seconds"], "ttft": ttft["seconds"], "tbt": tbt["seconds"],
        "generate": ttft["seconds"] + sum(s["seconds"] for s in steps),
        "breakdown": {"forward": forward, "ttft": ttft, "tbt": tbt},
    }


def _mean(trees: list[Any]) -> Any:
    """Element-wise mean of equally shaped nested dicts of numbers (other leaves: the first)."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _mean([t[key] for t in trees]) for key in first}
    if isinstance(first, float):
        return sum(trees) / len(trees)
    return first


def project_pair(cfgs: tuple[RecipeConfig, RecipeConfig], names: tuple[str, str],
                 hw: Hardware, nodes: int, batch: int | None, prompt_lens: list[int],
                 gen_len: int) -> dict[str, Any]:
    """One row: both members' metrics averaged over the prompt lengths (one request each) and
    the ratio B/A per metric (> 1: A is faster). batch None: one sequence per GPU."""
    world = nodes * hw.gpus_per_node
    batch = batch or world
    row: dict[str, Any] = {"nodes": nodes, "world_size": world, "batch": batch,
                           "gen_len": gen_len, "prompt_lens": prompt_lens,
                           "mean_prompt_len": sum(prompt_lens) / len(prompt_lens)}
    for name, cfg in zip(names, cfgs, strict=True):
        row[name] = _mean([project_member(cfg, hw, nodes, batch, s, gen_len)
                           for s in prompt_lens])
    a, b = names
    row["ratio"] = {m: row[b][m] / row[a][m] for m in METRICS}
    return row


def format_table(rows: list[dict[str, Any]], names: tuple[str, str], hw: Hardware) -> str:
    """The projected metrics in ms, B/A per metric, and where each member's time goes."""
    a, b = names
    lines = [f"cluster {hw.name}: {hw.gpus_per_node} GPUs/node; intra-node "
             f"{hw.intra_node.bandwidth / 1e9:g} GB/s {hw.intra_node.latency * 1e6:g} us, "
             f"inter-node {hw.inter_node.bandwidth / 1e9:g} GB/s "
             f"{hw.inter_node.latency * 1e6:g} us; {hw.peak_flops / 1e12:g} TFLOP/s, "
             f"{hw.memory_bandwidth / 1e9:g} GB/s memory, {hw.elem_bytes} B/element",
             f"{'nodes':>5} {'gpus':>4} {'batch':>5} {'prompt':>7}  {'metric':<8} "
             f"{a + ' ms':>11} {b + ' ms':>11} {b + '/' + a:>9}"]
    for row in rows:
        for i, metric in enumerate(METRICS):
            head = (f"{row['nodes']:>5} {row['world_size']:>4} {row['batch']:>5} "
                    f"{row['mean_prompt_len']:>7.0f}" if i == 0 else " " * 24)
            lines.append(f"{head}  {metric:<8} {row[a][metric] * 1e3:>11.3f} "
                         f"{row[b][metric] * 1e3:>11.3f} {row['ratio'][metric]:>9.2f}")
        for name in names:
            layout = " ".join(f"{k}={v}" for k, v in row[name]["layout"].items())
            parts = []
            for phase in ("ttft", "tbt"):
                br = row[name]["breakdown"][phase]
                comm = ", ".join(f"{op} {s * 1e3:.3f}" for op, s in br["comm"].items())
                parts.append(f"{phase} compute {sum(br['compute'].values()) * 1e3:.3f} "
                             f"comm {sum(br['comm'].values()) * 1e3:.3f} ({comm or 'none'})")
            lines.append(f"{'':>26}{name}: {layout}; " + "; ".join(parts) + " ms")
    if len(rows[0]["prompt_lens"]) > 1:
        lines.append(f"prompt: mean of {len(rows[0]['prompt_lens'])} LongBench-shaped "
                     f"requests, each metric averaged over them")
    return "\n".join(lines)


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _calibrate(args: argparse.Namespace) -> None:
    """Run the collective micro-benchmarks on emulated nodes, fit, print, write."""
    from foe_train.bench.collectives import calibrate
    from launch.netns import NetnsError

    nodes = args.nodes[0] if args.nodes else 2
    try:
        result = calibrate(nodes, args.nproc, args.link_rate)
    except NetnsError as exc:
        _fail(str(exc))
    for p in result["points"]:
        print(f"{p['op']:<10} {p['scope']:<10} {p['size']:>8} B  measured "
              f"{p['seconds'] * 1e3:9.3f} ms  fitted {p['fitted_seconds'] * 1e3:9.3f} ms")
    for name, fitted in [("pooled", result), *result["ops"].items()]:
        print(f"{name:<10} " + "; ".join(
            f"{s}: alpha {fitted[s]['alpha'] * 1e6:.0f} us, beta {fitted[s]['beta'] / 1e6:.1f} MB/s"
            for s in ("intra_node", "inter_node")))
    fitted_range = ", ".join(f"{s} >= {b} B" for s, b in result["min_bytes"].items())
    print(f"max relative error {result['max_error']:.3f} on the fitted points (the smallest "
          f"size, {fitted_range}); {result['max_error_all_sizes']:.3f} on every point; "
          f"{result['max_error_pooled']:.3f} with the pooled alpha/beta per scope")
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    if args.hardware_out:
        Path(args.hardware_out).write_text(hardware_yaml(result))
    if args.json:
        print(text)


def hardware_yaml(result: dict) -> str:
    """A configs/hardware YAML describing the emulated fabric a calibration measured."""
    import yaml

    ranks, compute = result["ranks_per_node"], result["compute"]

    def links(fitted: dict) -> dict:
        return {s: {"bandwidth": float(f"{fitted[s]['beta']:.4g}"),
                    "latency": float(f"{fitted[s]['alpha']:.4g}")}
                for s in ("intra_node", "inter_node")}

    body = {
        "name": f"emulated-{result['nodes']}x{ranks}-{result['link_rate']}",
        "gpus_per_node": ranks,
        **links(result),
        "per_op": {op: links(fitted) for op, fitted in result["ops"].items()},
        "peak_flops": float(f"{compute['peak_flops']:.4g}"),
        "memory_bandwidth": float(f"{compute['memory_bandwidth']:.4g}"),
        "elem_bytes": 4,
    }
    head = (f"# Emulated CPU fabric: {result['nodes']} network-namespace nodes x {ranks} gloo "
            f"ranks, link capped at\n# {result['link_rate']} (HTB). Fitted by `foe-bench project "
            f"--calibrate`: max relative error {result['max_error']:.2f}\n# on the fitted "
            f"points, {result['max_error_all_sizes']:.2f} on every point (bench.collectives). "
            f"Compute rates measured\n# with every rank busy at once (fp32 matmul, tensor "
            f"copy). Bandwidths in bytes/s, latencies in s.\n")
    return head + yaml.safe_dump(body, sort_keys=False)


def _prompt_lens(args: argparse.Namespace, cfg: RecipeConfig) -> list[int]:
    if args.prompt_len:
        return [args.prompt_len]
    from foe_train.bench.workload import prompt_lengths

    tokenizer = None
    if args.longbench_dir:
        from foe_train.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    return prompt_lengths(args.requests, cfg.model.seq_length - args.gen_len, args.seed,
                          source=args.longbench_dir, tokenizer=tokenizer)


def project_main(argv: list[str] | None = None) -> None:
    """foe-bench project --pair A.yaml B.yaml --cluster HW.yaml --nodes 1 [4 ...] [--batch B]
    [--prompt-len S | --requests N [--longbench-dir DIR]] [--gen-len G]
    [--calibration FIT.json] [--json] [key=value ...]
    foe-bench project --calibrate --link-rate 1gbit [--nodes 2 --nproc 4] [--out FIT.json]
    [--hardware-out HW.yaml]"""
    ap = argparse.ArgumentParser(prog="foe-bench project")
    ap.add_argument("--pair", nargs=2, metavar=("A.yaml", "B.yaml"))
    ap.add_argument("--cluster", help="hardware description (configs/hardware/*.yaml)")
    ap.add_argument("--nodes", type=int, nargs="+", action="extend",
                    help="node counts to project (repeatable); with --calibrate: emulated nodes")
    ap.add_argument("--batch", type=int, help="prompts per request (default: one per GPU)")
    ap.add_argument("--prompt-len", type=int,
                    help="fixed prompt length (default: LongBench-shaped lengths)")
    ap.add_argument("--requests", type=int, default=32,
                    help="LongBench-shaped requests averaged when no --prompt-len")
    ap.add_argument("--longbench-dir", help="local LongBench *.jsonl files to draw prompts from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--calibration", help="fitted alpha/beta JSON replacing the cluster links")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the JSON report (or the calibration) here")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure collectives on emulated nodes and fit alpha/beta")
    ap.add_argument("--link-rate", default="1gbit", help="emulated inter-node link cap")
    ap.add_argument("--nproc", type=int, default=4, help="ranks of the calibration run")
    ap.add_argument("--hardware-out", help="with --calibrate: write a hardware YAML here")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for both recipes")
    args = ap.parse_args(argv)
    if args.calibrate:
        _calibrate(args)
        return
    if not args.pair or not args.cluster:
        _fail("--pair A.yaml B.yaml and --cluster HW.yaml are required (or pass --calibrate)")
    try:
        hw = load_hardware(args.cluster, args.calibration)
        cfgs = tuple(load_config(path, args.overrides) for path in args.pair)
        names = [c.model.kind for c in cfgs]
        if names[0] == names[1]:
            names[1] += "-b"
        prompt_lens = _prompt_lens(args, cfgs[0])
        rows = [project_pair(cfgs, tuple(names), hw, n, args.batch, prompt_lens, args.gen_len)
                for n in args.nodes or [1]]
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    report = {"cluster": hw.model_dump(), "calibration": args.calibration, "rows": rows}
    text = json.dumps(report, indent=1)
    print(text if args.json else format_table(rows, tuple(names), hw))
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    project_main(sys.argv[1:])
