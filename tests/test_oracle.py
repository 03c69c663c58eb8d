"""The oracle (foe_train/model/oracle.py) against stock megatron-core on CPU, one process.

C=1: the whole GPTModel (logits, loss, every grad). C=2: megatron's own per-cluster layer
modules (one GPTModel per cluster, per-cluster config) composed by the federated-sum formulas
of docs/design.md §1, which is the independent statement of the FoE math.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from foe_train.config import ModelConfig
from foe_train.model.oracle import SHARED_KEYS, ReferenceFoE

V, B, S = 256, 2, 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pg_collection():
    """A gloo world of 1 with megatron on CPU; yields its ProcessGroupCollection."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    from foe_train.compat import apply_cpu_compat

    apply_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    ps._set_global_memory_buffer()
    names = ["tp", "cp", "ep", "pp", "dp"]
    grid = HyperCommGrid([1, 1, 1, 1, 1], names)
    pg = {n: grid.create_pg(n) for n in names}
    yield ProcessGroupCollection(
        tp=pg["tp"], cp=pg["cp"], pp=pg["pp"], ep=pg["ep"], embd=None, pos_embd=None,
        tp_cp=pg["tp"], tp_ep=pg["ep"], expt_tp=pg["tp"], tp_dp_cp=pg["dp"], dp=pg["dp"],
        dp_cp=pg["dp"], expt_dp=pg["dp"], tp_ep_pp=pg["ep"], mp=pg["tp"],
    )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def build(pg_collection):
    """build(model, clusters, k, seed): a stock megatron GPTModel in the world of 1."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    pgc = pg_collection

    def _build(m: ModelConfig, clusters: int, k: int, seed: int):
        """Stock GPTModel with the per-cluster config; norms perturbed off 1 so that a mixed-up
        norm shows."""
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)
        c = clusters
        cfg = TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads // c,
            num_query_groups=m.num_query_groups // c,
            kv_channels=m.hidden_size // m.num_attention_heads,
            ffn_hidden_size=m.ffn_hidden_size // c, num_moe_experts=m.num_experts // c,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size, moe_router_topk=k,
            moe_layer_freq=m.moe_layer_freq, moe_router_pre_softmax=m.router_pre_softmax,
            moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0,
            layernorm_epsilon=m.layernorm_epsilon, init_method_std=m.init_method_std,
            use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
            attention_dropout=0.0, params_dtype=torch.float32, bf16=False,
        )
        if isinstance(m.moe_layer_freq, list):  # dense layers: the decoder block spec
            spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False,
                                              normalization="RMSNorm", pp_rank=0)
        else:
            spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts,
                                            moe_grouped_gemm=False, normalization="RMSNorm")
        gpt = GPTModel(cfg, spec, vocab_size=m.vocab_size, max_sequence_length=S,
                       position_embedding_type="rope", rotary_base=m.rotary_base,
                       pg_collection=pgc)
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                if "layernorm" in name:
                    p.add_(0.2 * torch.randn_like(p))
        return gpt

    return _build


def _model(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=32, vocab_size=V,
                init_method_std=0.05, rotary_base=500)
    return ModelConfig(**(base | kw))


def _params(gpt) -> dict[str, torch.nn.Parameter]:
    return dict(gpt.named_parameters())


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = (got - want).abs().max() / want.abs().max().clamp_min(1e-30)
    assert err <= tol, f"{what}: max relative error {err:.2e} > {tol:.0e}"


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


@pytest.mark.parametrize(
    "k,pre_softmax,freq",
    [(2, True, 1), (1, True, 1), (2, False, 1), (2, True, [1, 0])],
    ids=["top2", "top1", "top2-post-softmax", "top2-dense-layer"],
)
def test_baseline_matches_megatron_gpt(build, k, pre_softmax, freq):
    m = _model(moe_router_topk=k, router_pre_softmax=pre_softmax, moe_layer_freq=freq)
    gpt = build(m, 1, k, seed=3)
    oracle = ReferenceFoE(m, 1, k, "post_attention")
    oracle.load_megatron([gpt.state_dict()])
    tokens, labels = _data()
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    want = gpt(tokens, pos, None)
    got = oracle(tokens)
    assert got.dtype == torch.float32 and got.shape == (B, S, V)
    _close(got, want, 1e-5, "logits")
    want_loss, got_loss = _loss(want, labels), _loss(got, labels)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    want_loss.backward()
    got_loss.backward()
    (grads,) = oracle.megatron_grads()
    params = _params(gpt)
    assert grads.keys() == params.keys()
    for key, p in params.items():
        _close(grads[key], p.grad, 1e-4, key)
    other = ReferenceFoE(m, 1, k, "post_attention_and_moe")  # the modes coincide at C=1
    other.load_megatron([gpt.state_dict()])
    _close(other(tokens), got, 1e-6, "post_attention_and_moe at C=1")


def _megatron_foe(gpts, tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """design §1 (docs/design.md) written with megatron's per-cluster layer modules ([s, b, d])."""
    shared = gpts[0]
    h = shared.embedding(input_ids=tokens, position_ids=None)
    rope = shared.rotary_pos_emb(S)
    layers = list(zip(*(g.decoder.layers for g in gpts), strict=True))

    def attn(layer, x):
        return layer.self_attention(layer.input_layernorm(x), attention_mask=None,
                                    rotary_pos_emb=rope)[0]

    def ffn(layer, x):
        return layer.mlp(layer.pre_mlp_layernorm(x))[0]

    if mode == "post_attention_and_moe":
        for layer in layers:
            h = h + sum(attn(cl, h) for cl in layer)
            h = h + sum(ffn(cl, h) for cl in layer)
    else:
        pending = [torch.zeros_like(h) for _ in gpts]
        for layer in layers:
            h = h + sum(mc + attn(cl, h + mc) for cl, mc in zip(layer, pending, strict=True))
            pending = [ffn(cl, h) for cl in layer]
        h = h + sum(pending)
    return shared.output_layer(shared.decoder.final_layernorm(h))[0].transpose(0, 1)


