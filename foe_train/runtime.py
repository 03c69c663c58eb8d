"""Where this process runs: the one way to join the job's process group, and the one device.

Every entry point (training, generation, evaluation, benchmarks, the tests' workers) calls
``init_distributed``; everything else asks ``device()``. On CUDA the backend is NCCL with one
GPU per local rank (``LOCAL_RANK``); on CPU it is gloo. NCCL only takes CUDA tensors, so any
value that crosses ranks is put on ``device()`` first (``all_reduce_values``): the same code
then runs on both backends.

Joining also makes the CPU flush subnormal floats to zero (``torch.set_flush_denormal``): as
training sharpens the attention, its probabilities underflow into subnormals (2% of them in
the bench pair's FoE after 30 steps), which x86 CPUs compute on a slow path; left alone, a CPU
training step grew 45-80% slower within 40 steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


def backend() -> str:
    """NCCL on CUDA, gloo on CPU. ``FOE_BACKEND=gloo`` on CUDA lets several ranks share one
    GPU (NCCL refuses that): for correctness checks on a single card, not for speed."""
    return os.environ.get("FOE_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")


def device() -> torch.device:
    """The device of this rank's tensors: its GPU under CUDA (one per local rank; shared
    round-robin under ``FOE_BACKEND=gloo``), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local % torch.cuda.device_count() if backend() == "gloo"
                        else local)


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the job (torchrun's environment) with a timeout on every collective, and return
    this rank's device. torch's new_group takes the module default rather than the world
    group's timeout, so the default is set too: the topology's and megatron's groups then
    time out alike."""
    torch.set_flush_denormal(True)  # before gloo and torch start threads, which inherit it
    timeout = timedelta(seconds=timeout_s)
    dist.distributed_c10d.default_pg_timeout = timeout
    dist.distributed_c10d.default_pg_nccl_timeout = timeout
    here = device()
    if here.type == "cuda":
        if here.index >= torch.cuda.device_count():
            raise SystemExit(f"error: LOCAL_RANK {here.index} but {torch.cuda.device_count()} "
                             f"GPU(s) visible; start at most one process per GPU on each node")
        torch.cuda.set_device(here)
    dist.init_process_group(backend(), timeout=timeout)
    return here


def synchronize() -> None:
    """Wait for this rank's queued GPU work (for wall-clock timing); nothing to do on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def all_reduce_values(
    values: Sequence[float] | torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Host numbers or device scalars combined over ``group`` in one call, on the backend's
    device and in float64; the caller reads the result (one host sync) when it needs it."""
    if isinstance(values, torch.Tensor):
        out = values.detach().to(device=device(), dtype=torch.float64).reshape(-1).clone()
    else:
        out = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(out, op=op, group=group)
    return out
