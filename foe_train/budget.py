"""Identical-budget arithmetic (docs/design.md §1): the numbers that must agree before an FoE
recipe and its MoE baseline may be called a fair pair, computed from the recipe alone (no torch, no
megatron), so ``foe-budget`` answers in a second and refuses a pair that differs.

Parameter shapes are megatron-core's as built by ``foe_train.model.builder`` (RMSNorm weights,
no linear biases, GQA qkv, gated fc1 when swiglu, router without bias); an FoE layer is C
cluster slices whose attention, routers, experts and dense MLP add up to the baseline's, plus
C-1 extra pairs of norms. Every count is an exact integer.
"""

from __future__ import annotations

from foe_train.config import ConfigError, RecipeConfig, cluster_topk

# Fields that make a pair "identical budget"; cluster_norm_params is the documented exception.
COMPARED = (
    "total_params", "active_params_per_token", "flops_per_token", "tokens",
    "global_batch_size", "seq_length", "optimizer", "lr_schedule",
)
# Counted net of the per-cluster norms when comparing: FoE carries them by design.
NET_OF_NORMS = ("total_params", "active_params_per_token")


def _clusters_and_active_experts(cfg: RecipeConfig) -> tuple[int, int]:
    """C and the experts each token runs per MoE layer (FoE: C*k_c, MoE: k). Refuses, in one
    line, a recipe whose FoE cluster slices would not add up to the baseline's shapes, since its
    numbers would describe a model that cannot be built."""
    m = cfg.model
    if isinstance(m.moe_layer_freq, list) and len(m.moe_layer_freq) != m.num_layers:
        raise ConfigError(
            f"model.moe_layer_freq: list of {len(m.moe_layer_freq)} entries for "
            f"model.num_layers={m.num_layers}; give one 1/0 per layer"
        )
    if m.kind == "moe":
        return 1, m.moe_router_topk
    C = cfg.parallel.clusters
    has_dense = any(not m.layer_is_moe(i) for i in range(m.num_layers))
    for field, size in (("num_query_groups", m.num_query_groups), ("num_experts", m.num_experts),
                        ("ffn_hidden_size", m.ffn_hidden_size if has_dense else 0)):
        if size % C:
            raise ConfigError(
                f"parallel.clusters={C} does not divide model.{field}={size}; pick a divisor"
            )
    k_c = cluster_topk(m, C)
    if not 0 < k_c <= m.num_experts // C:
        raise ConfigError(
            f"model.cluster_topk={k_c} must be in [1, {m.num_experts // C}] (experts per cluster)"
        )
    return C, C * k_c