@pytest.mark.parametrize("mode", ["post_attention", "post_attention_and_moe"])
def test_federation_matches_megatron_cluster_modules(build, mode):
    m = _model(num_experts=8, moe_router_topk=2, moe_layer_freq=[1, 0])
    gpts = [build(m, 2, 1, seed=10 + c) for c in range(2)]
    with torch.no_grad():  # shared weights identical on both clusters
        for key in SHARED_KEYS:
            _params(gpts[1])[key].copy_(_params(gpts[0])[key])
    oracle = ReferenceFoE(m, 2, 1, mode)
    oracle.load_megatron([g.state_dict() for g in gpts])
    tokens, labels = _data(1)
    want, got = _megatron_foe(gpts, tokens, mode), oracle(tokens)
    _close(got, want, 1e-5, "logits")
    _loss(want, labels).backward()
    _loss(got, labels).backward()
    grads = oracle.megatron_grads()
    for c, gpt in enumerate(gpts):
        params = _params(gpt)
        assert grads[c].keys() == params.keys()  # load_megatron -> megatron_grads round trip
        for key, p in params.items():
            want_grad = _params(gpts[0])[key].grad if key in SHARED_KEYS else p.grad
            assert grads[c][key].shape == p.shape
            _close(grads[c][key], want_grad, 1e-4, f"cluster {c} {key}")


@torch.no_grad()
def test_cluster_attentions_sum_to_full_gqa():
    """With MLPs zeroed, C=2 attention slices (qkv rows / proj columns) add up to the full GQA
    attention of C=1; megatron's per-group qkv layout makes the qkv rows a plain concat."""
    torch.manual_seed(0)
    m = _model(moe_layer_freq=[1, 0])
    one = ReferenceFoE(m, 1, 2, "post_attention")
    for mode in ["post_attention", "post_attention_and_moe"]:
        two = ReferenceFoE(m, 2, 1, mode)
        for name in ["embedding.weight", "final_layernorm.weight", "output_layer.weight"]:
            two.get_parameter(name).copy_(one.get_parameter(name))
        for full, (a, b) in zip(one.layers, two.layers, strict=True):
            (full,) = full
            a.input_layernorm.weight.normal_(1.0, 0.2)
            b.input_layernorm.weight.copy_(a.input_layernorm.weight)
            full.input_layernorm.weight.copy_(a.input_layernorm.weight)
            qkv = [cl.self_attention.linear_qkv.weight for cl in (a, b)]
            proj = [cl.self_attention.linear_proj.weight for cl in (a, b)]
            full.self_attention.linear_qkv.weight.copy_(torch.cat(qkv, dim=0))
            full.self_attention.linear_proj.weight.copy_(torch.cat(proj, dim=1))
            for cl in (full, a, b):
                for name, p in cl.mlp.named_parameters():
                    if "linear_fc2" in name:
                        p.zero_()
        tokens, _ = _data(2)
        _close(two(tokens), one(tokens), 1e-5, mode)


