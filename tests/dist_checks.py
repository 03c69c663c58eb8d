"""Multi-rank checks of the model core, run under torchrun by the tests (one launch per
topology, many checks each): oracle equivalence of logits, loss and every gradient, and
bit-identical shared weights across clusters after optimizer steps. Rank 0 writes JSON."""

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from foe_train.compat import SMALL_ALL_REDUCE_BYTES, apply_cpu_compat
from foe_train.config import RecipeConfig, cluster_topk
from foe_train.model import head
from foe_train.model.builder import (
    build_model,
    count_parameters,
    gather_cluster_state_dicts,
    layer_backend,
    wrap_ddp,
)
from foe_train.model.head import head_group
from foe_train.model.layer import FoELayer
from foe_train.model.norm import RMSNorm
from foe_train.model.oracle import ReferenceFoE
from foe_train.runtime import device, init_distributed
from foe_train.topology import build_topology, embedding_sum_rows, node_map
from foe_train.train.job import build_optimizer

TINY = {
    "num_layers": 3, "moe_layer_freq": [1, 0, 1], "hidden_size": 32, "num_attention_heads": 8,
    "num_query_groups": 4, "ffn_hidden_size": 64, "num_experts": 8, "moe_ffn_hidden_size": 16,
    "moe_router_topk": 4, "vocab_size": 32, "seq_length": 16, "aux_loss_coeff": 0.0,
}
BATCH = 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE = torch.float32  # of the model under test (--dtype); the oracle is always float32


def batch(seed: int = 0) -> torch.Tensor:
    """Token ids on the host (the oracle's side); ``on_device`` moves a rank's share."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (BATCH, TINY["seq_length"] + 1), generator=gen)


def on_device(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.to(device())


def shard(data: torch.Tensor, topo) -> torch.Tensor:
    per = data.shape[0] // topo.token_shards
    return data[topo.token_shard * per:(topo.token_shard + 1) * per]


def loss_and_logits(model, tokens):
    """Loss through the split head, and the full-vocabulary logits (detached) to compare."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
    logits = model(inputs, pos, None).float()
    group = head_group(model)
    loss = head.cross_entropy(logits, labels, group).mean()
    return loss, head.gather_logits(logits.detach(), group)


def ref_loss_and_logits(ref, tokens):
    logits = ref(tokens[:, :-1])
    labels = tokens[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)), logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def oracle_check(cfg, topo, recompute: bool = False) -> dict:
    gpt = build_model(cfg.model, topo, seed=cfg.seed, dtype=DTYPE, recompute=recompute)
    if layer_backend() == "local":  # CPU layers norm with model.norm's RMSNorm
        norms = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm")
        built = {type(m) for name, m in gpt.named_modules() if name.endswith(norms)}
        assert built == {RMSNorm}, f"norms built: {built}"
        # and an FoE cluster's attention norm runs inside its QKV projection
        fused = {m.norm_in_qkv for m in gpt.modules() if isinstance(m, FoELayer)}
        assert fused <= {True}, "FoE layers whose attention norm is not fused"
    ddp = wrap_ddp(gpt, topo)
    data = batch()
    loss, logits = loss_and_logits(ddp, on_device(shard(data, topo)))
    loss.backward()
    ddp.finish_grad_sync()
    optimizer, _ = build_optimizer(ddp, cfg, topo, DTYPE)
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    norms: list = [None] * topo.world_size
    dist.all_gather_object(norms, grad_norm)
    all_logits: list = [None] * topo.world_size
    dist.all_gather_object(all_logits, (topo.token_shard, logits.detach().cpu()))
    weights = gather_cluster_state_dicts(gpt, cfg.model, topo)
    grads = gather_cluster_state_dicts(gpt, cfg.model, topo, grads=True)
    if topo.rank != 0:
        return {}
    by_shard = dict(all_logits)
    logits = torch.cat([by_shard[i] for i in range(topo.token_shards)])
    C = topo.clusters if topo.kind == "foe" else 1
    k = cluster_topk(cfg.model, C) if C > 1 else cfg.model.moe_router_topk
    ref = ReferenceFoE(cfg.model, C, k, cfg.model.residual_sync)
    ref.load_megatron(weights)
    ref_loss, ref_logits = ref_loss_and_logits(ref, data)
    ref_loss.backward()
    ref_grads = ref.megatron_grads()
    grad_err = {f"c{c}:{k}": rel(grads[c][k], g) for c in range(C) for k, g in ref_grads[c].items()}
    labels = data[:, 1:].reshape(-1)
    ref_norm = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters())))
    full_loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels))
    return {
        "logits_rel": rel(logits, ref_logits.detach()),
        "loss": full_loss, "ref_loss": float(ref_loss),
        "grad_rel_max": max(grad_err.values()), "grad_rel": grad_err,
        "grads_checked": len(grad_err),
        "grad_norm_rel": max(abs(n - ref_norm) / ref_norm for n in norms),
    }


