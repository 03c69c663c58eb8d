"""Under torchrun, 2 ranks: join as the training loop does with
training.collective_timeout_s=1, create a group the way the topology and megatron do (no
timeout argument), and let rank 1 stay away from a collective on it. Rank 0 writes how long
its all-reduce waited and how it ended, and what a subnormal float becomes in a thread
started after joining (the CPU's flush-to-zero setting, which threads inherit)."""

import argparse
import json
import os
import threading
import time

import torch
import torch.distributed as dist

from foe_train.config import load_config
from foe_train.runtime import init_distributed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    init_distributed(load_config(None, ["training.collective_timeout_s=1"])
                     .training.collective_timeout_s)
    group = dist.new_group([0, 1])
    products: list[float] = []
    worker = threading.Thread(target=lambda: products.append(
        (torch.full((4,), 2.0 ** -140) * 0.5).sum().item()))
    worker.start()
    worker.join()
    if dist.get_rank() == 1:
        time.sleep(8)  # a stopped peer; then leave without joining the collective
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        outcome = "completed"
    except RuntimeError as exc:
        outcome = str(exc).splitlines()[0]
    with open(args.out, "w") as f:
        json.dump({"waited_s": time.monotonic() - start, "outcome": outcome,
                   "subnormal_product": products[0]}, f)
    os._exit(0)  # the group is broken: skip destroy_process_group


if __name__ == "__main__":
    main()
