"""The token dispatcher of an expert group of one rank (an FoE cluster with L = 1).

Such a group exchanges nothing, yet megatron's allgather dispatcher still sizes its permutation
by the routing map: ``permute``'s masked_select of token indices and the probabilities'
masked_select have data-dependent sizes, each a device->host synchronisation on a GPU, on top
of the one the experts need (their per-expert token counts on the host). Without token
dropping every token has exactly k experts, so the permutation has T*k rows, known in
advance: ``nonzero_static`` lists them in megatron's order (expert-major, tokens in order)
with no synchronisation, and the layer blocks the host once instead of three times.
"""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from foe_train.topology import dispatcher_run


class SingleRankTokenDispatcher(MoEAllGatherTokenDispatcher):
    """megatron's allgather dispatcher for a group of one rank (its gathers and reduce-scatter
    are then no-ops), with a permutation whose size needs no device->host synchronisation."""

    def dispatch_postprocess(
        self, hidden_states: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.hidden_shape_before_permute = hidden_states.shape
        self.local_map = self.routing_map
        tokens = hidden_states.shape[0]
        # (expert, token) of every routed copy, expert-major as megatron's permute orders them;
        # as two contiguous rows: a strided token index (a column of nonzero_static's [n, 2])
        # makes the combine's scatter_add_ on a CPU about 12x slower
        routed = torch.nonzero_static(self.local_map.T, size=tokens * self.router_topk)
        experts, token_index = routed.T.contiguous()
        self.reversed_local_input_permutation_mapping = token_index
        self.local_probs = probs.T.reshape(-1).index_select(0, experts * tokens + token_index)
        self.routing_map = None
        # the experts split their input on the host: the layer's one synchronisation
        tokens_per_expert = self.local_map.sum(dim=0).long().cpu()
        return hidden_states.index_select(0, token_index), tokens_per_expert, self.local_probs


def use_single_rank_dispatchers(model: torch.nn.Module) -> None:
    """Give every MoE layer whose expert group is this rank alone, and which megatron built
    with the allgather dispatcher (``token_dispatcher: auto`` picks it in a group of one rank),
    the single-rank dispatcher (``topology.dispatcher_run``). megatron's TransformerLayer
    recognises its MoELayer by class, so the layer stays megatron's and only its dispatcher is
    replaced."""
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        built = module.token_dispatcher
        megatron = module.config.moe_token_dispatcher_type
        if built.tp_size == 1 and dispatcher_run(megatron, built.ep_size) == "single-rank":
            groups = ProcessGroupCollection(ep=built.ep_group, expt_tp=built.tp_group,
                                            tp_ep=built.tp_ep_group)
            module.token_dispatcher = SingleRankTokenDispatcher(
                module.num_local_experts, module.local_expert_indices, config=module.config,
                pg_collection=groups,
            )


def dispatcher_name(model: torch.nn.Module) -> str | None:
    """The dispatcher the model's MoE layers run: alltoall, allgather or single-rank (None
    without MoE layers), as reports name it."""
    names = {MoEAlltoAllTokenDispatcher: "alltoall", MoEAllGatherTokenDispatcher: "allgather",
             SingleRankTokenDispatcher: "single-rank"}
    for module in model.modules():
        if isinstance(module, MoELayer):
            return names[type(module.token_dispatcher)]
    return None
