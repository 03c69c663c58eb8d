"""Single-process pure-PyTorch reference ("oracle") of the FoE model, readable as the spec.

Why: the distributed FoE model and the megatron MoE baseline are checked against this file;
it imports neither megatron nor torch.distributed, so a disagreement cannot be a shared bug.
The baseline MoE GPT is ReferenceFoE(model, 1, model.moe_router_topk, either mode). Module
names mirror megatron-core's: a cluster parameter's megatron key is ``decoder.layers.{i}.``
+ its name here. Not modelled: aux/z losses (extra grads, same forward): compare with
megatron built with moe_aux_loss_coeff=0 and no z-loss. Math: DESIGN.md section 1.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from foe_train.config import ModelConfig

SHARED_KEYS = {  # megatron key -> our name; identical in every cluster's state dict
    "embedding.word_embeddings.weight": "embedding.weight",
    "decoder.final_layernorm.weight": "final_layernorm.weight",
    "output_layer.weight": "output_layer.weight",
}
_linear = partial(nn.Linear, bias=False)  # megatron built with add_bias_linear=False


def rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """megatron RotaryEmbedding + _apply_rotary_pos_emb_bshd (rotary_percent 1, not interleaved):
    angle t*base^(-2i/dh) on both halves of a head; x*cos + [-x2, x1]*sin. x: [b, s, heads, dh]"""
    dh, s = x.shape[-1], x.shape[1]
    inv_freq = 1.0 / base ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


class SwiGLU(nn.Module):
    """megatron MLP with gated_linear_unit: fc1 rows are [gate; up], out = fc2(silu(g) * u)."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.linear_fc1, self.linear_fc2 = _linear(d, 2 * ffn), _linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Attention(nn.Module):
    """Causal GQA over this cluster's `groups` KV heads and their `heads` query heads.
    megatron's linear_qkv rows come per query group: [q heads of the group, k, v]."""

    def __init__(self, d: int, heads: int, groups: int, dh: int, base: float):
        super().__init__()
        self.heads, self.groups, self.dh, self.base = heads, groups, dh, base
        self.linear_qkv = _linear(d, (heads + 2 * groups) * dh)
        self.linear_proj = _linear(heads * dh, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        per = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, (per + 2) * self.dh)
        q, k, v = qkv.split([per * self.dh, self.dh, self.dh], dim=-1)
        q = rotate(q.reshape(b, s, self.heads, self.dh), self.base)
        k = rotate(k, self.base).repeat_interleave(per, dim=2)  # query head j uses group j//per
        v = v.repeat_interleave(per, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, dh]
        scores = q @ k.transpose(-1, -2) / self.dh**0.5
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        return self.linear_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))


