"""Process topology: the D x C x L grid of DESIGN §2 for FoE, the EP x DP grid for the MoE
baseline, their process groups, and the checks that refuse a bad layout before anything heavy.

Rank order has l fastest: rank = (dp*C + c)*L + l, so a cluster's L ranks are consecutive.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from foe_train.config import ConfigError, ModelConfig, ParallelConfig, cluster_topk
from foe_train.model.federation import Federation

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

log = logging.getLogger("foe_train.topology")


class TopologyError(ConfigError):
    """A layout that cannot run: one line naming the field and the fix."""


def token_dispatcher(model: ModelConfig, ep_size: int, topk: int) -> str:
    """megatron-core's dispatcher for an expert-parallel group of ``ep_size`` ranks routing
    each token to ``topk`` of its experts: ``model.token_dispatcher``, or for ``auto`` the one
    that sends fewer bytes. alltoall sends a token's k copies to the ranks holding its
    experts, 2*k*d*(P-1)/P per token for dispatch and combine; allgather + reduce-scatter
    forwards every token to every other rank and back, 2*(P-1)*d. So allgather wins when
    k > P (and holds the group's P*T tokens on each rank)."""
    if model.token_dispatcher != "auto":
        return model.token_dispatcher
    return "allgather" if ep_size > 1 and topk > ep_size else "alltoall"


def expert_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """EP of the MoE baseline: parallel.expert_parallel, by default every rank of the job."""
    return parallel.expert_parallel or world_size


def check_layout(
    model: ModelConfig, parallel: ParallelConfig, world_size: int, node_of_rank: list[int]
) -> None:
    """Refuse, in one line, any layout the model kind cannot run on."""
    has_dense = any(not model.layer_is_moe(i) for i in range(model.num_layers))
    if model.kind == "moe":
        ep = expert_parallel_size(parallel, world_size)
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
        return
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
    for dp in range(D):
        for c in range(C):
            ranks = [(dp * C + c) * L + l for l in range(L)]
            nodes = sorted({node_of_rank[r] for r in ranks})
            if len(nodes) > 1:
                raise TopologyError(
                    f"parallel.ranks_per_cluster={L}: cluster {c} (replica {dp}) ranks {ranks} "
                    f"span nodes {nodes}; make ranks_per_cluster divide the processes per node"
                )


def federation_levels(
    data: int, clusters: int, ranks_per_cluster: int, node_of_rank: list[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """Rank lists of the two-level federated sum's groups: (members of a federation on one
    node, one member per node with the same local index), over all federations. Empty when
    the flat all-reduce is the one to use: a federation on one node, or one member per node,
    or members spread unevenly over nodes."""
    local: list[list[int]] = []
    cross: list[list[int]] = []
    for dp in range(data):
        for l in range(ranks_per_cluster):
            by_node: dict[int, list[int]] = {}
            for c in range(clusters):
                rank = (dp * clusters + c) * ranks_per_cluster + l
                by_node.setdefault(node_of_rank[rank], []).append(rank)
            per_node = {len(members) for members in by_node.values()}
            if len(by_node) < 2 or len(per_node) != 1 or per_node == {1}:
                return [], []
            local += list(by_node.values())
            cross += [list(column) for column in zip(*by_node.values(), strict=True)]
    return local, cross


@dataclass
class Topology:
    """This rank's place in the job and the groups each module needs."""

    kind: str
    world_size: int
    rank: int
    node_of_rank: list[int]
    data: int = 1
    clusters: int = 1
    ranks_per_cluster: int = 1
    expert_parallel: int = 1
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)

    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    @property
    def cluster(self) -> int:
        return (self.rank // self.ranks_per_cluster) % self.clusters if self.kind == "foe" else 0

    @property
    def token_shards(self) -> int:
        """How many distinct token shards the global batch is split into."""
        return self.data * self.ranks_per_cluster if self.kind == "foe" else self.world_size

    @property
    def token_shard(self) -> int:
        if self.kind == "moe":
            return self.rank
        L, C = self.ranks_per_cluster, self.clusters
        return (self.rank // (C * L)) * L + self.rank % L

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

    def federation(self) -> Federation:
        """The federated sum's groups: two-level when several members share a node and the
        federation spans nodes, else the flat federation group."""
        return Federation(self.groups["federation"], self.groups.get("federation_local"),
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
        l = self.rank % self.ranks_per_cluster
        replica = self.rank // (self.clusters * self.ranks_per_cluster)
        return (f"rank {self.rank} node {self.node}: replica {replica}"
                f" cluster {self.cluster} expert-rank {l} (token shard {self.token_shard})")


def node_map() -> list[int]:
    """Node index of every rank, from torchrun's GROUP_RANK (the agent's node rank)."""
    mine = int(os.environ.get("GROUP_RANK", "0"))
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [int(n) for n in out]


def build_topology(model: ModelConfig, parallel: ParallelConfig) -> Topology:
    """Check the layout against torchrun's world, then create every process group."""
    from megatron.core.hyper_comm_grid import HyperCommGrid

    world, rank = dist.get_world_size(), dist.get_rank()
    nodes = node_map()
    check_layout(model, parallel, world, nodes)
    if model.kind == "foe":
        D, C, L = parallel.data, parallel.clusters, parallel.ranks_per_cluster
        grid = HyperCommGrid([1, L, C, D], ["tp", "ep", "fed", "dp"])
        groups = {
            "single": grid.create_pg("tp"),
            "cluster_ep": grid.create_pg("ep"),
            "federation": grid.create_pg("fed"),
            "token_dp": grid.create_pg(["ep", "dp"]),
            "expert_dp": grid.create_pg("dp"),
            "replica": grid.create_pg(["ep", "fed"]),
        }
        local, cross = federation_levels(D, C, L, nodes)
        if local:
            groups["federation_local"], _ = dist.new_subgroups_by_enumeration(local)
            groups["federation_cross"], _ = dist.new_subgroups_by_enumeration(cross)
        topo = Topology("foe", world, rank, nodes, D, C, L, L, groups)
    else:
        ep = expert_parallel_size(parallel, world)
        grid = HyperCommGrid([1, ep, world // ep], ["tp", "ep", "edp"])
        groups = {
            "single": grid.create_pg("tp"),
            "ep": grid.create_pg("ep"),
            "dp": grid.create_pg(["ep", "edp"]),
            "expert_dp": grid.create_pg("edp"),
        }
        topo = Topology("moe", world, rank, nodes, expert_parallel=ep, groups=groups)
    mapping: list[object] = [None] * world
    dist.all_gather_object(mapping, topo.describe())
    if rank == 0:
        for line in mapping:
            log.info("topology: %s", line)
    return topo