def shared_sync_check(cfg, topo, steps: int = 5) -> dict:
    gpt = build_model(cfg.model, topo, seed=cfg.seed, dtype=DTYPE)
    ddp = wrap_ddp(gpt, topo)
    opt = torch.optim.Adam(gpt.parameters(), lr=1e-2)
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss, _ = loss_and_logits(ddp, on_device(shard(batch(step + 1), topo)))
        loss.backward()
        ddp.finish_grad_sync()
        for p in gpt.parameters():
            p.grad = p.main_grad.to(p.dtype)
        opt.step()
    outside = {n: p.detach().cpu().clone() for n, p in gpt.named_parameters()
               if "decoder.layers" not in n}
    everyone: list = [None] * topo.world_size
    dist.all_gather_object(everyone, (topo.cluster, outside))
    split = sorted(n for n, p in gpt.named_parameters() if head.vocab_shard(p))
    shared = sorted(set(outside) - set(split))
    identical = all(torch.equal(everyone[0][1][n], other[n]) for _, other in everyone
                    for n in shared)
    # a vocabulary shard is held by every rank of one cluster (token-DP replicas)
    identical &= all(torch.equal(a[n], b[n]) for ca, a in everyone for cb, b in everyone
                     if ca == cb for n in split)
    return {"shared_identical": identical, "shared_params": shared, "split_params": split}


def head_cost(gpt, topo) -> dict:
    """Per rank: output-layer multiply-adds of one forward on this rank's share of BATCH
    sequences, and the elements of the weights outside the decoder layers."""
    macs = []
    hook = gpt.output_layer.register_forward_hook(
        lambda m, inputs, out: macs.append(inputs[0].shape[0] * inputs[0].shape[1]
                                           * m.weight.shape[0] * m.weight.shape[1]))
    with torch.no_grad():
        inputs = on_device(shard(batch(), topo))[:, :-1]
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        gpt(inputs, positions.unsqueeze(0).expand_as(inputs), None)
    hook.remove()
    memory = sum(p.numel() for n, p in gpt.named_parameters() if "decoder.layers" not in n)
    return {"output_macs": macs[0], "outside_layers_numel": memory}


def same_function_check() -> dict:
    """C = 1: FoE and the stock baseline loaded with the same weights compute the same logits
    and gradients."""
    models, outs = {}, {}
    for kind in ("foe", "moe"):
        cfg = RecipeConfig.model_validate({"model": dict(TINY, kind=kind)})
        topo = build_topology(cfg.model, cfg.parallel)
        models[kind] = build_model(cfg.model, topo, seed=cfg.seed)
    models["moe"].load_state_dict(models["foe"].state_dict())
    for kind, model in models.items():
        loss, logits = loss_and_logits(model, on_device(batch()))
        loss.backward()
        outs[kind] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (foe_logits, foe_grads), (moe_logits, moe_grads) = outs["foe"], outs["moe"]
    return {
        "logits_rel": rel(foe_logits, moe_logits),
        "grad_rel_max": max(rel(foe_grads[n], moe_grads[n]) for n in moe_grads),
        "same_names": sorted(foe_grads) == sorted(moe_grads),
    }


@contextmanager
def inputs_to(collective: str) -> Iterator[list[torch.Tensor]]:
    """The input tensors of every torch.distributed.<collective> call made inside the block."""
    inputs: list[torch.Tensor] = []
    original = getattr(dist, collective)

    def record(output: torch.Tensor, input: torch.Tensor, *args: object,
               **kwargs: object) -> object:
        inputs.append(input)
        return original(output, input, *args, **kwargs)

    setattr(dist, collective, record)
    try:
        yield inputs
    finally:
        setattr(dist, collective, original)


def reduce_scatter_check() -> dict:
    """torch.distributed.reduce_scatter_tensor on gloo once foe_train.compat is applied: the
    sum over ranks of each rank's chunk, sent as one all-to-all (gloo's own reduce-scatter
    all-reduces the whole input)."""
    apply_cpu_compat()
    n, rank = dist.get_world_size(), dist.get_rank()
    x = torch.arange(n * 6, dtype=torch.float32).view(n * 3, 2) * (rank + 1)
    out = torch.empty(3, 2)
    with inputs_to("all_to_all_single") as calls:
        dist.reduce_scatter_tensor(out, x)
    want = x.view(n, 3, 2)[rank] / (rank + 1) * n * (n + 1) / 2
    return {"world": n, "equal": torch.equal(out, want),
            "all_to_all_inputs": [list(c.shape) for c in calls]}