def test_parameter_budget_and_load_errors():
    """Attention and experts split exactly; per-cluster norms add 2*(C-1)*d per layer."""
    m = _model(num_experts=8, moe_layer_freq=[1, 0])
    one, two = ReferenceFoE(m, 1, 2, "post_attention"), ReferenceFoE(m, 2, 1, "post_attention")
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(two) - count(one) == m.num_layers * 2 * (2 - 1) * m.hidden_size
    assert two.megatron_grads() == [{}, {}]  # no grads before backward
    sds = [{k: p.detach().clone() for k, p in two._cluster_params(c).items()} for c in range(2)]
    two.load_megatron(sds)
    good = sds[1]["output_layer.weight"]
    sds[1]["output_layer.weight"] = good + 1.0
    with pytest.raises(ValueError, match="shared"):
        two.load_megatron(sds)
    sds[1]["output_layer.weight"] = good
    sds[1]["decoder.layers.0.mlp.router.weight"] = torch.zeros(8, m.hidden_size)
    with pytest.raises(ValueError, match="router"):
        two.load_megatron(sds)
    del sds[0]["decoder.layers.1.mlp.linear_fc1.weight"]
    with pytest.raises(KeyError):
        two.load_megatron(sds)


@pytest.mark.parametrize("sq,sk", [(12, 12), (1, 12), (4, 12)], ids=["prefill", "decode", "chunk"])
def test_sdpa_core_attention_equals_megatron_local(build, sq, sk):
    """The GPU-without-TE core attention (torch SDPA) computes what megatron's local
    DotProductAttention does: causal prefill, one decode query against the cache, and a
    chunk of queries at the end of the keys (8 query heads over 4 KV heads)."""
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from foe_train.model.attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=8,
                            num_query_groups=4, use_cpu_initialization=True, attention_dropout=0.0)
    tp = HyperCommGrid([1], ["tp"]).create_pg("tp")
    pgc = ProcessGroupCollection(tp=tp)
    args = (cfg, 1, AttnMaskType.causal, "self")
    local, sdpa = DotProductAttention(*args, pg_collection=pgc), SDPAttention(*args,
                                                                              pg_collection=pgc)
    # the local attention forks megatron's RNG for dropout
    model_parallel_cuda_manual_seed(0, tp_rank=0, ep_rank=0, etp_rank=0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sq, 2, 8, 8, generator=g)
    k, v = (torch.randn(sk, 2, 4, 8, generator=g) for _ in range(2))
    # megatron's local attention masks with an explicit bool mask (True: dropped) when the
    # query block is not square; SDPAttention aligns the causal mask to the end of the keys
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq).logical_not()[None, None]
    want = local(q, k, v, mask if sq != sk and sq > 1 else None)
    _close(sdpa(q, k, v, None), want, 1e-5, "attention output")
    assert sdpa(q, k, v, None).shape == (sq, 2, 64)


