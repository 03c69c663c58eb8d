"""Build the GPT model of a recipe: FoE (clusters of FoELayer) or the stock megatron-core MoE
baseline, from one model section. Embedding, final norm and output layer are ordinary GPTModel
parts; for FoE the embedding and output layer are split over the federation's vocabulary
(``model.head``), so no cluster repeats another's work on them."""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    LNImpl,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.grouped_gemm_util import grouped_gemm_is_available
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from foe_train.compat import apply_cpu_compat
from foe_train.config import ModelConfig, cluster_topk
from foe_train.model.attention import SDPAttention
from foe_train.model.balanced_router import BalancedTopKRouter
from foe_train.model.dispatcher import use_single_rank_dispatchers
from foe_train.model.federation import Federation
from foe_train.model.head import (
    FederatedEmbedding,
    keep_logits_split,
    mark_vocab_shards,
    sum_embedded_shares,
    sum_head_input_shares,
    vocab_shard,
)
from foe_train.model.layer import FoELayer
from foe_train.model.norm import NormColumnParallelLinear, RMSNorm
from foe_train.topology import Topology, token_dispatcher


def transformer_config(
    model: ModelConfig, clusters: int = 1, ep: int = 1, dtype: torch.dtype = torch.float32,
    recompute: bool = False, backend: str = "local",
) -> TransformerConfig:
    """megatron TransformerConfig of one cluster (clusters=1: the whole baseline model).
    recompute: megatron's full activation recompute, one layer at a time; backend: see
    ``layer_backend``."""
    topk = cluster_topk(model, clusters) if clusters > 1 else model.moe_router_topk
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads // clusters,
        num_query_groups=model.num_query_groups // clusters,
        kv_channels=model.hidden_size // model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size // clusters,
        num_moe_experts=model.num_experts // clusters,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=topk,
        moe_layer_freq=model.moe_layer_freq,
        moe_token_dispatcher_type=token_dispatcher(model, ep, topk),
        moe_grouped_gemm=uses_grouped_gemm(backend),
        moe_router_pre_softmax=model.router_pre_softmax,
        moe_aux_loss_coeff=model.aux_loss_coeff,
        moe_z_loss_coeff=model.z_loss_coeff,
        expert_model_parallel_size=ep,
        normalization="RMSNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def layer_backend() -> str:
    """Which megatron-core layer implementation this process builds: 'te' (Transformer
    Engine: fused norm+linear, cuDNN/flash attention, grouped expert GEMMs) on CUDA when TE
    imports, as in the NGC image; 'sdpa' (local layers, torch's fused attention) on CUDA
    without TE; 'local' (megatron's plain PyTorch layers) on CPU."""
    if not torch.cuda.is_available():
        return "local"
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return "sdpa"
    return "te"


def uses_grouped_gemm(backend: str) -> bool:
    """Experts as one grouped GEMM (TE's, or the grouped_gemm package's) instead of a loop."""
    return backend == "te" or (backend == "sdpa" and grouped_gemm_is_available())


def _layer_spec(model: ModelConfig, layer: int, experts: int, backend: str) -> ModuleSpec:
    moe = model.layer_is_moe(layer)
    grouped = moe and uses_grouped_gemm(backend)
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts if moe else None, moe_grouped_gemm=grouped,
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=experts if moe else None, moe_grouped_gemm=grouped,
            normalization="RMSNorm",
        )
        if backend == "sdpa":
            attention = spec.submodules.self_attention.submodules
            attention.core_attention = SDPAttention
        if norm := _cpu_norm(backend):
            spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm
    if model.balanced_routing and moe:
        mlp = spec.submodules.mlp
        mlp.submodules = dataclasses.replace(mlp.submodules, router=BalancedTopKRouter)
    return spec


def _cpu_norm(backend: str) -> type | None:
    """model.norm's RMSNorm for every norm of megatron's local (CPU) layers and the decoder's
    last one; None: the specs' own norms."""
    return RMSNorm if backend == "local" else None