def small_all_reduce_check() -> dict:
    """torch.distributed.all_reduce on gloo once foe_train.compat is applied: a small tensor's
    sum comes from one all-gather and a local sum (gloo's ring takes twice the steps), a large
    one from gloo's own all-reduce, as is a small one queued in a coalescing manager (megatron
    DDP's bucket all-reduce), and all equal the sum over ranks."""
    apply_cpu_compat()
    n, rank = dist.get_world_size(), dist.get_rank()
    small = torch.arange(6, dtype=torch.float32).view(3, 2).t() * (rank + 1)  # not contiguous
    large = torch.full((SMALL_ALL_REDUCE_BYTES // 4 + 1,), float(rank + 1))
    queued = torch.full((4,), float(rank + 1))
    with inputs_to("all_gather_into_tensor") as gathers:
        dist.all_reduce(small)
        dist.all_reduce(large)
        with dist.distributed_c10d._coalescing_manager(dist.group.WORLD):
            dist.all_reduce(queued)
    total = n * (n + 1) / 2
    return {"world": n, "gathers": [g.numel() for g in gathers],
            "small_equal": torch.equal(small, torch.arange(6.0).view(3, 2).t() * total),
            "large_equal": bool((large == total).all()),
            "queued_equal": bool((queued == total).all())}


def run(kind: str, parallel: dict, modes: list, dispatcher: str) -> dict:
    results = {}
    for mode in modes:
        model = dict(TINY, kind=kind, token_dispatcher=dispatcher,
                     **({"residual_sync": mode} if mode else {}))
        # every sum two-level where clusters share nodes, however small the test's tensors
        cfg = RecipeConfig.model_validate(
            {"model": model, "parallel": {**parallel, "two_level_min_bytes": 0}})
        topo = build_topology(cfg.model, cfg.parallel)
        results[mode or "moe"] = oracle_check(cfg, topo)
        results["two_level"] = kind == "foe" and topo.federation_groups()[1] is not None
        results[mode or "moe"].update(shared_sync_check(cfg, topo))
    if kind == "foe":
        tokens = BATCH // topo.token_shards * TINY["seq_length"]
        results["embedding_sum"] = (
            "table" if embedding_sum_rows(tokens, TINY["vocab_size"]) < tokens else "tokens")
    if kind == "foe" and dispatcher == "alltoall":
        # the tied embedding is split with the output layer and sums its tokens' shares
        tied = dict(model, residual_sync="post_attention", untie_embeddings=False)
        cfg = RecipeConfig.model_validate({"model": tied, "parallel": cfg.parallel.model_dump()})
        results["tied"] = oracle_check(cfg, build_topology(cfg.model, cfg.parallel))
        # megatron's activation recompute checkpoints each layer with the pending MoE output
        # it carries to the next as ``context``
        untied = dict(model, residual_sync="post_attention")
        cfg = RecipeConfig.model_validate({"model": untied,
                                           "parallel": cfg.parallel.model_dump()})
        results["recompute"] = oracle_check(cfg, build_topology(cfg.model, cfg.parallel),
                                            recompute=True)
        for other in ("foe", "moe"):
            recipe = {"model": dict(TINY, kind=other), "parallel": parallel}
            cfg = RecipeConfig.model_validate(recipe)
            topo = build_topology(cfg.model, cfg.parallel)
            gpt = build_model(cfg.model, topo)
            results[f"params_{other}"] = count_parameters(gpt, cfg.model, topo)
            results[f"head_{other}"] = head_cost(gpt, topo)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--foe", nargs="*", default=[],
                    help="FoE topologies D,C,L[:allgather] (dispatcher, default alltoall)")
    ap.add_argument("--moe", nargs="*", default=[], help="baseline EP sizes EP[:allgather]")
    ap.add_argument("--same-function", action="store_true")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args()
    global DTYPE
    DTYPE = DTYPES[args.dtype]
    init_distributed()
    results = {"launch": {"nodes": len(set(node_map()))}}
    for spec in args.foe:
        layout, _, dispatcher = spec.partition(":")
        D, C, L = (int(x) for x in layout.split(","))
        parallel = {"data": D, "clusters": C, "ranks_per_cluster": L}
        modes = ["post_attention", "post_attention_and_moe"]
        results[f"foe:{spec}"] = run("foe", parallel, modes, dispatcher or "alltoall")
    for spec in args.moe:
        ep, _, dispatcher = spec.partition(":")
        parallel = {"expert_parallel": int(ep)}
        results[f"moe:{spec}"] = run("moe", parallel, [None], dispatcher or "alltoall")
    if args.same_function:
        results["same_function"] = same_function_check()
    results["reduce_scatter"] = reduce_scatter_check()
    results["small_all_reduce"] = small_all_reduce_check()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