def budget(cfg: RecipeConfig) -> dict[str, object]:
    """Everything docs/design.md §1 requires two recipes of a pair to share, for one recipe.

    total_params: every weight of the whole model once: embedding V*d, output layer V*d when
    untied, final norm d; per layer 2*d*C norms (C = 1 for MoE), attention d*(H+2G)*dh + H*dh*d
    with dh = d/H; an MoE layer router E*d + E experts of (2 if swiglu else 1)*f*d + f*d; a dense
    layer (2 if swiglu else 1)*F*d + F*d.

    cluster_norm_params: FoE's extra norms, 2*(C-1)*d per layer (0 for MoE).

    active_params_per_token: the weights one token's forward pass touches. Convention: every
    non-expert weight counts (all C clusters' norms, attention slices and routers, the dense
    MLPs, final norm, output layer), the embedding table does not (a row lookup, not a
    matmul), and of the experts only the active ones (FoE C*k_c per MoE layer, MoE k). A tied
    output layer still counts V*d here: the shared table is used as the output matmul.

    flops_per_token: training FLOPs (forward + backward = 3x forward, 2 FLOPs per
    multiply-add): 6 * active matmul weights (active params without norms, with the output
    layer) + 12 * seq_length * d per layer for attention scores and values. Convention: full
    (non-causal) attention, as in the PaLM/Chinchilla 6N + 12*L*s*d count, so the number does
    not depend on the attention kernel's causal skipping; FoE and MoE are counted alike.

    tokens: training.train_iters * global_batch_size * seq_length.
    """
    m, t = cfg.model, cfg.training
    C, active_experts = _clusters_and_active_experts(cfg)
    d, H, G, V, L = (m.hidden_size, m.num_attention_heads, m.num_query_groups, m.vocab_size,
                     m.num_layers)
    dh = d // H
    fc1 = 2 if m.swiglu else 1  # gated fc1 holds [gate; up]
    attention = d * (H + 2 * G) * dh + H * dh * d
    expert = fc1 * m.moe_ffn_hidden_size * d + m.moe_ffn_hidden_size * d
    dense = fc1 * m.ffn_hidden_size * d + m.ffn_hidden_size * d
    router = m.num_experts * d
    moe_layers = sum(m.layer_is_moe(i) for i in range(L))
    dense_layers = L - moe_layers
    norms = 2 * d * C * L + d  # per-cluster input/pre-MLP norms, final norm
    output = V * d
    non_expert_matmuls = output + L * attention + moe_layers * router + dense_layers * dense
    active_matmuls = non_expert_matmuls + moe_layers * active_experts * expert
    total = (V * d + (output if m.untie_embeddings else 0) + norms + L * attention
             + moe_layers * (router + m.num_experts * expert) + dense_layers * dense)
    return {
        "total_params": total,
        "cluster_norm_params": 2 * (C - 1) * d * L,
        "active_params_per_token": active_matmuls + norms,
        "flops_per_token": 6 * active_matmuls + 12 * m.seq_length * d * L,
        "tokens": t.train_iters * t.global_batch_size * m.seq_length,
        "global_batch_size": t.global_batch_size,
        "seq_length": m.seq_length,
        "optimizer": {
            "lr": t.lr, "min_lr": t.min_lr, "betas": (t.adam_beta1, t.adam_beta2),
            "weight_decay": t.weight_decay, "clip_grad": t.clip_grad,
            "distributed_optimizer": t.distributed_optimizer,
        },
        "lr_schedule": {
            "warmup_iters": t.warmup_iters, "decay_style": t.lr_decay_style,
            "train_iters": t.train_iters,
        },
    }


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _compared_value(b: dict, field: str) -> object:
    """The value a comparison sees: parameter counts net of FoE's per-cluster norms."""
    value = b.get(field)
    if field in NET_OF_NORMS and _is_number(value):
        return value - b.get("cluster_norm_params", 0)
    return value


def compare(a: dict, b: dict) -> list[str]:
    """Fields of two budgets that keep them from being a pair: any that is not exactly equal.
    Every count is an exact integer, so no tolerance hides a real difference;
    total_params and active_params_per_token are compared net of cluster_norm_params, the
    only difference docs/design.md §1 allows."""
    return [f for f in COMPARED if _compared_value(a, f) != _compared_value(b, f)]


def _text(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    return "-" if value is None else str(value)


def format_side_by_side(name_a: str, a: dict, name_b: str, b: dict, mismatches: list[str]) -> str:
    """An aligned table of two budgets, one row per field (dicts one row per entry), '!' in
    front of rows that keep the pair from matching, B/A for numbers as compared (net of the
    per-cluster norms), and a footnote row with the norm parameters that were excepted."""
    body: list[tuple[str, ...]] = []
    for field in COMPARED:
        x, y = a.get(field), b.get(field)
        if isinstance(x, dict) or isinstance(y, dict):
            x, y = x if isinstance(x, dict) else {}, y if isinstance(y, dict) else {}
            for key in dict.fromkeys([*x, *y]):
                bad = field in mismatches and x.get(key) != y.get(key)
                body.append(("!" if bad else "", f"{field}.{key}", _text(x.get(key)),
                             _text(y.get(key)), ""))
            continue
        cx, cy = _compared_value(a, field), _compared_value(b, field)
        ratio = f"{cy / cx:.4f}" if _is_number(cx) and _is_number(cy) and cx else ""
        body.append(("!" if field in mismatches else "", field, _text(x), _text(y), ratio))
    header = ("", "field", name_a, name_b, "B/A")
    foot = ("", "excepted: cluster_norm_params", _text(a.get("cluster_norm_params", 0)),
            _text(b.get("cluster_norm_params", 0)), "per-cluster norms, 2*(C-1)*d per layer")
    widths = [max(len(r[i]) for r in (header, *body, foot)) for i in range(4)]
    rule = ("", *("-" * w for w in widths[1:]), "------")

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(1), r[1].ljust(widths[1]), r[2].rjust(widths[2]),
                 r[3].rjust(widths[3]), r[4]]
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in (header, rule, *body, rule, foot))