def block_spec(
    model: ModelConfig, topo: Topology, dtype: torch.dtype, recompute: bool = False,
    backend: str = "local", federation: Federation | None = None,
) -> TransformerBlockSubmodules:
    """Layer specs of the decoder: stock layers for the baseline, FoELayer for FoE (whose
    layers sum over ``federation``)."""
    final_norm = _cpu_norm(backend) or LNImpl
    if topo.kind == "moe":
        specs = [_layer_spec(model, i, model.num_experts, backend)
                 for i in range(model.num_layers)]
        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
    params = {
        "cluster_config": transformer_config(
            model, topo.clusters, topo.ranks_per_cluster, dtype, recompute, backend
        ),
        "cluster_pg_collection": topo.cluster_pg_collection(),
        "federation": federation,
        "residual_sync": model.residual_sync,
    }
    specs = []
    for i in range(model.num_layers):
        stock = _layer_spec(model, i, model.num_experts // topo.clusters, backend)
        if _cpu_norm(backend):
            # 1/C of the heads: the QKV projection is narrower than d, so the norm fuses into it
            stock.submodules.self_attention.submodules.linear_qkv = NormColumnParallelLinear
        specs.append(ModuleSpec(module=FoELayer, submodules=stock.submodules, params=params))
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


def build_model(
    model: ModelConfig, topo: Topology, seed: int = 1234, dtype: torch.dtype = torch.float32,
    recompute: bool = False, backend: str | None = None,
) -> GPTModel:
    """The rank's GPTModel. Seeds so that shared weights are identical on every rank and
    expert weights depend on the expert's global index only, whatever the topology.
    backend: ``layer_backend()`` unless given."""
    backend = backend or layer_backend()
    apply_cpu_compat()
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    ep_rank = dist.get_rank(topo.cluster_pg_collection().ep)
    model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=ep_rank, etp_rank=0)
    torch.manual_seed(seed)
    config = transformer_config(model, 1, topo.expert_parallel, dtype, recompute, backend)
    fed = None
    if topo.kind == "foe":
        # one per model: its layers, embedding and head share the groups and sending thread
        fed = Federation(*topo.federation_groups(),
                         two_level_min_bytes=topo.grid.two_level_min_bytes,
                         overlap_min_bytes=topo.grid.overlap_min_bytes)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(model, topo, dtype, recompute, backend, fed),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        share_embeddings_and_output_weights=not model.untie_embeddings,
        pg_collection=topo.model_pg_collection(),
    )
    if fed is not None:
        sum_head_input_shares(gpt.output_layer, fed)
        if gpt.share_embeddings_and_output_weights:
            sum_embedded_shares(gpt.embedding, fed)
        else:
            # the lookup stays whole on every cluster (model.head); only the output layer splits
            gpt.embedding = LanguageModelEmbedding(
                config=config, vocab_size=model.vocab_size, max_sequence_length=model.seq_length,
                position_embedding_type="rope", tp_group=topo.groups["single"],
            )
            gpt.embedding.word_embeddings = FederatedEmbedding(
                model.vocab_size, model.hidden_size, init_method=config.init_method,
                config=config, tp_group=topo.groups["single"], federation=fed,
            )
    use_single_rank_dispatchers(gpt)
    mark_vocab_shards(gpt)
    init_weights(gpt, model, topo, seed)
    keep_logits_split(gpt)
    for name, param in gpt.named_parameters():
        # megatron marks experts expert-parallel only when EP > 1; we always do, so expert
        # grads reduce over expert-DP and the optimizer (hence a checkpoint's layout) has the
        # same dense/expert split at every topology
        if ".local_experts." in name:
            param.allreduce = False
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def global_name(name: str, topo: Topology, experts_per_rank: int) -> str:
    """A parameter's name independent of where it lives: local expert j on expert-rank l
    becomes the cluster's expert l*experts_per_rank + j, prefixed by the cluster for FoE."""
    if ".local_experts." in name:
        head, tail = name.split(".local_experts.")
        j, rest = tail.split(".", 1)
        l = dist.get_rank(topo.cluster_pg_collection().ep)
        name = f"{head}.local_experts.{l * experts_per_rank + int(j)}.{rest}"
    if topo.kind == "foe" and "decoder.layers." in name:
        return f"cluster{topo.cluster}/{name}"
    return name


