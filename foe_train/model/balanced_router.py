"""A deterministic router for measuring communication (``model.balanced_routing``): the
all-to-all volume is then the formula's, not the learned router's whim."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter


class BalancedTopKRouter(TopKRouter):
    """Round-robin routing for communication measurement: token i of a rank goes to experts
    (i*k + j) mod E, so every expert receives exactly T*k/E tokens from every rank and the
    all-to-all volume is the formula's, not the learned router's whim. Probabilities are still
    the router's softmax at the chosen experts, so gradients flow as usual."""

    def routing(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_experts = self.config.num_moe_experts
        logits = logits.view(-1, num_experts)
        tokens = logits.shape[0]
        slots = (torch.arange(tokens, device=logits.device).unsqueeze(1) * self.topk
                 + torch.arange(self.topk, device=logits.device))
        routing_map = torch.zeros(tokens, num_experts, dtype=torch.bool, device=logits.device)
        routing_map.scatter_(1, slots % num_experts, True)
        scores = torch.softmax(logits.float(), dim=-1).type_as(logits)
        return scores * routing_map, routing_map
