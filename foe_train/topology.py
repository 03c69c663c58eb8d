"""Process topology: the D x C x L grid of DESIGN §2 for FoE, the EP x DP grid for the MoE
baseline, their process groups, and the checks that refuse a bad layout before anything heavy.

Rank order has l fastest: rank = (dp*C + c)*L + l, so a cluster's L ranks are consecutive.
``Grid`` is the one place that knows it (and where ranks sit on nodes); every other module asks
a Grid, so a change of layout is made here once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from foe_train.config import ConfigError, ModelConfig, ParallelConfig, cluster_topk

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

log = logging.getLogger("foe_train.topology")

# Process groups by the grid coordinates their members differ in (d: replica, c: cluster, l:
# rank inside the cluster), under the names Topology.groups uses for each kind of job.
_GROUP_AXES = {
    "foe": {"single": "", "cluster_ep": "l", "federation": "c", "token_dp": "dl",
            "expert_dp": "d", "replica": "cl"},
    "moe": {"single": "", "ep": "l", "dp": "dl", "expert_dp": "d"},
}


class TopologyError(ConfigError):
    """A layout that cannot run: one line naming the field and the fix."""


def embedding_sum_rows(tokens: int, vocab_size: int) -> int:
    """Rows of the tensor an untied FoE embedding sums its gradient shares over (model.head):
    the embedded tokens' gradient or the table's, whichever is smaller (ties: the tokens')."""
    return min(tokens, vocab_size)


def token_dispatcher(model: ModelConfig, ep_size: int, topk: int) -> str:
    """megatron-core's dispatcher for an expert-parallel group of ``ep_size`` ranks routing
    each token to ``topk`` of its experts: ``model.token_dispatcher``, or for ``auto`` the one
    that sends fewer bytes. alltoall sends a token's k copies to the ranks holding its
    experts, 2*k*d*(P-1)/P per token for dispatch and combine; allgather + reduce-scatter
    forwards every token to every other rank and back, 2*(P-1)*d. So allgather wins when
    k > P (and holds the group's P*T tokens on each rank). In a group of one rank neither
    communicates, and allgather is still the cheaper: alltoall sorts the routed copies by
    local expert after the (empty) exchange and back before it, two more copies of every
    routed token per layer."""
    if model.token_dispatcher != "auto":
        return model.token_dispatcher
    return "allgather" if ep_size == 1 or topk > ep_size else "alltoall"


def dispatcher_run(megatron_dispatcher: str, ep_size: int) -> str:
    """The dispatcher an MoE layer runs: megatron's, except that in a group of one rank
    allgather is replaced by the single-rank dispatcher (``model.dispatcher``), which needs no
    data-dependent sizes."""
    return "single-rank" if ep_size == 1 and megatron_dispatcher == "allgather" \
        else megatron_dispatcher


def expert_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """EP of the MoE baseline: parallel.expert_parallel, by default every rank of the job."""
    return parallel.expert_parallel or world_size


def placed_node(rank: int, ranks_per_node: int) -> int:
    """Node of a rank when every node runs ranks_per_node consecutive ranks, as torchrun
    numbers them (node rank major, local rank minor)."""
    return rank // ranks_per_node


def consecutive_nodes(world_size: int, nodes: int) -> list[int]:
    """Node of every rank of a job of world_size ranks spread evenly over `nodes` nodes, for
    checks and predictions made before any process exists."""
    return [placed_node(r, world_size // nodes) for r in range(world_size)]


def ranks_by_node(node_of_rank: Sequence[int]) -> list[list[int]]:
    """The ranks on each node, by node index (ascending ranks inside a node)."""
    by_node: dict[int, list[int]] = {}
    for rank, node in enumerate(node_of_rank):
        by_node.setdefault(node, []).append(rank)
    return [by_node[node] for node in sorted(by_node)]


class Coords(NamedTuple):
    """A rank's place in the grid: replica, cluster, rank inside the cluster."""

    dp: int
    c: int
    l: int  # noqa: E741 (design §2's name)


@dataclass(frozen=True)
class Grid:
    """Rank arithmetic of a job, with no process group behind it, so launchers, checks and
    predictions use the same layout as the running job. FoE: D x C x L, rank = (dp*C + c)*L + l.
    The MoE baseline is the same grid with one cluster of EP ranks (L = EP, D = world/EP): an
    EP group is a "cluster", the token shard is the rank. ``node_of_rank`` places the ranks;
    the layout is not checked here (``check_layout`` does)."""

    kind: str
    world_size: int
    node_of_rank: tuple[int, ...]
    data: int = 1
    clusters: int = 1
    ranks_per_cluster: int = 1
    expert_parallel: int = 1
    two_level_min_bytes: int = 0  # parallel.two_level_min_bytes: smaller sums stay flat
    overlap_min_bytes: int | None = None  # parallel.overlap_min_bytes (None: never)

    @classmethod
    def of(cls, kind: str, parallel: ParallelConfig, world_size: int,
           node_of_rank: Sequence[int]) -> Grid:
        """The grid a recipe's ``parallel`` section gives on world_size ranks."""
        nodes = tuple(int(n) for n in node_of_rank)
        if kind == "foe":
            D, C, L = parallel.data, parallel.clusters, parallel.ranks_per_cluster
            return cls("foe", world_size, nodes, D, C, L, L, parallel.two_level_min_bytes,
                       parallel.overlap_min_bytes)
        return cls("moe", world_size, nodes,
                   expert_parallel=expert_parallel_size(parallel, world_size))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, C, L) of the rank formula, for either kind."""
        if self.kind == "foe":
            return self.data, self.clusters, self.ranks_per_cluster
        return self.world_size // self.expert_parallel, 1, self.expert_parallel

    def rank(self, dp: int, c: int, l: int) -> int:  # noqa: E741
        """The global rank at grid coordinates (dp, c, l)."""
        _, C, L = self.shape
        return (dp * C + c) * L + l

    def coords(self, rank: int) -> Coords:
        """The grid coordinates of a global rank (the inverse of ``rank``)."""
        _, C, L = self.shape
        return Coords(rank // (C * L), rank // L % C, rank % L)

    def node_of(self, rank: int) -> int:
        return self.node_of_rank[rank]

    def node_ranks(self) -> list[list[int]]:
        """The ranks on each node, by node index."""
        return ranks_by_node(self.node_of_rank)

    @property
    def token_shards(self) -> int:
        """How many distinct token shards the global batch is split into (one per (dp, l))."""
        D, _, L = self.shape
        return D * L

    def token_shard(self, rank: int) -> int:
        """The shard a rank reads: the C members of a federation share one."""
        dp, _, l = self.coords(rank)
        return dp * self.shape[2] + l

    def group(self, name: str, rank: int) -> list[int]:
        """Global ranks (ascending) of the group ``name`` (a key of ``rank_groups``) that
        holds ``rank``."""
        axes = _GROUP_AXES[self.kind][name]
        mine = self.coords(rank)
        spans = [range(size) if axis in axes else [at]
                 for axis, size, at in zip("dcl", self.shape, mine, strict=True)]
        return [self.rank(dp, c, l) for dp in spans[0] for c in spans[1] for l in spans[2]]

    def groups(self, name: str) -> list[list[int]]:
        """Every group of that name, ordered by its lowest rank."""
        unique = dict.fromkeys(tuple(self.group(name, r)) for r in range(self.world_size))
        return [list(members) for members in unique]

    def federation_levels(self) -> tuple[list[list[int]], list[list[int]]]:
        """Rank lists of the two-level federated sum's groups: (members of a federation on one
        node, one member per node with the same local index), over all federations. Empty when
        the flat all-reduce is the one to use: a federation on one node, or one member per
        node, or members spread unevenly over nodes (and always for the baseline)."""
        local: list[list[int]] = []
        cross: list[list[int]] = []
        if self.kind != "foe":
            return local, cross
        for members in self.groups("federation"):
            by_node = [[r for r in members if self.node_of(r) == node]
                       for node in dict.fromkeys(self.node_of(r) for r in members)]
            if len(by_node) < 2 or len({len(m) for m in by_node}) != 1 or len(by_node[0]) == 1:
                return [], []
            local += by_node
            cross += [list(column) for column in zip(*by_node, strict=True)]
        return local, cross

    def rank_groups(self) -> dict[str, list[list[int]]]:
        """Rank lists of every process group the job creates, by the name Topology.groups uses
        (with ``federation_local``/``federation_cross`` when the sum is two-level)."""
        out = {name: self.groups(name) for name in _GROUP_AXES[self.kind]}
        local, cross = self.federation_levels()
        if local:
            out["federation_local"], out["federation_cross"] = local, cross
        return out


def check_layout(
    model: ModelConfig, parallel: ParallelConfig, world_size: int, node_of_rank: Sequence[int]
) -> Grid:
    """Refuse, in one line, any layout the model kind cannot run on; return its grid."""
    grid = Grid.of(model.kind, parallel, world_size, node_of_rank)
    has_dense = any(not model.layer_is_moe(i) for i in range(model.num_layers))
    if model.kind == "moe":
        ep = grid.expert_parallel
        if world_size % ep:
            raise TopologyError(
                f"parallel.expert_parallel={ep} does not divide the world size {world_size}; "
                f"pick a divisor of the number of processes"
            )
        if model.num_experts % ep:
            raise TopologyError(
                f"parallel.expert_parallel={ep} does not divide model.num_experts="
                f"{model.num_experts}; pick a divisor of num_experts"
            )
        return grid
    D, C, L = parallel.data, parallel.clusters, parallel.ranks_per_cluster
    if D * C * L != world_size:
        raise TopologyError(
            f"parallel: data*clusters*ranks_per_cluster = {D}*{C}*{L} = {D * C * L} but the "
            f"world size is {world_size}; launch {D * C * L} processes or change parallel.*"
        )
    if model.num_query_groups % C:
        raise TopologyError(
            f"parallel.clusters={C} does not divide model.num_query_groups="
            f"{model.num_query_groups}; each cluster owns whole KV heads, pick a divisor"
        )
    if model.num_experts % C:
        raise TopologyError(
            f"parallel.clusters={C} does not divide model.num_experts={model.num_experts}; "
            f"pick a divisor of num_experts"
        )
    if (model.num_experts // C) % L:
        raise TopologyError(
            f"parallel.ranks_per_cluster={L} does not divide the {model.num_experts // C} "
            f"experts of a cluster; pick a divisor of num_experts/clusters"
        )
    if model.vocab_size % C:
        raise TopologyError(
            f"parallel.clusters={C} does not divide model.vocab_size={model.vocab_size}; the "
            f"clusters split the vocabulary, pad it to a multiple of {C}"
        )
    if has_dense and model.ffn_hidden_size % C:
        raise TopologyError(
            f"parallel.clusters={C} does not divide model.ffn_hidden_size="
            f"{model.ffn_hidden_size} of the dense layers; pick a divisor"
        )
    k_c = cluster_topk(model, C)
    if k_c > model.num_experts // C:
        raise TopologyError(
            f"model.cluster_topk={k_c} exceeds the {model.num_experts // C} experts of a "
            f"cluster; lower it"
        )
    for ranks in grid.groups("cluster_ep"):
        nodes = sorted({grid.node_of(r) for r in ranks})
        if len(nodes) > 1:
            dp, c, _ = grid.coords(ranks[0])
            raise TopologyError(
                f"parallel.ranks_per_cluster={L}: cluster {c} (replica {dp}) ranks {ranks} "
                f"span nodes {nodes}; make ranks_per_cluster divide the processes per node"
            )
    return grid


@dataclass
class Topology:
    """This rank's place in the job (its grid) and the groups each module needs."""

    grid: Grid
    rank: int
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.grid.kind

    @property
    def world_size(self) -> int:
        return self.grid.world_size

    @property
    def node_of_rank(self) -> tuple[int, ...]:
        return self.grid.node_of_rank

    @property
    def data(self) -> int:
        return self.grid.data

    @property
    def clusters(self) -> int:
        return self.grid.clusters

    @property
    def ranks_per_cluster(self) -> int:
        return self.grid.ranks_per_cluster

    @property
    def expert_parallel(self) -> int:
        return self.grid.expert_parallel

    @property
    def node(self) -> int:
        return self.grid.node_of(self.rank)

    @property
    def cluster(self) -> int:
        """This rank's cluster (0 for the baseline, whose ranks all run the whole layer)."""
        return self.grid.coords(self.rank).c if self.kind == "foe" else 0

    @property
    def token_shards(self) -> int:
        """How many distinct token shards the global batch is split into."""
        return self.grid.token_shards

    @property
    def token_shard(self) -> int:
        return self.grid.token_shard(self.rank)

    def group_kinds(self) -> dict[tuple[int, ...], str]:
        """Global-rank tuple of every group this rank belongs to -> its kind (for accounting)."""
        out: dict[tuple[int, ...], str] = {}
        for kind, group in self.groups.items():
            if kind != "single":
                out.setdefault(tuple(dist.get_process_group_ranks(group)), kind)
        return out

    def cluster_pg_collection(self) -> ProcessGroupCollection:
        """Groups for a cluster's layers (FoE) or every layer (MoE): singleton tp/cp/pp,
        the job's EP group and the data-parallel groups gradients reduce over."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        g, one = self.groups, self.groups["single"]
        ep = g["cluster_ep"] if self.kind == "foe" else g["ep"]
        dp = g["token_dp"] if self.kind == "foe" else g["dp"]
        expt_dp = g["expert_dp"]
        return ProcessGroupCollection(
            tp=one, cp=one, pp=one, mp=one, tp_cp=one, embd=None, pos_embd=None,
            ep=ep, tp_ep=ep, tp_ep_pp=ep, expt_tp=one,
            dp=dp, dp_cp=dp, tp_dp_cp=dp, expt_dp=expt_dp,
            intra_dp_cp=dp, intra_expt_dp=expt_dp,
        )

    def model_pg_collection(self) -> ProcessGroupCollection:
        """Groups of the GPTModel around the layers: for FoE the federation is the TP group of
        the embedding and output layer, which split the vocabulary over it (``model.head``);
        each FoE layer is built with its cluster's groups instead."""
        pgc = self.cluster_pg_collection()
        pgc.tp = self.vocab_group
        return pgc

    def federation_groups(
        self,
    ) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """The federated sum's groups (all members, members on this node, one member per
        node): the last two only when several members share a node and the federation spans
        nodes (the two-level sum), else None (the flat all-reduce); ``model.federation``'s
        Federation takes them."""
        return (self.groups["federation"], self.groups.get("federation_local"),
                self.groups.get("federation_cross"))

    @property
    def vocab_group(self) -> dist.ProcessGroup:
        """The group the vocabulary (embedding, logits, loss) is split over."""
        return self.groups["federation" if self.kind == "foe" else "single"]

    def optimizer_pg_collection(self) -> ProcessGroupCollection:
        """Groups for megatron's optimizer. Gradient-norm statistics reduce over the
        federation (dense) and the replica (experts), so every cluster's parameters count
        once; the shared weights' copies on clusters > 0 are marked duplicates (see
        ``mark_shared_duplicates``)."""
        pgc = self.cluster_pg_collection()
        if self.kind == "foe":
            pgc.mp = self.groups["federation"]
            pgc.tp_ep_pp = self.groups["replica"]
        pgc.intra_dist_opt = dist.group.WORLD
        return pgc

    def mark_shared_duplicates(self, model: torch.nn.Module) -> None:
        """Weights every cluster holds a copy of (the final norm and an untied embedding; the
        output layer is split, not copied) are counted by cluster 0 only in gradient norms,
        megatron's ``param.shared`` convention."""
        if self.kind == "foe" and self.cluster > 0:
            for name, param in model.named_parameters():
                if "decoder.layers." not in name and getattr(param, "vocab_shard", None) is None:
                    param.shared = True

    def describe(self) -> str:
        if self.kind == "moe":
            return (f"rank {self.rank} node {self.node}: MoE baseline, EP {self.expert_parallel}"
                    f" over {self.world_size} ranks")
        replica, cluster, l = self.grid.coords(self.rank)
        return (f"rank {self.rank} node {self.node}: replica {replica}"
                f" cluster {cluster} expert-rank {l} (token shard {self.token_shard})")


def node_map() -> list[int]:
    """Node index of every rank, from torchrun's GROUP_RANK (the agent's node rank)."""
    mine = int(os.environ.get("GROUP_RANK", "0"))
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [int(n) for n in out]


def build_topology(model: ModelConfig, parallel: ParallelConfig) -> Topology:
    """Check the layout against torchrun's world, then create every process group the grid
    names (all ranks create all of them, in the same order)."""
    grid = check_layout(model, parallel, dist.get_world_size(), node_map())
    groups = {name: dist.new_subgroups_by_enumeration(ranks)[0]
              for name, ranks in grid.rank_groups().items()}
    topo = Topology(grid, dist.get_rank(), groups)
    mapping: list[object] = [None] * grid.world_size
    dist.all_gather_object(mapping, topo.describe())
    if topo.rank == 0:
        for line in mapping:
            log.info("topology: %s", line)
    return topo
