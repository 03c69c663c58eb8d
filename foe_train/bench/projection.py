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

Metrics, of the slowest rank (the layouts are symmetric but for the expert load, below):
- forward: one full forward over the rank's prompts (no cache), logits for every position;
- ttft: the prefill (the same forward, also writing K/V into the cache) that yields token 1;
- tbt: one decode step, one new token per sequence, against a cache of the prompt length;
- generate: ttft plus the gen_len - 1 decode steps, each priced at its own cache length.
Each is compute + communication + host synchronisations (none overlapping).

Communication: bytes, cross-node bytes and calls per collective come from bench.comm_model
(DESIGN §3 as code), never re-derived here; time = ((calls * alpha(scope))^p + transfer^p)^(1/p)
with transfer = intra_bytes / beta_intra + cross_bytes / beta_inter and p the link's overlap
(1 for described links: the plain alpha-beta sum; fitted on the emulated fabric, where the
latency floor and the transfer overlap), the scope being inter-node when any of the op's bytes
cross nodes (comm_model.comm_seconds). alpha/beta are the cluster description's per scope, or
per collective where it has them (``per_op``: what a calibration on the emulated fabric fits, see
bench.collectives; on H100 nodes the all-reduce, which NVLink SHARP runs faster than the other
collectives). beta is the bus bandwidth: what a collective's counted bytes per rank divide by.
comm_model's byte counts are means over ranks, so a node's inter-node traffic is taken as spread
evenly over its GPUs' NICs (beta_inter is per GPU), as NCCL's multi-channel rings approach.

Compute: per rank and per component, roofline max(FLOPs / peak_flops, bytes /
memory_bandwidth), summed over layers. FLOPs are matmul FLOPs only (2 per multiply-add;
attention scores and values 4*d_h per query-key pair per head, causal: a prefill of n tokens
has n(n+1)/2 pairs per head). Bytes are the weights the rank touches once per pass plus its
activation traffic, counted per operation with no fusion: every operation reads its inputs
from memory and writes its outputs (elements per token of the rank, times elem_bytes; T the
rank's tokens, h/g/d_h its query heads, KV heads and head dim, f its expert or MLP width, fc
3 with SwiGLU else 2):
- attention: QKV matmul d in, (h+2g)d_h out; RoPE on Q and K (h+g)d_h in and out; with a
  cache, the new K/V copied in (2g*d_h in and out); core attention reads Q and the K/V of every
  key it attends (past + new) and writes h*d_h (flash attention: the scores stay on chip);
  output matmul h*d_h in, d out;
- router: d in, E/C logits out; top-k reads the logits and writes dense probabilities and
  routing map (3 E/C);
- experts, per routed copy: fc1 d in, (fc-1)f out; activation (fc-1)f in, f out; fc2 f in, d
  out. The dense MLP the same per token; the output layer d in, V/C logits out, for every
  position in a forward but only each sequence's last one with a cache (megatron's static
  inference context materialises only the last position's logits, which is what foe-train's
  generation and foe-bench latency run);
- elementwise (memory-bound, no FLOPs counted): two norms (d in, d out) and two residual
  adds (2d in, d out) per layer, the embedding and final norm once. FoE adds the residual inside
  its federated sums (the first member adds it to its term, model.layer), so the slowest,
  first member makes one add per sum: in post_attention mode the term of layer 0 (h + a_c)
  and the fold after the last layer (h + m_c); in between, the pending MoE output m_c is added
  to the stream (s_c = h + m_c) and the term is a_c + s_c (m_c travels to the next layer as a
  tensor of its own: nothing is concatenated); every federated sum reads d and writes d. FoE's
  fold, its sum and the final norm run on the positions the head reads (with a cache, one per
  sequence: the last layer hands the head only those), the baseline's on every token;
- dispatch: megatron's permute (each copy read and written) and unpermute (copies in, tokens
  out); alltoall: the all-to-all buffers (sent copies read, received written, and back) when
  P > 1 and the sort of received copies by local expert when a rank has several; allgather:
  the P*T gathered tokens written and the P*T-token combine buffer the reduce-scatter reads.
An FoE rank holds every token of its federation's shard (C clusters share one), the baseline
rank only its own: for the same matmul FLOPs it reads and writes about C times the activations.
Not counted: the loss, sampling, the probability scaling of expert outputs, launch gaps.
Other simplifications:
- routing load: the slowest rank's experts receive `imbalance` (max over ranks / mean, from
  a foe-bench latency report or given; 1 = balanced, as bench.comm_model assumes) times the
  mean T*k copies and touch min(local experts, copies) of them; the alltoall dispatcher's
  token bytes scale with it (the all-to-all waits for its most loaded rank), the allgather
  dispatcher's gathers and reduce-scatter do not (fixed-size buffers whatever the routing);
