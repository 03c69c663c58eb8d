"""The FoE transformer layer (DESIGN §1) as a megatron-core TransformerLayer subclass.

A layer instance is one cluster's slice: its attention holds the cluster's H/C query heads and
G/C KV heads, its MLP is a megatron MoELayer over the cluster's E/C experts (expert-parallel on
the cluster-EP group) or a 1/C column slice of a dense MLP. Clusters meet only in federated sums
(``model.federation``, flat or two-level), whose backward keeps the replicated residual's
gradient in per-cluster shares: one backward sum per federated sum and none where the residual
enters cluster work. In inference a large enough sum is hidden behind compute by running the
layer on two halves of the batch (``_overlapped_forward``).

In ``post_attention`` mode each cluster keeps a pending MoE output m_c between layers; it
travels concatenated to the residual as a [s, b, 2d] hidden state. Layer 0 receives [s, b, d]
(m = 0) and the last layer folds the pending outputs back in, so GPTModel and TransformerBlock
see ordinary [s, b, d] tensors at their boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
        fed = self.federation
        if self.residual_sync == "post_attention_and_moe":
            h = hidden_states + federated_sum(self._attention(hidden_states, kwargs), fed)
            return self._fold(h, self._mlp(h, kwargs)), None
        if self._overlapped(hidden_states):
            return self._overlapped_forward(hidden_states, kwargs), None
        h, pending = self._unpack(hidden_states)
        h = h + federated_sum(self._delta(h, pending, kwargs), fed)
        moe_out = self._mlp(h, kwargs)
        if self.is_last:
            return self._fold(h, moe_out), None
        return torch.cat([h, moe_out], dim=-1), None

    def _unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, pending m_c) of the carried state; layer 0 receives h alone."""
        d = self.config.hidden_size
        if x.shape[-1] == d:
            return x, None
        # split, not two slices: backward then writes both gradients into one [s, b, 2d]
        # tensor instead of zero-filling and adding two
        h, pending = x.split(d, dim=-1)
        return h, pending

    def _delta(self, h: torch.Tensor, pending: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        """This cluster's contribution to the federated sum: m_c + Attn_c(LN1_c(h + m_c))."""
        if pending is None:
            return self._attention(h, kwargs)
        return self._attention(h + pending, kwargs) + pending

    def _fold(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """h + the federated sum of a cluster output; the model's last sum feeds the head."""
        if self.is_last:
            return last_federated_sum(h, out, self.federation)
        return h + federated_sum(out, self.federation)

    def _overlapped(self, hidden_states: torch.Tensor) -> bool:
        # on CUDA the sum would need a stream of its own to run beside the compute: not built
        s, b = hidden_states.shape[:2]
        summed = s * b * self.config.hidden_size * hidden_states.element_size()
        return (not torch.is_grad_enabled() and not hidden_states.is_cuda and b > 1
                and self.federation.overlaps(summed))

    def _overlapped_forward(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The layer on two halves of the batch (inference, parallel.overlap_min_bytes): the
        first half's federated sum travels while the second half's attention runs, the second
        half's while the first half's MoE runs (and in the last layer the first half's fold
        while the second half's MoE runs)."""
        # With L > 1 the MoE's calls go to the cluster's other ranks, which serve other token
        # shards: they halve alike because every inference entry point gives all shards the
        # same batch (generate pads the shares, foe-bench latency and evaluation split evenly).
        fed = self.federation
        context = kwargs.get("inference_context")
        halves, start = [], 0
        for part in hidden_states.tensor_split(2, dim=1):
            h, pending = self._unpack(part)
            with _batch_offset(context, start):
                halves.append((h, fed.start_sum(self._delta(h, pending, kwargs))))
            start += part.shape[1]
        outs = []
        for h, summed in halves:
            h = h + summed.result()
            moe_out = self._mlp(h, kwargs)
            outs.append((h, fed.start_sum(moe_out)) if self.is_last
                        else torch.cat([h, moe_out], dim=-1))
        if self.is_last:
            outs = [h + summed.result() for h, summed in outs]
        return torch.cat(outs, dim=1)


@contextmanager
def _batch_offset(context: Any, start: int) -> Iterator[None]:
    """megatron's static KV cache writes a call's sequences from ``batch_size_offset`` on: a
    half of the batch starting at ``start`` must land in its own rows."""
    if context is None:
        yield
        return
    before = context.batch_size_offset
    context.batch_size_offset = before + start
    try:
        yield
    finally:
        context.batch_size_offset = before
