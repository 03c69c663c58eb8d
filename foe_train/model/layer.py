"""The FoE transformer layer (DESIGN §1) as a megatron-core TransformerLayer subclass.

A layer instance is one cluster's slice: its attention holds the cluster's H/C query heads and
G/C KV heads, its MLP is a megatron MoELayer over the cluster's E/C experts (expert-parallel on
the cluster-EP group) or a 1/C column slice of a dense MLP. Clusters meet only in federated sums,
(``model.federation``, flat or two-level), whose backward keeps the replicated residual's
gradient in per-cluster shares: one backward sum per federated sum and none where the residual
enters cluster work.

In ``post_attention`` mode each cluster keeps a pending MoE output m_c between layers; it
travels concatenated to the residual as a [s, b, 2d] hidden state. Layer 0 receives [s, b, d]
(m = 0) and the last layer folds the pending outputs back in, so GPTModel and TransformerBlock
see ordinary [s, b, d] tensors at their boundaries.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from foe_train.model.federation import Federation, federated_sum, last_federated_sum


class FoELayer(TransformerLayer):
    """One cluster's share of an FoE layer; built by spec with the cluster's own config."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Any,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        *,
        cluster_config: TransformerConfig,
        cluster_pg_collection: ProcessGroupCollection,
        federation: Federation,
        residual_sync: str,
    ) -> None:
        # The block hands every layer the model-wide config and groups; a cluster layer is built
        # from its own (H/C heads, G/C KV heads, E/C experts, cluster-EP group) instead.
        super().__init__(
            config=cluster_config,
            submodules=submodules,
            layer_number=layer_number,
            hidden_dropout=hidden_dropout,
            pg_collection=cluster_pg_collection,
            vp_stage=vp_stage,
        )
        self.federation = federation
        self.residual_sync = residual_sync
        self.is_last = self.layer_number == config.num_layers

    def _attention(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out, bias = self.self_attention(
            self.input_layernorm(x),
            attention_mask=kwargs.get("attention_mask"),
            inference_context=kwargs.get("inference_context"),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"),
            rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            attention_bias=kwargs.get("attention_bias"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            sequence_len_offset=kwargs.get("sequence_len_offset"),
        )
        return out if bias is None else out + bias

    def _mlp(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        x = self.pre_mlp_layernorm(h)
        if self.is_moe_layer:
            out, bias = self.mlp(x, padding_mask=kwargs.get("padding_mask"))
        else:
            out, bias = self.mlp(x)
        return out if bias is None else out + bias

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        d = self.config.hidden_size
        fed = self.federation
        if self.residual_sync == "post_attention_and_moe":
            h = hidden_states + federated_sum(self._attention(hidden_states, kwargs), fed)
            return self._fold(h, self._mlp(h, kwargs)), None

        if hidden_states.shape[-1] == 2 * d:
            # split, not two slices: backward then writes both gradients into one [s, b, 2d]
            # tensor instead of zero-filling and adding two
            h, pending = hidden_states.split(d, dim=-1)
        else:
            h, pending = hidden_states, None
        stream = h if pending is None else h + pending
        delta = self._attention(stream, kwargs)
        if pending is not None:
            delta = delta + pending
        h = h + federated_sum(delta, fed)
        moe_out = self._mlp(h, kwargs)
        if self.is_last:
            return self._fold(h, moe_out), None
        return torch.cat([h, moe_out], dim=-1), None

    def _fold(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """h + the federated sum of a cluster output; the model's last sum feeds the head."""
        if self.is_last:
            return last_federated_sum(h, out, self.federation)
        return h + federated_sum(out, self.federation)
