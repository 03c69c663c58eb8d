"""Collective micro-benchmarks on the emulated fabric, and the alpha-beta fit the projection
(bench.projection) uses instead of a cluster description's nominal link numbers.

``calibrate`` runs this module as a torchrun worker on emulated nodes (launch.netns: network
namespaces joined by an HTB-capped link; a node's ranks talk over its loopback). The worker
times all_reduce and all_to_all_single at several message sizes in the two patterns the
recipes produce, every group of a pattern running at once (as all ranks do in a real step, so
the ranks of a node share its link as they would):
- intra-node: one group per node holding that node's ranks (FoE's cluster-EP all-to-all);
- inter-node: all_reduce over groups of one rank per node (FoE's federated sum when each
  cluster sits on its own node), all_to_all_single over every rank (the baseline's EP).
Each point is the median over repeats of the slowest rank's time per operation (the repeats
interleave all points, so a burst of load from other jobs on the machine spoils one sample of
many points, not every sample of one), with the bytes each rank sends and the part of them
that crosses nodes counted as bench.comm_model counts them (ring all-reduce 2(n-1)/n of the
tensor; all-to-all (n-1)/n of it, the share sent to ranks on other nodes crossing). It also
times a matmul and a tensor copy on every rank at once: the compute and memory rates of one
emulated "GPU" for the roofline.

The fit is the projection's own formula, t = alpha(scope) + intra_bytes/beta_intra +
cross_bytes/beta_inter: intra-node points give alpha/beta of the loopback, inter-node points
(with the intra part subtracted) those of the link; per collective, and pooled over them. Least
squares on the relative error, since the target is reproducing every fitted point within a
relative tolerance (25%), the smallest message included; MIN_FIT_BYTES says which sizes are
fitted and why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from foe_train.bench.comm_model import Link, comm_seconds
from foe_train.runtime import all_reduce_values, init_distributed, synchronize
from foe_train.topology import consecutive_nodes, ranks_by_node

# Bytes of the tensor handed to one collective (fp32), per scope: loopback collectives are
# cheap, so the intra-node sizes go higher to reach times well above the scheduling noise.
SIZES = {"intra_node": (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 23, 1 << 24, 1 << 25),
         "inter_node": (1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23)}
# The fit (and max_error) covers, per collective and scope, the smallest size (the latency
# floor that pins alpha) and the sizes from MIN_FIT_BYTES[scope] on. Measured on the shared
# 2-core machine, the sizes between leave any alpha-beta line by more than 25% in some runs:
# loopback collectives of a few ms scatter by +-0.5 ms (4 ranks on 2 cores, other jobs), the
# time bends from the latency floor into the bandwidth slope over ~0.25-2 MiB instead of adding
# up, and an all-to-all over the capped link at 256-512 KiB takes up to twice its neighbours'
# time (TCP over the HTB queue, at a size that moves between runs). max_error_all_sizes
# reports the error over every point.
MIN_FIT_BYTES = {"intra_node": 1 << 22, "inter_node": 1 << 20}
SCOPES = ("intra_node", "inter_node")
# Seconds one timed repeat should last: long enough that the scheduler's millisecond-scale
# hiccups on a shared 2-core machine average out over many calls.
TARGET_SECONDS = 0.03


def traffic(op: str, group: list[int], rank: int, node_of: Callable[[int], int],
            nbytes: int) -> tuple[float, float]:
    """(bytes this rank sends, of which to other nodes) for one collective on an nbytes tensor,
    counted as bench.comm_model counts them: a ring all-reduce sends 2(n-1)/n*nbytes to its
    successor; an all-to-all sends nbytes/n to each other member."""
    n = len(group)
    if op == "all_reduce":
        sent = 2 * (n - 1) / n * nbytes
        successor = group[(group.index(rank) + 1) % n]
        return sent, sent if node_of(successor) != node_of(rank) else 0.0
    remote = sum(node_of(r) != node_of(rank) for r in group)
    return (n - 1) / n * nbytes, remote / n * nbytes


def _slowest(fn: Callable[[], object], iters: int) -> float:
    """The slowest rank's seconds per call over `iters` back-to-back calls after a barrier."""
    dist.barrier()
    synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize()
    elapsed = all_reduce_values([(time.perf_counter() - start) / iters], op=dist.ReduceOp.MAX)
    return float(elapsed[0])