- host synchronisations: megatron's dispatchers block the host on the device a fixed number of
  times per MoE layer (HOST_SYNCS), each costing the cluster's host_sync_latency;
- FoE splits the embedding and output layer over the federation's vocabulary (as
  foe_train.model.head builds it): every FoE rank computes V/C of the logits of its
  federation's tokens;
- a batch is split evenly over the token shards (FoE D*L, baseline one per rank) and every
  prompt of a request has the same length.

Measured against projected (``--measured LATENCY.json``): every row of a foe-bench latency
report is projected on the described cluster at the layout the report says it ran (its
``members[name].parallel``; the recipes' own parallel section when the report predates it), with
that row's measured imbalance, and the MoE/FoE ratios and each member's times are set side by
side, with the paper's ratios for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from foe_train.arguments import OneLineParser, at_least, fail, link_rate
from foe_train.bench.comm_model import Link, comm_seconds, federated_sums, predict
from foe_train.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RecipeConfig,
    cluster_topk,
    load_config,
)
from foe_train.topology import (
    Grid,
    check_layout,
    consecutive_nodes,
    dispatcher_run,
    expert_parallel_size,
    token_dispatcher,
)

METRICS = ("forward", "ttft", "tbt", "generate")
MEASURED = ("forward", "ttft", "tbt")
# The paper's MoE/FoE speedups (forward latency, TTFT, TBT), printed beside measured ratios.
PAPER_RATIOS = {"forward": 5.2, "ttft": 3.62, "tbt": 1.95}
# Device->host synchronisations that block on queued work, per MoE layer forward, in
# megatron-core 0.16.1 as we configure it (no token drop or padding, no TP, moe_permute_fusion
# and moe_router_fusion False, so permute is the unfused moe_utils.permute):
# - alltoall: permute's two masked_selects (moe_utils.py:369 token indices, :372 probabilities)
#   size their output by the routing map, a sync each. The split sizes' non-blocking copies
#   (_maybe_dtoh_and_synchronize, token_dispatcher.py:862) are waited for once (:899; before
#   the all-to-all when P > 1, else before sorting by expert or returning), but by then those
#   masked_selects have drained the queue the copies wait on, so that wait costs nothing.
# - allgather: tokens_per_expert .cpu() (token_dispatcher.py:295), permute's masked_select
#   (moe_utils.py:369), the local probabilities' masked_select (token_dispatcher.py:304).
# - single-rank (foe_train.model.dispatcher, in place of allgather in a group of one rank): its
#   tokens_per_expert .cpu() only; the permutation's size is known (nonzero_static).
# The routers (router.py, topk_routing_with_score_function) and experts (tolist of an
# already-CPU tokens_per_expert, experts.py:645/910) add none at inference.
HOST_SYNCS = {"alltoall": 2, "allgather": 3, "single-rank": 1}


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
    host_sync_latency: float = Field(
        default=0.0, ge=0,
        description="seconds one device->host synchronisation costs (the drained queue's "
                    "exposed launch latency); 0 on CPUs, which have no device queue")

    def links(self, op: str) -> tuple[Link, Link]:
        """(intra-node, inter-node) links one collective runs at."""
        scopes = self.per_op.get(op, self)
        return scopes.intra_node, scopes.inter_node


def _scopes(fitted: dict) -> dict[str, Link]:
    """The fitted links of one collective (or pooled); a fit without an overlap (older
    calibrations) prices as plain alpha-beta."""
    return {s: Link(latency=fitted[s]["alpha"], bandwidth=fitted[s]["beta"],
                    overlap=fitted[s].get("overlap", 1.0))
            for s in ("intra_node", "inter_node")}


def load_hardware(path: str | Path, calibration: str | Path | None = None) -> Hardware:
    """A hardware YAML, its links replaced by a calibration's fitted alpha, beta and overlap
    when given (pooled per scope, and per collective where the calibration fitted one)."""
    try:
        hw = load_config(path, schema=Hardware)
    except ConfigError as exc:
        raise ConfigError(f"--cluster {path}: {exc}") from None
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

    @property
    def read_by_head(self) -> int:
        """Positions whose logits are materialised: every one in a forward, each sequence's
        last with a cache (megatron's static inference context)."""
        return self.seqs if self.cache else self.tokens


