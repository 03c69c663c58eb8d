"""DESIGN §3 as code: bytes each rank sends per step, by collective, for FoE and the baseline.

Per rank with T tokens in its shard, hidden d, b bytes per element and balanced routing
(every rank sends each expert-rank the same number of token copies):
- FoE federated sum: a ring all-reduce of T*d*b over C clusters sends 2*(C-1)/C*T*d*b; once per
  layer plus once after the last (post_attention), or twice per layer (post_attention_and_moe).
  The model's last sum (the fold that feeds the head) carries only the positions the head
  reads: all T in training and in a full forward, one per sequence in a prefill with a cache.
  Backward: every sum but the last, and the embedding's gradient shares once (of min(T, V)
  rows untied: the tokens' gradient or the table's, whichever is smaller). With m
  members per node on N > 1 nodes (m > 1) the sum is two-level: reduce-scatter inside the
  node ((m-1)/m*T*d*b), a ring all-reduce of the 1/m slice among N nodes (all of it crossing),
  all-gather inside the node, when T*d*b is at least parallel.two_level_min_bytes (else flat).
  The split output layer adds one sum backward (its input gradient), and a tied embedding,
  split with it, one flat sum forward (megatron's).
- All-to-all over P expert ranks on N nodes (FoE: P = L inside one node): dispatch and combine
  each send T*k*d*b*(P-1)/P; megatron's dispatcher also sends the routing probabilities
  (T*k*4*(P-1)/P, float32) and all-gathers each rank's per-expert token counts (E*8 bytes).
  Of the token traffic a fraction (P - P/N)/P goes to other nodes.
The communication accounting (bench.comm) counts the same quantities from the real calls; a test
checks the two agree exactly.

Time of those bytes: the alpha-beta model (``Link``, ``comm_seconds``) that bench.projection
prices them with and bench.collectives fits on the emulated fabric; it lives here so those two
share it without importing each other.
"""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field

from foe_train.config import ModelConfig, ParallelConfig, cluster_topk
from foe_train.topology import Grid, consecutive_nodes, embedding_sum_rows, token_dispatcher

PROB_BYTES = 4
COUNT_BYTES = 8


class Link(BaseModel):
    """One fabric scope as the alpha-beta model sees it, per GPU and direction. ``overlap`` (p)
    says how far a call's latency hides behind its transfer: time = (alpha^p + transfer^p)^(1/p),
    the sum of the two at p = 1 (plain alpha-beta: nominal links, configs/hardware), tending to
    the larger of them as p grows (the emulated fabric's fit, bench.collectives)."""

    model_config = ConfigDict(extra="forbid")

    bandwidth: float = Field(gt=0, description="bytes/s (beta)")
    latency: float = Field(ge=0, description="seconds per call (alpha)")
    overlap: float = Field(default=1.0, ge=1.0, description="p of (alpha^p + transfer^p)^(1/p)")


def comm_seconds(calls: float, nbytes: float, cross_bytes: float, intra: Link,
                 inter: Link) -> float:
    """Time of `calls` collectives sending nbytes per rank in all, cross_bytes of them to other
    nodes: the latency and overlap are the inter-node link's as soon as anything crosses, each
    byte goes at its own scope's bandwidth, and latency and transfer combine as Link says. The
    combination is homogeneous in (calls, bytes), so aggregated calls are priced as that many
    calls of the mean size."""
    link = inter if cross_bytes > 0 else intra
    transfer = (nbytes - cross_bytes) / intra.bandwidth + cross_bytes / inter.bandwidth
    p = link.overlap
    return ((calls * link.latency) ** p + transfer**p) ** (1 / p)


def federated_sums(model: ModelConfig, backward: bool) -> tuple[int, int, int, int]:
    """(sums of T·d, sums of the head's positions, sums of the embedding's gradient, flat sums)
    an FoE federation of C > 1 clusters makes in one pass. Forward: the layers' n + 1
    (post_attention) or 2n sums, the last of them the fold the head reads (of its positions
    only); backward every one but the last adds up its gradient shares (of T·d), and the split
    output layer's input gradient is summed (of the head's positions). Embedding: one backward
    sum of its gradient shares (``embedding_sum_rows`` rows untied, the tokens' if tied). Flat:
    megatron's own sum of a tied (hence split) embedding's rows forward."""
    n = model.num_layers
    forward = n + 1 if model.residual_sync == "post_attention" else 2 * n
    return ((forward - 1) * (1 + backward), 1 + backward, int(backward),
            int(not model.untie_embeddings))


def _ring(n: int, nbytes: int) -> Fraction:
    return Fraction(2 * (n - 1), n) * nbytes