def _interleaved_medians(calls: list[Callable[[], object]], reps: int) -> list[float]:
    """Median over reps of each call's slowest-rank seconds. Each rep visits every call once,
    so a burst of load from elsewhere on the machine spoils one sample of many points rather
    than every sample of one; each timed region spans about TARGET_SECONDS (the call count is
    derived from the slowest rank's probe, so all ranks agree on it)."""
    iters = []
    for call in calls:
        call()  # warm-up: connections, buffers
        iters.append(max(1, min(64, round(TARGET_SECONDS / _slowest(call, 1)))))
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for call, n, out in zip(calls, iters, samples, strict=True):
            out.append(_slowest(call, n))
    return [statistics.median(s) for s in samples]


def _worker(out: str, sizes: dict[str, list[int]], reps: int) -> None:
    here = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = world // per_node
    node_of_rank = consecutive_nodes(world, nodes)

    def own(groups: list[list[int]]) -> tuple[list[int], object]:
        """Create every group (all ranks must), return this rank's members and handle."""
        handles = [dist.new_group(g) for g in groups]
        i = next(i for i, g in enumerate(groups) if rank in g)
        return groups[i], handles[i]

    node_groups = ranks_by_node(node_of_rank)
    patterns = [
        ("all_reduce", "intra_node", node_groups),
        ("all_to_all", "intra_node", node_groups),
        ("all_reduce", "inter_node", [list(column) for column in zip(*node_groups, strict=True)]),
        ("all_to_all", "inter_node", [list(range(world))]),
    ]
    points, calls = [], []
    for op, scope, groups in patterns:
        members, group = own(groups)
        for nbytes in sizes[scope]:
            x = torch.ones(nbytes // 4, device=here)
            y = torch.empty(nbytes // 4, device=here)
            if op == "all_reduce":
                calls.append(lambda x=x, g=group: dist.all_reduce(x, group=g))
            else:
                calls.append(lambda x=x, y=y, g=group: dist.all_to_all_single(y, x, group=g))
            sent, cross = traffic(op, members, rank, node_of_rank.__getitem__, nbytes)
            # patterns are symmetric, so rank 0's counts are every rank's mean
            points.append({"op": op, "scope": scope, "ranks": len(members), "size": nbytes,
                           "bytes": sent, "cross_node_bytes": cross})
    n = 512
    a, b = (torch.randn(n, n, device=here) for _ in range(2))
    big = torch.ones(1 << 23, device=here)  # 32 MiB
    copy = torch.empty(1 << 23, device=here)
    *seconds, matmul, memcpy = _interleaved_medians(
        [*calls, lambda: torch.mm(a, b), lambda: copy.copy_(big)], reps)
    if rank == 0:
        compute = {"peak_flops": 2 * n**3 / matmul, "memory_bandwidth": 2 * big.nbytes / memcpy}
        points = [{**p, "seconds": t} for p, t in zip(points, seconds, strict=True)]
        Path(out).write_text(json.dumps({"points": points, "compute": compute,
                                         "ranks_per_node": per_node, "nodes": nodes}))
    dist.destroy_process_group()


def _lsq(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(alpha, 1/beta) minimising sum(((alpha + x/beta - y) / t)^2) over rows (x, y, t), with
    alpha >= 0: a negative intercept is noise, so then alpha = 0 and only the slope is fitted."""
    x, y, t = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    design = np.stack([1 / t, x / t], axis=1)
    (alpha, inverse), *_ = np.linalg.lstsq(design, y / t, rcond=None)
    if alpha < 0:
        alpha, inverse = 0.0, float(np.dot(x / t, y / t) / np.dot(x / t, x / t))
    return float(alpha), float(inverse)


def _fit_scopes(points: list[dict]) -> dict[str, dict[str, float]]:
    """alpha/beta of both scopes from one set of points: intra-node first, then inter-node on
    what the intra-node part of each point leaves."""
    intra = [p for p in points if p["scope"] == "intra_node"]
    inter = [p for p in points if p["scope"] == "inter_node"]
    alpha_i, inv_i = _lsq([(p["bytes"], p["seconds"], p["seconds"]) for p in intra])
    alpha_x, inv_x = _lsq([(p["cross_node_bytes"],
                            p["seconds"] - (p["bytes"] - p["cross_node_bytes"]) * inv_i,
                            p["seconds"]) for p in inter])
    return {"intra_node": {"alpha": alpha_i, "beta": 1 / inv_i},
            "inter_node": {"alpha": alpha_x, "beta": 1 / inv_x}}


def fitted_points(points: list[dict], min_bytes: dict[str, int]) -> list[dict]:
    """The points a fit covers: per collective and scope its smallest size and every size of at
    least min_bytes[scope] (no entry: every size)."""
    smallest: dict[tuple[str, str], int] = {}
    for p in points:
        key = (p["op"], p["scope"])
        smallest[key] = min(smallest.get(key, p["size"]), p["size"])
    return [p for p in points if p["size"] >= min_bytes.get(p["scope"], 0)
            or p["size"] == smallest[(p["op"], p["scope"])]]


def fit(points: list[dict], min_bytes: dict[str, int] = MIN_FIT_BYTES) -> dict:
    """alpha (s) and beta (bytes/s) per scope from the fitted_points: pooled over the
    collectives (the projection's default for every op) and per collective under "ops" (gloo's
    all-reduce and all-to-all differ in latency by 2-10x on this fabric, so one pair per scope
    cannot reproduce both)."""
    used = fitted_points(points, min_bytes)
    ops = sorted({p["op"] for p in used})
    for op in ops:
        if {p["scope"] for p in used if p["op"] == op} != set(SCOPES):
            raise ValueError(f"fit: {op} needs both intra- and inter-node points")
    return {**_fit_scopes(used), "min_bytes": dict(min_bytes),
            "ops": {op: _fit_scopes([p for p in used if p["op"] == op]) for op in ops}}


def links(fitted: dict, op: str | None = None) -> tuple[Link, Link]:
    """(intra-node, inter-node) Link of one collective as fitted (op None, or one without its
    own fit: the pooled pair); latency = alpha, bandwidth = beta."""
    scopes = fitted.get("ops", {}).get(op, fitted)
    intra, inter = (Link(latency=scopes[s]["alpha"], bandwidth=scopes[s]["beta"])
                    for s in SCOPES)
    return intra, inter


def point_seconds(fitted: dict, point: dict, per_op: bool = True) -> float:
    """The fitted model's time for one measured point (the projection's formula, one call)."""
    intra, inter = links(fitted, point["op"] if per_op else None)
    return comm_seconds(1, point["bytes"], point["cross_node_bytes"], intra, inter)


def calibration_error(fitted: dict, points: list[dict], per_op: bool = True) -> float:
    """Largest |predicted - measured| / measured over the points the fit covers (per_op False:
    with the pooled alpha/beta per scope for every collective)."""
    used = fitted_points(points, fitted.get("min_bytes", {}))
    return max(abs(point_seconds(fitted, p, per_op) - p["seconds"]) / p["seconds"]
               for p in used)


def calibrate(nodes: int = 2, nproc: int = 4, rate: str = "1gbit",
              sizes: dict[str, tuple[int, ...]] = SIZES, reps: int = 9,
              min_bytes: dict[str, int] = MIN_FIT_BYTES,
              timeout: float = 300) -> dict:
    """Measure on emulated nodes (needs root and ip netns) and fit. Returns the fit (alpha/beta
    per scope, pooled and per collective), the measured points with the fitted time of each,
    the largest relative error of the per-collective fit over the fitted range (max_error) and
    over every size (max_error_all_sizes), that of the pooled fit over the fitted range
    (max_error_pooled), and the measured compute rates per rank."""
    from launch.netns import run_emulated

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "points.json"
        args = [str(out), "--reps", str(reps),
                "--intra-sizes", *map(str, sizes["intra_node"]),
                "--inter-sizes", *map(str, sizes["inter_node"])]
        code = run_emulated("foe_train.bench.collectives", args, nproc, nodes, rate,
                            timeout=timeout)
        if code or not out.is_file():
            raise RuntimeError(f"calibration run failed (exit {code}) on {nodes} emulated "
                               f"nodes x {nproc // nodes} ranks at {rate}")
        measured = json.loads(out.read_text())
    fitted = fit(measured["points"], min_bytes)
    points = [{**p, "fitted_seconds": point_seconds(fitted, p)} for p in measured["points"]]
    return {
        **fitted, "points": points,
        "max_error": calibration_error(fitted, points),
        "max_error_all_sizes": calibration_error({**fitted, "min_bytes": {}}, points),
        "max_error_pooled": calibration_error(fitted, points, per_op=False),
        "compute": measured["compute"], "nodes": nodes, "ranks_per_node": nproc // nodes,
        "link_rate": rate,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="foe_train.bench.collectives (torchrun worker)")
    ap.add_argument("out")
    ap.add_argument("--intra-sizes", nargs="+", type=int, default=list(SIZES["intra_node"]))
    ap.add_argument("--inter-sizes", nargs="+", type=int, default=list(SIZES["inter_node"]))
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)
    _worker(args.out, {"intra_node": args.intra_sizes, "inter_node": args.inter_sizes},
            args.reps)


if __name__ == "__main__":
    main(sys.argv[1:])