@dataclass(frozen=True)
class ExpertGroup:
    """What a rank's MoE layers work with: C clusters sharing its tokens, k experts picked per
    token from a pool (a cluster's E/C, or all E), P expert-parallel ranks, megatron's
    dispatcher (chosen as foe_train.model.builder does)."""

    clusters: int
    topk: int
    pool: int
    ranks: int
    dispatcher: str

    @property
    def local(self) -> int:
        return self.pool // self.ranks


def expert_group(model: ModelConfig, parallel: ParallelConfig, world: int) -> ExpertGroup:
    """The expert group of one rank of either kind."""
    if model.kind == "foe":
        C, k, P = parallel.clusters, cluster_topk(model, parallel.clusters), \
            parallel.ranks_per_cluster
    else:
        C, k, P = 1, model.moe_router_topk, expert_parallel_size(parallel, world)
    dispatcher = dispatcher_run(token_dispatcher(model, P, k), P)
    return ExpertGroup(C, k, model.num_experts // C, P, dispatcher)


def host_syncs(model: ModelConfig, group: ExpertGroup) -> int:
    """Device->host synchronisations of one forward pass: megatron's dispatcher in every MoE
    layer (HOST_SYNCS), whatever the token count."""
    return HOST_SYNCS[group.dispatcher] * sum(model.layer_is_moe(i)
                                              for i in range(model.num_layers))


def elementwise_elements(model: ModelConfig, clusters: int) -> tuple[int, int]:
    """Elements one pass's norms, residual adds, FoE's pending MoE state and federated sums
    read and write (module docstring), summed over layers: (per token, per position the head
    reads). FoE's fold after the last layer and its final norm run on the head's positions
    only; the baseline's whole last layer and final norm run on every token."""
    n, d = model.num_layers, model.hidden_size
    if model.kind != "foe":
        # 2 norms (d in, d out) and 2 residual adds (2d in, d out) per layer; embedding and
        # final norm 2d each
        return (10 * n + 4) * d, 0
    sums = federated_sums(model, backward=False) if clusters > 1 else (0, 0, 0, 0)
    layer_sums, head_sums, _, flat_sums = sums
    if model.residual_sync == "post_attention":
        # 2 norms (4d); layer 0's term h + a_c (3d); after it s_c = h + m_c and a_c + s_c (6d)
        stream = 4 * n + 3 + 6 * (n - 1)
    else:
        stream = 10 * n - 3  # 2 norms and 2 residual adds, the last one the fold's
    # every sum reads d and writes d; the embedding 2d; at the head, the fold adds h (3d) and
    # the final norm 2d
    return (stream + 2 * (layer_sums + flat_sums) + 2) * d, (3 + 2 * head_sums + 2) * d


def dispatch_elements(group: ExpertGroup, tokens: int, imbalance: float) -> float:
    """Per MoE layer, hidden-size rows megatron's dispatcher reads and writes on the slowest
    rank, which receives `imbalance` times the mean copies (multiply by d)."""
    sent, received, P = tokens * group.topk, tokens * group.topk * imbalance, group.ranks
    if group.dispatcher in ("allgather", "single-rank"):
        # permute (copies in and out), unpermute into the P*T-token buffer; gather and
        # reduce-scatter each read one size and write the other when P > 1
        return 3 * received + P * tokens + (2 * tokens + 2 * P * tokens if P > 1 else 0)
    return (3 * sent + tokens  # permute (copies in and out), unpermute (copies in, tokens out)
            + (2 * (sent + received) if P > 1 else 0)  # all-to-all buffers, both ways
            + (4 * received if group.local > 1 else 0))  # sort by local expert and back


def compute_seconds(model: ModelConfig, parallel: ParallelConfig, world: int, step: Pass,
                    hw: Hardware, imbalance: float = 1.0) -> dict[str, float]:
    """Roofline seconds per component (summed over layers) of one pass on the slowest rank,
    whose experts receive `imbalance` times the mean load (module docstring: what counts)."""
    d = model.hidden_size
    dh = d // model.num_attention_heads
    group = expert_group(model, parallel, world)
    C, k, pool = group.clusters, group.topk, group.pool
    heads, groups = model.num_attention_heads // C, model.num_query_groups // C
    fc = 3 if model.swiglu else 2  # (gate,) up, down
    expert_f, dense_f, vocab = model.moe_ffn_hidden_size, model.ffn_hidden_size // C, \
        model.vocab_size // C
    tokens = step.tokens
    logits = step.read_by_head
    moe_layers = sum(model.layer_is_moe(i) for i in range(model.num_layers))
    per_token, per_head = elementwise_elements(model, C)

    def roof(flops: float, elements: float) -> float:
        return max(flops / hw.peak_flops, elements * hw.elem_bytes / hw.memory_bandwidth)

    attn_w = d * (heads + 2 * groups) * dh + heads * dh * d
    pairs = step.seqs * (step.new * step.past + step.new * (step.new + 1) / 2)
    keys = step.seqs * (step.past + step.new)  # K/V entries the core attention reads
    attn_act = (tokens * (2 * d + (6 * heads + 4 * groups) * dh
                          + (4 * groups * dh if step.cache else 0))
                + 2 * groups * dh * keys)
    expert_w = fc * expert_f * d
    copies = tokens * k * imbalance
    dense_w = fc * dense_f * d
    return {
        "attention": model.num_layers * roof(2 * tokens * attn_w + 4 * dh * heads * pairs,
                                             attn_w + attn_act),
        "router": moe_layers * roof(2 * tokens * pool * d, pool * d + tokens * (d + 4 * pool)),
        "experts": moe_layers * roof(2 * copies * expert_w, min(group.local, copies) * expert_w
                                     + 2 * copies * (d + fc * expert_f)),
        "dense": (model.num_layers - moe_layers) * roof(
            2 * tokens * dense_w, dense_w + 2 * tokens * (d + fc * dense_f)),
        "output": roof(2 * logits * vocab * d, vocab * d + logits * (d + vocab)),
        "elementwise": roof(0, tokens * per_token + logits * per_head),
        "dispatch": moe_layers * roof(0, dispatch_elements(group, tokens, imbalance) * d),
    }


def comm_breakdown(model: ModelConfig, parallel: ParallelConfig, world: int, nodes: int,
                   tokens: int, hw: Hardware, imbalance: float = 1.0,
                   head_tokens: int | None = None) -> dict[str, float]:
    """Seconds per collective of one forward pass on `tokens` tokens per rank, `head_tokens`
    of them read by the head (None: all), the volume from bench.comm_model.predict; the
    all-to-all's bytes times the slowest rank's expert load (it waits for the rank that
    receives the most)."""
    traffic = predict(model, parallel, world, nodes, tokens, hw.elem_bytes, backward=False,
                      head_tokens=head_tokens)
    seconds = {}
    for op, v in traffic.items():
        scale = imbalance if op == "all_to_all" else 1.0
        seconds[op] = comm_seconds(v["calls"], v["bytes"] * scale,
                                   v["cross_node_bytes"] * scale, *hw.links(op))
    return seconds


def _phase(model: ModelConfig, parallel: ParallelConfig, world: int, nodes: int, step: Pass,
           hw: Hardware, imbalance: float) -> dict[str, Any]:
    compute = compute_seconds(model, parallel, world, step, hw, imbalance)
    comm = comm_breakdown(model, parallel, world, nodes, step.tokens, hw, imbalance,
                          step.read_by_head)
    syncs = host_syncs(model, expert_group(model, parallel, world))
    sync_seconds = syncs * hw.host_sync_latency
    return {"seconds": sum(compute.values()) + sum(comm.values()) + sync_seconds,
            "compute": compute, "comm": comm, "host_syncs": syncs,
            "host_sync_seconds": sync_seconds}


def project_member(cfg: RecipeConfig, hw: Hardware, nodes: int, batch: int, prompt_len: int,
                   gen_len: int, imbalance: float = 1.0,
                   parallel: ParallelConfig | None = None) -> dict[str, Any]:
    """Metrics (seconds) of one recipe serving `batch` prompts of prompt_len tokens, its
    slowest rank's experts loaded `imbalance` times the mean; at `parallel` (a layout a
    measurement ran) or the recipe's layout refitted to the cluster (adapt_parallel)."""
    model = cfg.model
    world = nodes * hw.gpus_per_node
    if parallel is None:
        parallel = adapt_parallel(cfg, nodes, hw.gpus_per_node)
    else:
        try:
            check_layout(model, parallel, world, consecutive_nodes(world, nodes))
        except ConfigError as exc:
            raise ConfigError(f"{model.kind} at the measured layout: {exc}") from None
    if expert_group(model, parallel, world).ranks == 1:
        imbalance = 1.0  # one rank holds its group's experts: it receives every copy
    shards = token_shards(model, parallel, world)
    if batch % shards:
        raise ConfigError(f"--batch {batch}: not divisible by the {shards} token shards of "
                          f"{model.kind} on {world} GPUs; use a multiple of {shards}")
    if prompt_len + gen_len > model.seq_length:
        raise ConfigError(f"--prompt-len {prompt_len} + --gen-len {gen_len} exceed "
                          f"model.seq_length={model.seq_length}; shorten them")
    seqs = batch // shards

    def phase(step: Pass) -> dict[str, Any]:
        return _phase(model, parallel, world, nodes, step, hw, imbalance)

    forward = phase(Pass(seqs, prompt_len, 0, False))
    ttft = phase(Pass(seqs, prompt_len, 0, True))
    steps = [phase(Pass(seqs, 1, prompt_len + i, True)) for i in range(gen_len - 1)]
    tbt = phase(Pass(seqs, 1, prompt_len, True))
    layout = ({"data": parallel.data, "clusters": parallel.clusters,
               "ranks_per_cluster": parallel.ranks_per_cluster} if model.kind == "foe"
              else {"expert_parallel": expert_parallel_size(parallel, world)})
    return {
        "layout": {**layout, "token_shards": shards, "seqs_per_rank": seqs},
        "imbalance": imbalance,
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
                 gen_len: int, imbalance: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """One row: both members' metrics averaged over the prompt lengths (one request each) and
    the ratio B/A per metric (> 1: A is faster). batch None: one sequence per GPU;
    imbalance: each member's slowest-rank expert load, max/mean."""
    world = nodes * hw.gpus_per_node
    batch = batch or world
    row: dict[str, Any] = {"nodes": nodes, "world_size": world, "batch": batch,
                           "gen_len": gen_len, "prompt_lens": prompt_lens,
                           "mean_prompt_len": sum(prompt_lens) / len(prompt_lens)}
    for name, cfg, f in zip(names, cfgs, imbalance, strict=True):
        row[name] = _mean([project_member(cfg, hw, nodes, batch, s, gen_len, f)
                           for s in prompt_lens])
    a, b = names
    row["ratio"] = {m: row[b][m] / row[a][m] for m in METRICS}
    return row


def _cluster_line(hw: Hardware) -> str:
    per_op = "".join(f", {op} {s.intra_node.bandwidth / 1e9:g}/{s.inter_node.bandwidth / 1e9:g}"
                     f" GB/s intra/inter" for op, s in hw.per_op.items())
    return (f"cluster {hw.name}: {hw.gpus_per_node} GPUs/node; intra-node "
            f"{hw.intra_node.bandwidth / 1e9:g} GB/s {hw.intra_node.latency * 1e6:g} us, "
            f"inter-node {hw.inter_node.bandwidth / 1e9:g} GB/s "
            f"{hw.inter_node.latency * 1e6:g} us{per_op}; {hw.peak_flops / 1e12:g} TFLOP/s, "
            f"{hw.memory_bandwidth / 1e9:g} GB/s memory, {hw.elem_bytes} B/element, "
            f"{hw.host_sync_latency * 1e6:g} us per host sync")


def _breakdown(phase: str, br: dict[str, Any]) -> str:
    """One phase's time in ms: compute per component, comm per collective, host syncs."""
    def listed(parts: dict[str, float]) -> str:
        return ", ".join(f"{k} {v * 1e3:.3f}" for k, v in parts.items() if v) or "none"

    return (f"{phase} compute {sum(br['compute'].values()) * 1e3:.3f} "
            f"({listed(br['compute'])}) comm {sum(br['comm'].values()) * 1e3:.3f} "
            f"({listed(br['comm'])}) {br['host_syncs']} syncs {br['host_sync_seconds'] * 1e3:.3f}")


def format_table(rows: list[dict[str, Any]], names: tuple[str, str], hw: Hardware,
                 imbalance_source: str = "balanced, assumed") -> str:
    """The projected metrics in ms, B/A per metric, and where each member's time goes."""
    a, b = names
    load = ", ".join(f"{n} {rows[0][n]['imbalance']:.2f}" for n in names)
    lines = [_cluster_line(hw),
             f"expert load max/mean on the slowest rank: {load} ({imbalance_source})",
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
            lines.append(f"{'':>26}{name}: {layout}")
            lines += [f"{'':>28}{_breakdown(phase, row[name]['breakdown'][phase])} ms"
                      for phase in ("ttft", "tbt")]
    if len(rows[0]["prompt_lens"]) > 1:
        lines.append(f"prompt: mean of {len(rows[0]['prompt_lens'])} LongBench-shaped "
                     f"requests, each metric averaged over them")
    return "\n".join(lines)


def read_latency_report(path: str, flag: str) -> dict[str, Any]:
    """A foe-bench latency --json/--out report; unreadable ones refused in one line naming
    the flag."""
    try:
        report = json.loads(Path(path).read_text())
        if not isinstance(report, dict) or not report.get("rows"):
            raise ValueError("no rows")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag}: cannot read a latency report from {path} ({exc}); pass "
                          f"the JSON foe-bench latency --json/--out wrote") from None
    return report


def _measured_load(row: dict[str, Any], name: str, path: str, flag: str) -> float:
    try:
        return float(row[name]["imbalance"]["max_over_mean"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{flag}: a row of {path} has no {name}.imbalance.max_over_mean; "
                          f"rerun foe-bench latency (it records the expert load) or pass "
                          f"--imbalance") from None


def imbalance_from(path: str, names: tuple[str, str]) -> tuple[float, float]:
    """Per member, the median over a latency report's rows of the measured max/mean expert
    load. The rows differ in batch and prompt length; the median is the load a typical one
    met, where the max would charge every projection with the spread of the smallest, noisiest
    batch."""
    rows = read_latency_report(path, "--imbalance-from")["rows"]
    a, b = (statistics.median(_measured_load(row, name, path, "--imbalance-from")
                              for row in rows) for name in names)
    return a, b


def _paper_ratio(metric: str, kinds: tuple[str, str]) -> float | None:
    """The paper's MoE/FoE figure in the pair's B/A direction (None for a same-kind pair)."""
    if kinds == ("foe", "moe"):
        return PAPER_RATIOS[metric]
    return 1 / PAPER_RATIOS[metric] if kinds == ("moe", "foe") else None


def project_measured(report: dict[str, Any], path: str,
                     cfgs: tuple[RecipeConfig, RecipeConfig], names: tuple[str, str],
                     hw: Hardware, imbalance: tuple[float, float] | None) -> list[dict[str, Any]]:
    """Every row of a latency report projected on `hw` at the layout the report ran (the
    recipes' own parallel section if it does not say) and that row's measured expert load
    (or `imbalance` when given), beside its measured medians: per member and metric the
    measured and projected seconds and the projection's relative error, and the B/A ratios."""
    try:
        nodes, world = int(report["nodes"]), int(report["world_size"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"--measured: {path} has no nodes/world_size; pass the JSON "
                          f"foe-bench latency --json/--out wrote") from None
    if world != nodes * hw.gpus_per_node:
        raise ConfigError(f"--measured: {path} ran {world} ranks on {nodes} node(s), but "
                          f"--cluster {hw.name} has {hw.gpus_per_node} per node; pass the "
                          f"hardware YAML of the fabric it ran on")
    layouts = []
    for name, cfg in zip(names, cfgs, strict=True):
        ran = (report.get("members") or {}).get(name, {}).get("parallel")
        try:
            layouts.append(ParallelConfig(**ran) if ran else cfg.parallel)
        except (TypeError, ValueError):
            raise ConfigError(f"--measured: members.{name}.parallel of {path} is not a "
                              f"parallel section; pass an unedited latency report") from None
    kinds = (cfgs[0].model.kind, cfgs[1].model.kind)
    rows = []
    for row in report["rows"]:
        try:
            batch, prompt_len, gen_len = (int(row[k]) for k in ("batch", "prompt_len", "gen_len"))
            measured = {n: {m: float(row[n][m]["median"]) for m in MEASURED} for n in names}
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"--measured: a row of {path} lacks batch/prompt_len/gen_len or "
                              f"{names[0]}/{names[1]} forward/ttft/tbt medians; pass the "
                              f"report of a foe-bench latency run of this --pair") from None
        out: dict[str, Any] = {"nodes": nodes, "world_size": world, "batch": batch,
                               "prompt_len": prompt_len, "gen_len": gen_len}
        for i, (name, cfg, layout) in enumerate(zip(names, cfgs, layouts, strict=True)):
            load = imbalance[i] if imbalance else (
                _measured_load(row, name, path, "--measured") if "imbalance" in row[name]
                else 1.0)
            proj = project_member(cfg, hw, nodes, batch, prompt_len, gen_len, load, layout)
            out[name] = {"layout": proj["layout"], "imbalance": load,
                         "breakdown": proj["breakdown"]}
            for m in MEASURED:
                out[name][m] = {"measured": measured[name][m], "projected": proj[m],
                                "rel_error": proj[m] / measured[name][m] - 1}
        a, b = names
        out["ratio"] = {m: {"measured": measured[b][m] / measured[a][m],
                            "projected": out[b][m]["projected"] / out[a][m]["projected"],
                            "paper": _paper_ratio(m, kinds)} for m in MEASURED}
        rows.append(out)
    return rows


def format_measured(rows: list[dict[str, Any]], names: tuple[str, str], hw: Hardware,
                    path: str) -> str:
    """Measured beside projected: each member's ms and the projection's error, the B/A
    ratios measured, projected and the paper's."""
    a, b = names
    ratio = f"{b}/{a}"
    lines = [_cluster_line(hw),
             f"measured: {path} ({rows[0]['nodes']} node(s), {rows[0]['world_size']} ranks; "
             f"medians); err = projected / measured - 1",
             f"{'batch':>5} {'prompt':>6}  {'metric':<8} {a + ' meas':>10} {a + ' proj':>10} "
             f"{'err':>6} {b + ' meas':>10} {b + ' proj':>10} {'err':>6} "
             f"{ratio + ' meas':>12} {'proj':>6} {'paper':>6}"]
    for row in rows:
        for i, m in enumerate(MEASURED):
            head = f"{row['batch']:>5} {row['prompt_len']:>6}" if i == 0 else " " * 12
            cells = "".join(f" {row[n][m]['measured'] * 1e3:>10.3f} "
                            f"{row[n][m]['projected'] * 1e3:>10.3f} "
                            f"{row[n][m]['rel_error']:>+6.0%}" for n in names)
            r = row["ratio"][m]
            paper = "" if r["paper"] is None else f"{r['paper']:.2f}"
            lines.append(f"{head}  {m:<8}{cells} {r['measured']:>12.2f} "
                         f"{r['projected']:>6.2f} {paper:>6}")
        for n in names:
            layout = " ".join(f"{k}={v}" for k, v in row[n]["layout"].items())
            lines.append(f"{'':>14}{n}: {layout}; expert load max/mean {row[n]['imbalance']:.2f}")
            lines.append(f"{'':>16}{_breakdown('ttft', row[n]['breakdown']['ttft'])} ms")
    return "\n".join(lines)


def _calibrate(args: argparse.Namespace) -> None:
    """Run the collective micro-benchmarks on emulated nodes, fit, print, write."""
    from foe_train.bench.collectives import calibrate
    from launch.netns import NetnsError

    nodes = args.nodes[0] if args.nodes else 2
    try:
        result = calibrate(nodes, args.nproc, args.link_rate)
    except NetnsError as exc:
        fail(str(exc))
    for p in result["points"]:
        print(f"{p['op']:<10} {p['scope']:<10} {p['size']:>8} B  measured "
              f"{p['seconds'] * 1e3:9.3f} ms  fitted {p['fitted_seconds'] * 1e3:9.3f} ms")
    for name, fitted in [("pooled", result), *result["ops"].items()]:
        print(f"{name:<10} " + "; ".join(
            f"{s}: alpha {fitted[s]['alpha'] * 1e6:.0f} us, beta {fitted[s]['beta'] / 1e6:.1f} "
            f"MB/s, overlap {fitted[s]['overlap']:.2f}"
            for s in ("intra_node", "inter_node")))
    by_op = ", ".join(f"{op} {e:.3f}" for op, e in result["max_error_by_op"].items())
    print(f"max relative error over all {len(result['points'])} points {result['max_error']:.3f} "
          f"({by_op}); {result['max_error_pooled']:.3f} with the pooled links per scope")
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
                    "latency": float(f"{fitted[s]['alpha']:.4g}"),
                    "overlap": round(fitted[s]["overlap"], 3)}
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
            f"--calibrate`: max relative error {result['max_error']:.2f}\n# over all "
            f"{len(result['points'])} measured points (bench.collectives). Compute rates "
            f"measured with every\n# rank busy at once (fp32 matmul, tensor copy). Bandwidths "
            f"in bytes/s, latencies in s;\n# a call takes (latency^p + transfer^p)^(1/p) with "
            f"p = overlap (bench.comm_model).\n")
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


