"""foe-train: Federation-of-Experts language models on megatron-core."""

import atexit
import gc
import warnings

# megatron-core warns at import about optional accelerators (apex, TE, absl) that CPU runs do
# without; keep users' terminals and one-line errors readable.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
# megatron-core 0.16 calls torch.distributed.all_gather_into_tensor, which torch 2.13 flags as
# deprecated once per process and rank
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated")

# Interpreter teardown garbage-collects torch's and megatron-core's ~400k objects again and
# again as it clears the modules: about 1.5 s of CPU in every process that ends (each rank of
# every launch). foe-train's processes import this package before torch and megatron, so this
# handler runs after theirs, and leaves those objects to the OS; what foe-train writes is
# closed or flushed explicitly before.
atexit.register(gc.freeze)