def init_weights(gpt: GPTModel, model: ModelConfig, topo: Topology, seed: int) -> None:
    """Re-draw every weight from a generator keyed by its global name, so an expert gets the
    same weights whichever rank holds it, and shared weights agree on every rank."""
    experts = model.num_experts // (topo.clusters if topo.kind == "foe" else 1)
    per_rank = experts // topo.expert_parallel
    out_std = model.init_method_std / math.sqrt(2.0 * model.num_layers)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
                continue
            key = global_name(name, topo, per_rank)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
            scaled = "linear_proj" in name or "linear_fc2" in name
            std = out_std if scaled else model.init_method_std
            shard = vocab_shard(param)
            shape = (param.shape[0] * shard[1], *param.shape[1:]) if shard else param.shape
            full = torch.randn(shape, generator=gen) * std
            param.copy_(full.chunk(shard[1])[shard[0]] if shard else full)


def named_global_parameters(
    gpt: torch.nn.Module, model: ModelConfig, topo: Topology
) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) for every weight of this rank."""
    experts = model.num_experts // (topo.clusters if topo.kind == "foe" else 1)
    per_rank = experts // topo.expert_parallel
    for name, param in gpt.named_parameters():
        yield global_name(name.removeprefix("module."), topo, per_rank), param


def _shard_key(name: str, param: torch.Tensor) -> str:
    shard = vocab_shard(param)
    return f"{name}#{shard[0]}" if shard else name


def count_parameters(gpt: torch.nn.Module, model: ModelConfig, topo: Topology) -> int:
    """Total parameters of the whole model over all ranks, each weight counted once."""
    local = {_shard_key(name, param): param.numel()
             for name, param in named_global_parameters(gpt, model, topo)}
    everything: list[object] = [None] * topo.world_size
    dist.all_gather_object(everything, local)
    merged: dict[str, int] = {}
    for part in everything:
        merged.update(part)
    return sum(merged.values())


def gather_cluster_state_dicts(
    gpt: torch.nn.Module, model: ModelConfig, topo: Topology, grads: bool = False
) -> list[dict[str, torch.Tensor]] | None:
    """Every cluster's full state (or gradients) in megatron key names, experts numbered
    within the cluster, on rank 0 (None elsewhere). Shared weights appear in every cluster,
    the split head's vocabulary shards joined."""
    local = {}
    for name, param in named_global_parameters(gpt, model, topo):
        value = getattr(param, "main_grad", None) if grads else param
        if grads and value is None:
            value = param.grad
        local[_shard_key(name, param)] = value.detach().float().cpu().clone()
    everything: list[object] = [None] * topo.world_size
    dist.all_gather_object(everything, local)
    if topo.rank != 0:
        return None
    clusters = topo.clusters if topo.kind == "foe" else 1
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(clusters)]
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for part in everything:
        for key, value in part.items():
            if key.startswith("cluster"):
                prefix, name = key.split("/", 1)
                out[int(prefix.removeprefix("cluster"))][name] = value
            elif "#" in key:
                name, index = key.split("#")
                shards.setdefault(name, {})[int(index)] = value
            else:
                for sd in out:
                    sd[key] = value
    for name, parts in shards.items():
        for sd in out:
            sd[name] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def wrap_ddp(gpt: GPTModel, topo: Topology, distributed_optimizer: bool = False) -> torch.nn.Module:
    """megatron DDP with FoE's reduction groups: dense and shared grads over the token-DP
    group (same-cluster ranks), expert grads over the expert-DP group (DESIGN §4)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    return DistributedDataParallel(
        config=gpt.config, ddp_config=ddp_config, module=gpt,
        pg_collection=topo.cluster_pg_collection(),
    )