def _imbalance(args: argparse.Namespace,
               names: tuple[str, str]) -> tuple[tuple[float, float] | None, str]:
    """The members' expert loads the options give (None: balanced, or with --measured each
    row's own) and where they come from, for the table."""
    if args.imbalance and args.imbalance_from:
        raise ConfigError("--imbalance and --imbalance-from: pass one of them")
    if args.imbalance:
        if min(args.imbalance) < 1:
            raise ConfigError(f"--imbalance {args.imbalance[0]:g} {args.imbalance[1]:g}: "
                              f"max/mean loads are at least 1; pass e.g. --imbalance 1 1.3")
        return (args.imbalance[0], args.imbalance[1]), "--imbalance"
    if args.imbalance_from:
        return imbalance_from(args.imbalance_from, names), \
            f"median over the rows of {args.imbalance_from}"
    if args.measured:
        return None, "each row's measured load"
    return None, "balanced, assumed; see --imbalance-from"


def project_main(argv: list[str] | None = None) -> None:
    """foe-bench project --pair A.yaml B.yaml --cluster HW.yaml --nodes 1 [4 ...] [--batch B]
    [--prompt-len S | --requests N [--longbench-dir DIR]] [--gen-len G]
    [--calibration FIT.json] [--imbalance A_F B_F | --imbalance-from LATENCY.json]
    [--json] [key=value ...]
    foe-bench project --pair A.yaml B.yaml --cluster HW.yaml --measured LATENCY.json
    [key=value ... as the latency run had them]
    foe-bench project --calibrate --link-rate 1gbit [--nodes 2 --nproc 4] [--out FIT.json]
    [--hardware-out HW.yaml]"""
    ap = OneLineParser(prog="foe-bench project")
    ap.add_argument("--pair", nargs=2, metavar=("A.yaml", "B.yaml"))
    ap.add_argument("--cluster", help="hardware description (configs/hardware/*.yaml)")
    ap.add_argument("--nodes", type=at_least(1), nargs="+", action="extend",
                    help="node counts to project (repeatable); with --calibrate: emulated nodes")
    ap.add_argument("--batch", type=at_least(1), help="prompts per request (default: one per GPU)")
    ap.add_argument("--prompt-len", type=at_least(1),
                    help="fixed prompt length (default: LongBench-shaped lengths)")
    ap.add_argument("--requests", type=at_least(1), default=32,
                    help="LongBench-shaped requests averaged when no --prompt-len")
    ap.add_argument("--longbench-dir", help="local LongBench *.jsonl files to draw prompts from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-len", type=at_least(1), default=8)
    ap.add_argument("--calibration", help="fitted alpha/beta JSON replacing the cluster links")
    ap.add_argument("--imbalance", type=float, nargs=2, metavar=("A_F", "B_F"),
                    help="max/mean expert load of each member's slowest rank, in --pair order "
                         "(default 1 1: balanced routing)")
    ap.add_argument("--imbalance-from", metavar="LATENCY.json",
                    help="each member's load from a foe-bench latency report (median of rows)")
    ap.add_argument("--measured", metavar="LATENCY.json",
                    help="project every row of a foe-bench latency report (its nodes, batch, "
                         "lengths, layout and expert load) and print it beside the measurement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the JSON report (or the calibration) here")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure collectives on emulated nodes and fit alpha/beta")
    ap.add_argument("--link-rate", type=link_rate, default="1gbit",
                    help="emulated inter-node link cap")
    ap.add_argument("--nproc", type=at_least(1), default=4, help="ranks of the calibration run")
    ap.add_argument("--hardware-out", help="with --calibrate: write a hardware YAML here")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for both recipes")
    args = ap.parse_args(argv)
    if args.calibrate:
        _calibrate(args)
        return
    if not args.pair or not args.cluster:
        fail("--pair A.yaml B.yaml and --cluster HW.yaml are required (or pass --calibrate)")
    try:
        hw = load_hardware(args.cluster, args.calibration)
        cfgs = tuple(load_config(path, args.overrides) for path in args.pair)
        kinds = [c.model.kind for c in cfgs]
        names = (kinds[0], kinds[1] + "-b" if kinds[0] == kinds[1] else kinds[1])
        imbalance, source = _imbalance(args, names)
        if args.measured:
            rows = project_measured(read_latency_report(args.measured, "--measured"),
                                    args.measured, cfgs, names, hw, imbalance)
            table = format_measured(rows, names, hw, args.measured)
        else:
            prompt_lens = _prompt_lens(args, cfgs[0])
            rows = [project_pair(cfgs, names, hw, n, args.batch, prompt_lens, args.gen_len,
                                 imbalance or (1.0, 1.0)) for n in args.nodes or [1]]
            table = format_table(rows, names, hw, source)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    report = {"cluster": hw.model_dump(), "calibration": args.calibration,
              "measured": args.measured, "imbalance_source": source, "rows": rows}
    text = json.dumps(report, indent=1)
    print(text if args.json else table)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    project_main(sys.argv[1:])
