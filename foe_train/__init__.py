"""foe-train: Federation-of-Experts language models on megatron-core."""

import warnings

# megatron-core warns at import about optional accelerators (apex, TE, absl) that CPU runs do
# without; keep users' terminals and one-line errors readable.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
# megatron-core 0.16 calls torch.distributed.all_gather_into_tensor, which torch 2.13 flags as
# deprecated once per process and rank
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated")