class MoE(nn.Module):
    """megatron TopKRouter (softmax score, no scaling/bias/capacity: dropless) + SequentialMLP.
    pre_softmax: probs = topk(softmax(logits)); else probs = softmax(topk(logits))."""

    def __init__(self, d: int, experts: int, ffn: int, topk: int, pre_softmax: bool):
        super().__init__()
        self.topk, self.pre_softmax = topk, pre_softmax
        self.router = _linear(d, experts)
        self.experts = nn.ModuleDict(
            {"local_experts": nn.ModuleList(SwiGLU(d, ffn) for _ in range(experts))}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = flat.float() @ self.router.weight.float().t()  # router in float32
        if self.pre_softmax:
            probs, idx = logits.softmax(dim=-1).topk(self.topk, dim=-1)
        else:
            top, idx = logits.topk(self.topk, dim=-1)
            probs = top.softmax(dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts["local_experts"]):
            tok, slot = (idx == e).nonzero(as_tuple=True)  # tokens routed to e, and their slot
            out = out.index_add(0, tok, probs[tok, slot, None].to(x.dtype) * expert(flat[tok]))
        return out.view_as(x)


class Cluster(nn.Module):
    """One cluster's share of one layer: its norms, attention slice and MLP (MoE or dense)."""

    def __init__(self, m: ModelConfig, layer: int, c: int, k: int):
        super().__init__()
        d, dh = m.hidden_size, m.hidden_size // m.num_attention_heads
        self.input_layernorm = nn.RMSNorm(d, eps=m.layernorm_epsilon)
        self.self_attention = Attention(
            d, m.num_attention_heads // c, m.num_query_groups // c, dh, float(m.rotary_base)
        )
        self.pre_mlp_layernorm = nn.RMSNorm(d, eps=m.layernorm_epsilon)
        if m.layer_is_moe(layer):
            self.mlp = MoE(d, m.num_experts // c, m.moe_ffn_hidden_size, k, m.router_pre_softmax)
        else:  # dense layer: a 1/C slice of the full dense SwiGLU
            self.mlp = SwiGLU(d, m.ffn_hidden_size // c)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.self_attention(self.input_layernorm(x))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_mlp_layernorm(x))


class ReferenceFoE(nn.Module):
    """FoE GPT with C clusters per layer; C=1 is the stock megatron MoE GPT (pre-norm, RoPE,
    output tied to the embedding unless untie_embeddings). Weights are initialised
    N(0, init_method_std) but meant to be loaded."""

    def __init__(self, model: ModelConfig, clusters: int, cluster_topk: int, residual_sync: str):
        super().__init__()
        m, c = model, clusters
        if residual_sync not in ("post_attention", "post_attention_and_moe"):
            raise ValueError(f"residual_sync: unknown mode {residual_sync!r}")
        if m.num_query_groups % c or m.num_experts % c or m.ffn_hidden_size % c:
            raise ValueError("clusters must divide num_query_groups, num_experts, ffn_hidden_size")
        if not m.swiglu or m.balanced_routing:
            raise ValueError("oracle models swiglu and learned routing only")
        if not 0 < cluster_topk <= m.num_experts // c:
            raise ValueError(f"cluster_topk={cluster_topk} must be in [1, num_experts/clusters]")
        self.residual_sync = residual_sync
        self.embedding = nn.Embedding(m.vocab_size, m.hidden_size)
        self.layers = nn.ModuleList(
            nn.ModuleList(Cluster(m, i, c, cluster_topk) for _ in range(c))
            for i in range(m.num_layers)
        )
        self.final_layernorm = nn.RMSNorm(m.hidden_size, eps=m.layernorm_epsilon)
        self.output_layer = _linear(m.hidden_size, m.vocab_size)
        for name, p in self.named_parameters():
            if "layernorm" not in name:
                nn.init.normal_(p, std=m.init_method_std)
        self.shared_keys = dict(SHARED_KEYS)
        if not m.untie_embeddings:  # megatron's tied output layer has no weight of its own
            self.output_layer.weight = self.embedding.weight
            del self.shared_keys["output_layer.weight"]

    def forward(self, tokens: torch.LongTensor) -> torch.Tensor:
        h = self.embedding(tokens)
        if self.residual_sync == "post_attention_and_moe":
            for layer in self.layers:  # two federated sums per layer
                h = h + sum(cl.attn(h) for cl in layer)
                h = h + sum(cl.ffn(h) for cl in layer)
        else:  # one federated sum per layer; m[c] is cluster c's pending MLP output
            m = [torch.zeros_like(h) for _ in self.layers[0]]
            for layer in self.layers:
                h = h + sum(mc + cl.attn(h + mc) for cl, mc in zip(layer, m, strict=True))
                m = [cl.ffn(h) for cl in layer]
            h = h + sum(m)
        return self.output_layer(self.final_layernorm(h)).float()

    def _cluster_params(self, c: int) -> dict[str, nn.Parameter]:
        """Megatron key -> our parameter for cluster c (shared params in every cluster)."""
        own = {key: self.get_parameter(name) for key, name in self.shared_keys.items()}
        for i, layer in enumerate(self.layers):
            for name, p in layer[c].named_parameters():
                own[f"decoder.layers.{i}.{name}"] = p
        return own

    @torch.no_grad()
    def load_megatron(self, cluster_state_dicts: list[dict[str, torch.Tensor]]) -> None:
        """Load one megatron GPTModel state dict per cluster; other keys (_extra_state, buffers)
        are ignored. Shared params must agree across clusters."""
        if len(cluster_state_dicts) != len(self.layers[0]):
            raise ValueError(f"need {len(self.layers[0])} cluster state dicts")
        todo = []  # check everything before copying anything
        for c, sd in enumerate(cluster_state_dicts):
            for key, p in self._cluster_params(c).items():
                if key not in sd:
                    raise KeyError(f"cluster {c}: megatron state dict lacks {key}")
                if sd[key].shape != p.shape:
                    raise ValueError(f"cluster {c}: {key} {tuple(sd[key].shape)} != {p.shape}")
                shared = key in self.shared_keys
                if shared and not torch.equal(sd[key], cluster_state_dicts[0][key]):
                    raise ValueError(f"cluster {c}: shared {key} differs from cluster 0")
                todo.append((p, sd[key]))
        for p, value in todo:
            p.copy_(value)

    def megatron_grads(self) -> list[dict[str, torch.Tensor]]:
        """After backward: per cluster, megatron key -> grad (shared grads in every dict)."""
        return [
            {key: p.grad for key, p in self._cluster_params(c).items() if p.grad is not None}
            for c in range(len(self.layers[0]))
        ]
