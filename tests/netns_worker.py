"""Worker for the emulated-node tests: reports node identity and link-bound gloo traffic."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from foe_train.runtime import init_distributed


def main() -> None:
    out, hold = sys.argv[1], float(sys.argv[2])
    init_distributed()
    x = torch.ones(1 << 18)  # 1 MiB
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    seconds = time.perf_counter() - start
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, int(os.environ["GROUP_RANK"]))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"nodes": nodes, "seconds": seconds, "value": float(x[0])}, f)
    time.sleep(hold)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