def _rank_traffic(
    model: ModelConfig, grid: Grid, rank: int, tokens: int, head_tokens: int, elem_bytes: int,
    backward: bool,
) -> dict[str, dict[str, Fraction]]:
    out: dict[str, dict[str, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    d, layers = model.hidden_size, model.num_layers
    moe_layers = sum(model.layer_is_moe(i) for i in range(layers))
    node = grid.node_of

    def add(op: str, calls: int, nbytes: Fraction, cross: Fraction) -> None:
        if calls:
            out[op]["calls"] += calls
            out[op]["bytes"] += calls * nbytes
            out[op]["cross_node_bytes"] += calls * cross

    if model.kind == "foe":
        C, L = grid.clusters, grid.ranks_per_cluster
        P, k, E = L, cluster_topk(model, C), model.num_experts // C
        ep_group = grid.group("cluster_ep", rank)
        if C > 1:
            sums, head_sums, embedding_sums, flat_sums = federated_sums(model, backward)
            federation = grid.group("federation", rank)
            successor = federation[(federation.index(rank) + 1) % C]
            on_ring = node(successor) != node(rank)
            local, cross = grid.federation_levels()

            def federated(calls: int, elements: int) -> None:
                nbytes = _ring(C, elements * elem_bytes)
                if not (local and elements * elem_bytes >= grid.two_level_min_bytes):
                    add("all_reduce", calls, nbytes, nbytes if on_ring else 0 * nbytes)
                    return
                m, spanned = len(local[0]), len(cross[0])
                part = Fraction(-(-elements // m) * elem_bytes)
                add("reduce_scatter", calls, (m - 1) * part, 0 * part)
                add("all_reduce", calls, _ring(spanned, part), _ring(spanned, part))
                add("all_gather", calls, (m - 1) * part, 0 * part)

            flat = _ring(C, tokens * d * elem_bytes)
            add("all_reduce", flat_sums, flat, flat if on_ring else 0 * flat)
            federated(sums, tokens * d)
            federated(head_sums, head_tokens * d)
            rows = embedding_sum_rows(tokens, model.vocab_size) if model.untie_embeddings \
                else tokens
            federated(embedding_sums, rows * d)
    else:
        P = grid.expert_parallel
        k, E = model.moe_router_topk, model.num_experts
        ep_group = grid.group("ep", rank)
    ring_cross = P > 1 and node(ep_group[(ep_group.index(rank) + 1) % P]) != node(rank)
    if P > 1 and moe_layers and token_dispatcher(model, P, k) == "allgather":
        # per layer: all-gathers of the routing map (E bools per token), probabilities (E
        # floats) and hidden states; the combine reduce-scatters P*T tokens in the probability
        # dtype. Backward: each gather's mirror image, the routing map's excepted.
        on_ring = 1 if ring_cross else 0
        gathered = tokens * (P - 1) * Fraction(E + E * PROB_BYTES + d * elem_bytes)
        combined = tokens * (P - 1) * Fraction(d * PROB_BYTES)
        add("all_gather", 3 * moe_layers, gathered / 3, gathered / 3 * on_ring)
        add("reduce_scatter", moe_layers, combined, combined * on_ring)
        if backward:
            mirrored = tokens * (P - 1) * Fraction(E * PROB_BYTES + d * elem_bytes)
            add("all_gather", moe_layers, combined, combined * on_ring)
            add("reduce_scatter", 2 * moe_layers, mirrored / 2, mirrored / 2 * on_ring)
    elif P > 1 and moe_layers:
        remote = Fraction(P - 1, P)
        cross = Fraction(sum(node(r) != node(rank) for r in ep_group), P)
        token_bytes = tokens * k * d * elem_bytes
        prob_bytes = tokens * k * PROB_BYTES
        passes = 2 if backward else 1
        add("all_to_all", 2 * moe_layers * passes, token_bytes * remote, token_bytes * cross)
        add("all_to_all", moe_layers * passes, prob_bytes * remote, prob_bytes * cross)
        meta = E * COUNT_BYTES * (P - 1)
        add("all_gather", moe_layers, Fraction(meta), Fraction(meta if ring_cross else 0))
    return out


def predict(
    model: ModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    nodes: int,
    tokens_per_rank: int,
    elem_bytes: int = 4,
    backward: bool = False,
    head_tokens: int | None = None,
) -> dict[str, dict[str, int | float]]:
    """Predicted {op: {bytes, cross_node_bytes, calls}} per rank (mean over the job's ranks)
    for one forward (and backward) pass on tokens_per_rank tokens, of which the head reads
    head_tokens (None: all; a prefill with a cache: one per sequence)."""
    total: dict[str, dict[str, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    grid = Grid.of(model.kind, parallel, world_size, consecutive_nodes(world_size, nodes))
    head = tokens_per_rank if head_tokens is None else head_tokens
    for rank in range(world_size):
        traffic = _rank_traffic(model, grid, rank, tokens_per_rank, head, elem_bytes, backward)
        for op, vals in traffic.items():
            for key, value in vals.items():
                total[op][key] += Fraction(value) / world_size
    return {op: {key: integral(v) for key, v in vals.items()} for op, vals in total.items()}


def integral(value: Fraction) -> int | float:
    """An exact count as int when whole, else float (for JSON)."""
    return int(value) if value.denominator == 1 else float(value)
