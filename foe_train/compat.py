"""megatron-core on CPU with gloo.

megatron-core calls CUDA APIs unconditionally in a few places. Without CUDA we replace exactly
those calls with CPU equivalents; with CUDA nothing is touched. Each patch names the
megatron-core call it serves. The "CUDA" RNG that megatron's tracker forks is emulated by one
CPU generator, so forks and seeds behave deterministically.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

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


def _causal_mask(sq: int) -> torch.Tensor:
    """transformer.utils.get_default_causal_mask, which allocates on device="cuda"."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


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
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # megatron.core.* (layers, DDP, dist_checkpointing, dispatcher) -> torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing save/load and DDP -> torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    # token_dispatcher / DDP overlap -> torch.cuda.Stream, Event, current_stream, stream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # tensor_parallel.random (CudaRNGStatesTracker.add/fork, model_parallel_cuda_manual_seed)
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.manual_seed = _manual_seed
    mc_random._get_cuda_rng_state = _get_rng_state
    mc_random._set_cuda_rng_state = _set_rng_state
    # moe_utils.router_gating_linear references te_general_gemm, undefined without TE
    moe_utils.te_general_gemm = None
    # token_dispatcher.MoEAlltoAllTokenDispatcher -> maybe_move_tensor_to_cpu(as_numpy=True)
    moe_utils.maybe_move_tensor_to_cpu = _move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu
    # fused_softmax.FusedScaleMaskSoftmax.forward_torch_softmax -> get_default_causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask
    _applied = True
    return True

