"""megatron-core on CPU with gloo.

megatron-core calls CUDA APIs unconditionally in a few places. Without CUDA we replace exactly
those calls with CPU equivalents, gloo's reduce-scatter, which would move twice the bytes of one
(``_gloo_reduce_scatter``), and gloo's all-reduce of small tensors, which takes twice the
sequential steps it needs (``_gloo_small_all_reduce``); with CUDA nothing is touched. Each
patch names the megatron-core call it serves, and each refuses (CompatError) a name that no
longer exists, so a megatron-core upgrade cannot leave a patch silently doing nothing. The
"CUDA" RNG that megatron's tracker forks is emulated by one CPU generator, so forks and seeds
behave deterministically.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_applied = False
_virtual_cuda_rng = torch.Generator()


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: megatron.core.transformer.moe.token_dispatcher
    and megatron.core.distributed create side streams and events for overlap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NullStream:
        return self

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _virtual_cuda_rng.get_state()


def _set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    _virtual_cuda_rng.set_state(state)


def _manual_seed(seed: int) -> None:
    _virtual_cuda_rng.manual_seed(int(seed))


def _move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """moe_utils.maybe_move_tensor_to_cpu: the alltoall dispatcher needs numpy split sizes,
    which the original only produces for CUDA tensors."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor


def _on_cpu(factory: Any) -> Any:
    def make(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type != "cuda":
            kwargs["device"] = device
        return factory(*args, **kwargs)

    return make


class _TorchOnCpu(types.ModuleType):
    """The ``torch`` that megatron.core.optimizer.{optimizer,clip_grads,distrib_optimizer}
    and megatron.core.utils see: those modules allocate their scalars (loss scale, found_inf,
    grad-norm buffers) with device='cuda'; here the same calls allocate on the CPU. Everything
    else is plain torch."""

    tensor = staticmethod(_on_cpu(torch.tensor))
    zeros = staticmethod(_on_cpu(torch.zeros))
    ones = staticmethod(_on_cpu(torch.ones))
    empty = staticmethod(_on_cpu(torch.empty))
    full = staticmethod(_on_cpu(torch.full))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _clip_by_total_norm(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """clip_grads.clip_grad_by_total_norm_fp32, which asserts torch.cuda.FloatTensor grads."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                grad.detach().mul_(coeff)


def _causal_mask(sq: int) -> torch.Tensor:
    """transformer.utils.get_default_causal_mask, which allocates on device="cuda"."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sync_gloo_sum(op: Any, group: Any, async_op: bool) -> bool:
    """Whether a collective is a synchronous sum over a gloo group (None: the world) this rank
    belongs to, the only calls the gloo patches take; any other goes to torch's (a
    non-member's call is a no-op there)."""
    return (not async_op and op == dist.ReduceOp.SUM
            and group is not dist.GroupMember.NON_GROUP_MEMBER
            and dist.get_backend(group) == "gloo")


def _gloo_reduce_scatter(torch_reduce_scatter: Callable) -> Callable:
    """torch.distributed.reduce_scatter_tensor, made a true reduce-scatter on gloo groups.
    ProcessGroupGloo runs a reduce-scatter as an all-reduce of the whole input and a copy of
    this rank's chunk: twice a reduce-scatter's bytes on the wire, which would burden the
    allgather dispatcher's combine and FoE's two-level sum on CPUs (and NCCL has a real one).
    Sending every rank its chunk (an all-to-all) and summing what arrives moves exactly a
    reduce-scatter's bytes. Other calls go to torch's (``_sync_gloo_sum``)."""

    def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor,
                              op: Any = dist.ReduceOp.SUM, group: Any = None,
                              async_op: bool = False) -> Any:
        if not _sync_gloo_sum(op, group, async_op):
            return torch_reduce_scatter(output, input, op=op, group=group, async_op=async_op)
        received = torch.empty_like(input)
        dist.all_to_all_single(received, input.contiguous(), group=group)
        torch.sum(received.view(-1, *output.shape), dim=0, out=output)
        return None

    return reduce_scatter_tensor


SMALL_ALL_REDUCE_BYTES = 64 * 1024


def _gloo_small_all_reduce(torch_all_reduce: Callable) -> Callable:
    """torch.distributed.all_reduce, latency-bound sums made one pass on gloo groups. gloo's
    ring all-reduce takes 2(n-1) steps one after another, each waiting for the next rank,
    whatever the size; below ``SMALL_ALL_REDUCE_BYTES`` (a decode step's federated sums, the
    prefill's last one) gathering every rank's tensor (n-1 steps) and adding them up locally is
    faster: on 4 ranks, 2 cores, 4-64 KiB, 2.9-3.9 ms against 5.0-6.2 ms, on one node and across
    two emulated ones (NCCL's all-reduce of small tensors is latency-bound already). Every rank
    adds the same terms in the same order, so all get the same sum. Larger tensors, calls
    inside a coalescing manager (megatron DDP's bucket all-reduce: the call is queued there, not
    run) and other calls (``_sync_gloo_sum``) go to torch's."""

    def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None,
                   async_op: bool = False) -> Any:
        if (tensor.numel() * tensor.element_size() > SMALL_ALL_REDUCE_BYTES
                or not _sync_gloo_sum(op, group, async_op)
                or (group or dist.group.WORLD) in dist.distributed_c10d._world.pg_coalesce_state):
            return torch_all_reduce(tensor, op=op, group=group, async_op=async_op)
        gathered = tensor.new_empty(dist.get_world_size(group) * tensor.numel())
        dist.all_gather_into_tensor(gathered, tensor.contiguous().view(-1), group=group)
        tensor.copy_(gathered.view(-1, *tensor.shape).sum(0))
        return None

    return all_reduce


