"""The CPU compatibility layer: each patch does what the megatron-core call it serves needs,
and on a CUDA machine nothing is touched."""

import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from foe_train import compat


@pytest.fixture(scope="module", autouse=True)
def applied():
    assert compat.apply_cpu_compat() is True
    assert compat.apply_cpu_compat() is True  # idempotent


def test_device_queries_and_streams():
    assert torch.device(torch.cuda.current_device()).type == "cpu"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.synchronize()
    assert torch.cuda.Event().query()


def test_megatron_rng_tracker_forks_deterministically():
    from megatron.core.tensor_parallel import random as mc_random

    mc_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mc_random.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        inside = torch.cuda.get_rng_state()
    assert torch.equal(before, torch.get_rng_state())  # the CPU generator is left alone
    mc_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with mc_random.get_cuda_rng_tracker().fork():
        assert torch.equal(inside, torch.cuda.get_rng_state())


def test_dispatcher_split_sizes_become_numpy():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [1, 2]
    assert moe_utils.te_general_gemm is None


def test_causal_mask_on_cpu():
    from megatron.core.fusions import fused_softmax

    mask = fused_softmax.get_default_causal_mask(3)
    assert mask.device.type == "cpu"
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_optimizer_modules_allocate_on_cpu():
    from megatron.core.optimizer import clip_grads

    t = clip_grads.torch.tensor([1.0], dtype=torch.float, device="cuda")
    z = clip_grads.torch.zeros(2, dtype=torch.int, device="cuda")
    assert t.device.type == "cpu" and z.device.type == "cpu"
    assert clip_grads.torch.float32 is torch.float32


def test_clip_by_total_norm_scales_cpu_grads():
    from megatron.core.optimizer import optimizer as mc_optimizer

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    mc_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)
    mc_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=1.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)


def test_nothing_is_patched_when_cuda_is_present():
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "original = torch.cuda.current_device\n"
        "from foe_train import compat\n"
        "assert compat.apply_cpu_compat() is False\n"
        "from megatron.core.transformer.moe import token_dispatcher\n"
        "from megatron.core.optimizer import clip_grads\n"
        "assert torch.cuda.current_device is original\n"
        "assert clip_grads.torch is torch\n"
        "assert token_dispatcher.maybe_move_tensor_to_cpu.__module__.startswith('megatron')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_patching_a_name_megatron_no_longer_has_is_refused():
    code = (
        "from megatron.core.fusions import fused_softmax\n"
        "del fused_softmax.get_default_causal_mask\n"
        "from foe_train import compat\n"
        "try:\n"
        "    compat.apply_cpu_compat()\n"
        "except compat.CompatError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('patched a missing name without complaint')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fused_softmax.get_default_causal_mask no longer exists" in out.stdout


def test_optional_global_must_still_be_read():
    module = types.ModuleType("fake_moe_utils")

    def reads():
        return te_general_gemm  # noqa: F821 (defined by the patch, as in moe_utils)

    compat._define_global(module, "te_general_gemm", None, reads)
    assert module.te_general_gemm is None
    with pytest.raises(compat.CompatError, match="no longer reads other_gemm"):
        compat._define_global(module, "other_gemm", None, reads)