class _Ops(TorchDispatchMode):
    """The aten ops run inside it, by name, with the largest output each wrote (elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[str, int] = {}

    @property
    def seen(self) -> set[str]:
        return set(self.largest)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        size = out.numel() if isinstance(out, torch.Tensor) else 0
        self.largest[name] = max(self.largest.get(name, 0), size)
        return out


def test_single_rank_dispatcher_permutes_as_megatron_without_data_dependent_sizes(pg_collection):
    """An expert group of one rank (FoE, L = 1): foe_train.model.dispatcher gives megatron's
    allgather dispatcher's permuted tokens, counts, probabilities and combined output, and
    computes no data-dependent size (masked_select, nonzero: each a device->host sync on a
    GPU) on the way."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from foe_train.model.dispatcher import SingleRankTokenDispatcher

    E, k, T, d = 4, 2, 12, 8
    cfg = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=1,
                            num_moe_experts=E, moe_router_topk=k,
                            moe_token_dispatcher_type="allgather")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, 1, d, generator=g, requires_grad=True)
    scores = torch.randn(T, E, generator=g).softmax(-1)
    top = scores.topk(k, dim=-1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    probs = (scores * routing_map).requires_grad_()
    expert_out = torch.randn(T * k, d, generator=g)
    results = {}
    for cls in (MoEAllGatherTokenDispatcher, SingleRankTokenDispatcher):
        dispatcher = cls(E, list(range(E)), config=cfg, pg_collection=pg_collection)
        with _Ops() as ops:
            x, p = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
            x, p = dispatcher.token_dispatch(x, p)
            permuted, counts, permuted_probs = dispatcher.dispatch_postprocess(x, p)
        combined = dispatcher.combine_postprocess(dispatcher.token_combine(
            dispatcher.combine_preprocess(expert_out + permuted * permuted_probs[:, None])))
        grads = torch.autograd.grad(combined.square().sum(), (hidden, probs))
        results[cls] = (permuted, counts, permuted_probs, combined, *grads), ops.seen
        # the combine's scatter_add_ runs about 12x slower on a CPU with a strided index
        assert dispatcher.reversed_local_input_permutation_mapping.is_contiguous(), cls
    (want, megatron_ops), (got, ours) = results.values()
    for name, a, b in zip(("tokens", "counts", "probs", "combined", "d_hidden", "d_probs"),
                          got, want, strict=True):
        assert torch.equal(a, b), name
    assert {"masked_select", "nonzero"} & megatron_ops  # the check sees megatron's syncs
    assert not {"masked_select", "nonzero", "_local_scalar_dense", "item"} & ours, ours


def test_rms_norm_matches_torch():
    """model.norm's RMSNorm (the CPU layers' norm, with its own backward) against torch's:
    output, input gradient and weight gradient, and its own three-pass forward without
    gradients (one vector norm, where torch squares, averages and copies)."""
    from foe_train.model.norm import RMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(None, 32, eps=1e-5), torch.nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(5, 3, 32) * 3
    g = torch.randn(5, 3, 32)
    outs, grads, nodes = [], [], []
    for norm in (ours, ref):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(g)
        outs.append(y.detach())
        grads.append((xi.grad, norm.weight.grad))
        nodes.append(type(y.grad_fn).__name__)
    assert nodes[0] == "_RMSNormBackward" != nodes[1]
    _close(outs[0], outs[1], 1e-6, "output")
    _close(grads[0][0], grads[1][0], 1e-6, "input gradient")
    _close(grads[0][1], grads[1][1], 1e-6, "weight gradient")
    with torch.no_grad():
        _close(ours(x), ref(x), 1e-6, "output without gradients")
        with _Ops() as ops:
            ours(x)
    # one vector norm over the activations; torch squares them (pow) first
    assert "linalg_vector_norm" in ops.seen and ops.largest.get("pow", 0) < x.numel(), ops.largest


def test_norm_fused_into_linear_matches_norm_then_linear(pg_collection):
    """NormColumnParallelLinear with a fused RMSNorm gives the norm-then-linear output and
    gradients (input, linear weight, norm weight), without writing a normalised copy of the
    input: no elementwise op produces a tensor the size of its [T, d] input, with or without
    gradients. Unfused (no ``fuse``), it is megatron's linear layer on its input."""
    from megatron.core.transformer import TransformerConfig

    from foe_train.model.norm import NormColumnParallelLinear, RMSNorm

    d, out = 32, 16  # narrower output, as an FoE cluster's QKV projection
    cfg = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=1,
                            add_bias_linear=False, use_cpu_initialization=True)
    linear = NormColumnParallelLinear(d, out, config=cfg, init_method=torch.nn.init.normal_,
                                      bias=False, gather_output=False,
                                      tp_group=pg_collection.tp)
    norm = RMSNorm(None, d, eps=1e-5)
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(6, 3, d) * 3
    g = torch.randn(6, 3, out)
    results = []
    for fused in (False, True):
        if fused:
            linear.fuse(norm)
        xi = x.clone().requires_grad_()
        with _Ops() as ops:
            y, bias = linear(xi) if fused else linear(norm(xi))
        y.backward(g)
        results.append((y.detach(), xi.grad, linear.weight.grad.clone(), norm.weight.grad.clone()))
        linear.weight.grad = norm.weight.grad = None
    assert bias is None and not [n for n, _ in linear.named_parameters() if "norm" in n]
    for name, a, b in zip(("output", "input grad", "weight grad", "norm weight grad"),
                          *results, strict=True):
        _close(a, b, 1e-5, name)
    elementwise = ("mul", "mul_", "div", "add", "copy_", "clone")
    assert all(ops.largest.get(op, 0) < x.numel() for op in elementwise), ops.largest
    with torch.no_grad(), _Ops() as ops:
        y_nograd, _ = linear(x)
    _close(y_nograd, results[0][0], 1e-5, "output without gradients")
    assert all(ops.largest.get(op, 0) < x.numel() for op in elementwise), ops.largest