class CompatError(RuntimeError):
    """A patched name is gone (megatron-core or torch changed): the patch would do nothing."""


def _replace(owner: Any, name: str, value: Any) -> None:
    """Set ``owner.name``, which must already exist: after an upgrade that renamed or moved it,
    a plain assignment would add an attribute nothing reads and the CUDA call would stay."""
    if not hasattr(owner, name):
        raise CompatError(
            f"foe_train.compat: {getattr(owner, '__name__', owner)}.{name} no longer exists, so "
            f"its CPU patch would do nothing; update foe_train/compat.py for this megatron-core"
        )
    setattr(owner, name, value)


def _define_global(module: types.ModuleType, name: str, value: Any, reader: Any) -> None:
    """Define a module global that ``reader`` (a function of that module) reads but only an
    optional import defines; refused when the reader no longer reads it."""
    if not hasattr(module, name) and name not in reader.__code__.co_names:
        raise CompatError(
            f"foe_train.compat: {reader.__qualname__} no longer reads {name}; update "
            f"foe_train/compat.py for this megatron-core"
        )
    setattr(module, name, value)


def patched() -> bool:
    """Whether the CPU patches are in force in this process (never on a CUDA machine)."""
    return _applied


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_compat() -> bool:
    """Make megatron-core runnable on CPU/gloo. Idempotent; returns True when patches are in
    force, False on a CUDA machine, where nothing is changed."""
    global _applied
    if not cuda_absent():
        return False
    if _applied:
        return True
    from megatron.core import utils as mc_utils
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mc_optimizer
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    cuda, gating = torch.cuda, moe_utils.RouterGatingLinearFunction.forward
    # megatron.core.* (layers, DDP, dist_checkpointing, dispatcher) -> torch.cuda.current_device
    _replace(cuda, "current_device", lambda: "cpu")
    # dist_checkpointing save/load and DDP -> torch.cuda.synchronize
    _replace(cuda, "synchronize", lambda *a, **k: None)
    # token_dispatcher / DDP overlap -> torch.cuda.Stream, Event, current_stream, stream()
    _replace(cuda, "Stream", _NullStream)
    _replace(cuda, "Event", _NullStream)
    _replace(cuda, "current_stream", lambda *a, **k: _NullStream())
    _replace(cuda, "default_stream", lambda *a, **k: _NullStream())
    _replace(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    # tensor_parallel.random (CudaRNGStatesTracker.add/fork, model_parallel_cuda_manual_seed)
    _replace(cuda, "get_rng_state", _get_rng_state)
    _replace(cuda, "manual_seed", _manual_seed)
    _replace(mc_random, "_get_cuda_rng_state", _get_rng_state)
    _replace(mc_random, "_set_cuda_rng_state", _set_rng_state)
    # moe_utils.RouterGatingLinearFunction reads te_general_gemm, undefined without TE
    _define_global(moe_utils, "te_general_gemm", None, gating)
    # token_dispatcher.MoEAlltoAllTokenDispatcher -> maybe_move_tensor_to_cpu(as_numpy=True)
    _replace(moe_utils, "maybe_move_tensor_to_cpu", _move_to_cpu)
    _replace(token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_cpu)
    # fused_softmax.FusedScaleMaskSoftmax.forward_torch_softmax -> get_default_causal_mask
    _replace(fused_softmax, "get_default_causal_mask", _causal_mask)
    # optimizer.FP32Optimizer / MixedPrecisionOptimizer / DistributedOptimizer,
    # clip_grads.get_grad_norm_fp32 and utils.local_multi_tensor_l2_norm (the fallback of
    # apex's multi_tensor_l2norm) -> torch.tensor/zeros(..., device="cuda")
    for module in (mc_optimizer, clip_grads, distrib_optimizer, mc_utils):
        _replace(module, "torch", _TorchOnCpu("torch"))
    # optimizer.ChainedOptimizer.step, MegatronOptimizer.clip_grad_norm ->
    # clip_grad_by_total_norm_fp32
    _replace(clip_grads, "clip_grad_by_total_norm_fp32", _clip_by_total_norm)
    _replace(mc_optimizer, "clip_grad_by_total_norm_fp32", _clip_by_total_norm)
    # gloo: tensor_parallel.mappings' reduce-scatter (the allgather dispatcher's combine and its
    # gather's backward) and foe_train.model.federation's two-level sum ->
    # torch.distributed.reduce_scatter_tensor, which ProcessGroupGloo runs as an all-reduce
    reduce_scatter = _gloo_reduce_scatter(dist.reduce_scatter_tensor)
    _replace(dist, "reduce_scatter_tensor", reduce_scatter)
    _replace(mappings, "dist_reduce_scatter_func", reduce_scatter)
    # gloo: the federated sums of decode steps (foe_train.model.federation), megatron's small
    # reductions (tensor_parallel.mappings._reduce, the MoE aux-loss and token-count
    # all-reduces) -> torch.distributed.all_reduce
    _replace(dist, "all_reduce", _gloo_small_all_reduce(dist.all_reduce))
    _applied = True
    return True

