"""Core attention through torch's ``scaled_dot_product_attention``: megatron's local core
attention with the score/softmax/value products replaced, so a GPU without Transformer Engine
still runs flash or memory-efficient kernels (the local spec's DotProductAttention
materialises the [b, heads, s, s] scores)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Same constructor, inputs ([s, b, heads, head_dim], KV heads grouped) and output
    ([sq, b, heads * head_dim]) as DotProductAttention. Causal masking is aligned to the end
    of the keys, so a decode step (one query against the cache) sees every cached key."""

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias need "
                                      "Transformer Engine's attention")
        sq, b, heads, dim = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron marks the positions to drop
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            if sq == sk:
                causal = True
            else:
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
