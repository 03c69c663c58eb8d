"""The FoE transformer layer (DESIGN §1) as a megatron-core TransformerLayer subclass.

A layer instance is one cluster's slice: its attention holds the cluster's H/C query heads and
G/C KV heads (on a CPU its input norm fused into the QKV projection, ``model.norm``), its MLP
is a megatron MoELayer over the cluster's E/C experts (expert-parallel on the cluster-EP
group) or a 1/C column slice of a dense MLP. Clusters meet only in federated sums
(``model.federation``, flat or two-level), whose backward keeps the replicated residual's
gradient in per-cluster shares: one backward sum per federated sum and none where the residual
enters cluster work. The residual itself rides in the federation's first member's term of each
sum, so the sum's result is the next residual and no member adds it afterwards. In inference a
large enough sum is hidden behind compute by running the layer on two halves of the batch
(``_overlapped_forward``).

In ``post_attention`` mode each cluster keeps a pending MoE output m_c between layers. It
travels as the layer's second output, which megatron's TransformerBlock hands to the next layer
as ``context`` (its slot for a cross-attention input, unused by GPT; the block's activation
recompute checkpoints it with the hidden state), so the two never need concatenating. Layer 0
receives no pending output (m = 0) and the last layer folds the pending outputs back in, so
GPTModel sees an ordinary [s, b, d] hidden state (in generation [1, b, d]: the fold sums only
the last position, the one megatron's static inference context scores).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from foe_train.model.federation import Federation, federated_sum, final_federated_sum
from foe_train.model.norm import NormColumnParallelLinear


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
        # where the spec built a fused QKV projection (model.builder), it takes the norm
        qkv = self.self_attention.linear_qkv
        self.norm_in_qkv = isinstance(qkv, NormColumnParallelLinear)
        if self.norm_in_qkv:
            qkv.fuse(self.input_layernorm)

    def _attention(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out, bias = self.self_attention(
            x if self.norm_in_qkv else self.input_layernorm(x),
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

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h', pending m_c') from (h, pending m_c, which the block passes as ``context``);
        the last layer returns (h_out, None)."""
        if self.residual_sync == "post_attention_and_moe":
            attention = self._attention(hidden_states, kwargs)
            h = federated_sum(self._with_residual(attention, hidden_states), self.federation)
            return self._fold(h, self._mlp(h, kwargs), kwargs), None
        if self._overlapped(hidden_states):
            return self._overlapped_forward(hidden_states, context, kwargs)
        h = federated_sum(self._term(hidden_states, context, kwargs), self.federation)
        moe_out = self._mlp(h, kwargs)
        if self.is_last:
            return self._fold(h, moe_out, kwargs), None
        return h, moe_out

    def _term(self, h: torch.Tensor, pending: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        """This cluster's term of the federated sum that is the next residual:
        m_c + Attn_c(LN1_c(h + m_c)), and on the first member (h + m_c) + Attn_c(...), the
        attention's input, which already holds the residual: adding it costs nothing there.
        The stream is made contiguous: half a batch (``_overlapped_forward``) is a strided view,
        which would turn the QKV projection's matmul into a batched one, 1.4x slower on a CPU."""
        stream = h.contiguous() if pending is None else h + pending
        out = self._attention(stream, kwargs)
        if self.federation.first:
            return out + stream
        return out if pending is None else out + pending

    def _with_residual(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """A cluster output as its term of a federated sum that yields h + the summed outputs:
        the first member adds h."""
        return out + h if self.federation.first else out

    def _fold(self, h: torch.Tensor, out: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """h + the federated sum of a cluster output; the model's last sum feeds the head, and
        only the positions the head reads (``_head_term``)."""
        if not self.is_last:
            return federated_sum(self._with_residual(out, h), self.federation)
        return final_federated_sum(self._head_term(h, out, kwargs), self.federation)

    def _head_term(self, h: torch.Tensor, out: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The last layer's term of its fold, on the positions of [s, b, d] the head reads: in
        inference with megatron's static context (generation) GPTModel scores only the last
        position (``materialize_only_last_token_logits``), so a prefill's fold sums one
        position per sequence instead of s."""
        context = kwargs.get("inference_context")
        if (context is not None and not self.training and context.is_static_batching()
                and context.materialize_only_last_token_logits):
            h, out = h[-1:], out[-1:]
        return self._with_residual(out, h)

    def _overlapped(self, hidden_states: torch.Tensor) -> bool:
        # on CUDA the sum would need a stream of its own to run beside the compute: not built
        s, b = hidden_states.shape[:2]
        summed = s * b * self.config.hidden_size * hidden_states.element_size()
        return (not torch.is_grad_enabled() and not hidden_states.is_cuda and b > 1
                and self.federation.overlaps(summed))

    def _overlapped_forward(
        self, hidden_states: torch.Tensor, pending: torch.Tensor | None, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer on two halves of the batch (inference, parallel.overlap_min_bytes): the
        first half's federated sum travels while the second half's attention runs, the second
        half's while the first half's MoE runs (and in the last layer the first half's fold
        while the second half's MoE runs)."""
        # With L > 1 the MoE's calls go to the cluster's other ranks, which serve other token
        # shards: they halve alike because every inference entry point gives all shards the
        # same batch (generate pads the shares, foe-bench latency and evaluation split evenly).
        fed = self.federation
        context = kwargs.get("inference_context")
        parts = hidden_states.tensor_split(2, dim=1)
        pendings = (None, None) if pending is None else pending.tensor_split(2, dim=1)
        halves, start = [], 0
        for h, m in zip(parts, pendings, strict=True):
            with _batch_offset(context, start):
                halves.append(fed.start_sum(self._term(h, m, kwargs)))
            start += h.shape[1]
        hs, outs = [], []
        for summed in halves:
            h = summed.result()
            moe_out = self._mlp(h, kwargs)
            hs.append(h)
            if self.is_last:
                moe_out = fed.start_sum(self._head_term(h, moe_out, kwargs))
            outs.append(moe_out)
        if self.is_last:
            return torch.cat([summed.result() for summed in outs], dim=1), None
        return torch.cat(hs, dim=1), torch.cat(outs, dim=1)


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
