"""Worker of ``foe-bench train``: training tokens/s of both members of a FoE/MoE recipe pair,
built as two jobs in the same processes and stepped alternately after warm-up, so machine
noise (other load, frequency changes, cache state) hits both members alike; then a per-op
profile of one more step of each, so a gap in tokens/s comes with where the time went.

A step is exactly the training loop's ``train_step`` (forward, backward, gradient sync,
optimizer); nothing is written: no run directory, checkpoint, metrics file or W&B run. Step
time is that of the slowest rank, as in ``foe-bench latency``. A step's CPU time (each
process's, all its threads, summed over ranks) comes beside it: where ranks outnumber cores,
the step time follows that total work, and it tells work from waiting.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
from torch.profiler import ProfilerActivity, profile, schedule

from foe_train.bench.comm import CommRecorder, gather_summaries
from foe_train.bench.comm_run import emit, mean_over_ranks
from foe_train.bench.latency import timed
from foe_train.bench.stats import DRIFT_WARNING, drift, paired_ratios, summary
from foe_train.config import load_config
from foe_train.runtime import all_reduce_values, init_distributed
from foe_train.train.job import Job, build_job
from foe_train.train.step import train_step

KINDS = ("foe", "moe")
TOP_OPS = 15
STEP_EVENT = "ProfilerStep"  # the profiler's record of the whole step


def profile_step(job: Job, step: int) -> dict[str, Any]:
    """One training step under torch.profiler (CPU ops; on a GPU their kernels' device time
    too) and the collective recorder: this rank's top ops by self CPU time, the step's time
    outside any recorded op (Python work, waits the profiler does not see), and per collective
    kind the seconds, bytes and calls (mean over ranks; the recorder times each call on the
    calling thread, waits included)."""
    topo = job.topo
    # the profiler's start-up takes a different time on each rank: start it in a warm-up
    # phase, line the ranks up, and only then record the step
    gpu = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    with profile(activities=[ProfilerActivity.CPU, *gpu],
                 schedule=schedule(wait=0, warmup=1, active=1), acc_events=True) as prof:
        dist.barrier()
        prof.step()
        with CommRecorder(group_kinds=topo.group_kinds(), node_of_rank=topo.node_of_rank) as rec:
            train_step(job, step)
        prof.step()
    clear_aux_losses_tracker()
    collectives = mean_over_ranks(gather_summaries(rec, by="op_kind"))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [e for e in events if not e.key.startswith(STEP_EVENT)]
    return {"profile": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                         "self_device_ms": e.self_device_time_total / 1e3,
                         "cpu_ms": e.cpu_time_total / 1e3, "calls": e.count}
                        for e in ops[:TOP_OPS]],
            "profiled_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "outside_ops_ms": sum(e.self_cpu_time_total for e in events
                                  if e.key.startswith(STEP_EVENT)) / 1e3,
            "collectives": collectives,
            "collective_s": sum(v["seconds"] for v in collectives.values())}


def measure(jobs: dict[str, Job], steps: int, warmup: int) -> dict[str, Any]:
    """Warm-up, then ``steps`` timed steps per member, alternating which member goes first
    each round; then one profiled step each. Returns the report row."""
    seconds: dict[str, list[float]] = {kind: [] for kind in jobs}
    cpu: dict[str, list[float]] = {kind: [] for kind in jobs}
    for step in range(warmup + steps):
        order = list(jobs) if step % 2 == 0 else list(reversed(jobs))
        for kind in order:
            cpu_start = time.process_time()
            _, elapsed = timed(lambda j=jobs[kind], s=step: train_step(j, s))
            # megatron's aux-loss tracker is global to the process: reset it after every step,
            # as the training loop does, so one member's entries never mix with the other's
            clear_aux_losses_tracker()
            if step >= warmup:
                seconds[kind].append(elapsed)
                cpu[kind].append(time.process_time() - cpu_start)
    summed = all_reduce_values([c for kind in jobs for c in cpu[kind]]).view(len(jobs), steps)
    cpu = dict(zip(jobs, summed.tolist(), strict=True))  # over ranks
    row: dict[str, Any] = {}
    rates: dict[str, list[float]] = {}
    for kind, job in jobs.items():
        cfg = job.cfg
        tokens = cfg.training.global_batch_size * cfg.model.seq_length
        rates[kind] = [tokens / s for s in seconds[kind]]
        row[kind] = {"tokens_per_s": summary(rates[kind]),
                     "step_s": summary(seconds[kind]),
                     "cpu_s": summary(cpu[kind]),
                     "drift": drift(rates[kind]),
                     "tokens_per_step": tokens,
                     **profile_step(job, warmup + steps)}
    row["ratio"] = {"tokens_per_s": row["foe"]["tokens_per_s"]["median"]
                    / row["moe"]["tokens_per_s"]["median"],
                    "cpu_s": row["foe"]["cpu_s"]["median"] / row["moe"]["cpu_s"]["median"],
                    "per_round": paired_ratios(rates["foe"], rates["moe"])}
    return row


def format_report(report: dict[str, Any]) -> str:
    """The side-by-side table, the FoE/MoE ratio and each member's top ops."""
    lines = [f"foe-bench train: {report['world_size']} ranks on {report['nodes']} node(s), "
             f"{report['steps']} steps each after {report['warmup']} warm-up, interleaved"]
    for row in report["rows"]:
        foe, moe = row["foe"], row["moe"]
        lines.append(f"{'':<18}{'foe':>12}{'moe':>12}")
        for metric, scale, fmt, unit in (("tokens_per_s", 1, ",.0f", "tok/s"),
                                         ("step_s", 1e3, ".1f", "step ms"),
                                         ("cpu_s", 1e3, ".1f", "cpu ms")):
            for q in ("median", "p10", "p90", "mean"):
                lines.append(f"{unit + ' ' + q:<18}{foe[metric][q] * scale:>12{fmt}}"
                             f"{moe[metric][q] * scale:>12{fmt}}")
        lines.append(f"{'collectives ms':<18}{foe['collective_s'] * 1e3:>12.1f}"
                     f"{moe['collective_s'] * 1e3:>12.1f}   (profiled step, mean over ranks)")
        lines.append(f"{'':<18}(cpu: process CPU time of a step, all threads, summed over ranks;"
                     f" FoE/MoE {row['ratio']['cpu_s']:.3f})")
        rounds = row["ratio"]["per_round"]
        lines.append(f"ratio foe/moe tokens/s (median): {row['ratio']['tokens_per_s']:.3f}; "
                     f"per round: median {rounds['median']:.3f} (95% CI {rounds['ci95_low']:.3f}-"
                     f"{rounds['ci95_high']:.3f}), p10 {rounds['p10']:.3f}, "
                     f"p90 {rounds['p90']:.3f}, FoE faster in {rounds['wins']:.0%}")
        drifts = {kind: row[kind]["drift"] for kind in KINDS}
        lines.append("machine drift (tokens/s, second half of the run against the first): "
                     + ", ".join(f"{kind} {d:+.0%}" for kind, d in drifts.items()))
        if max(abs(d) for d in drifts.values()) > DRIFT_WARNING:
            lines.append("warning: the machine's speed changed by more than "
                         f"{DRIFT_WARNING:.0%} during the run, so the ratio mixes loads; "
                         "rerun on a quieter machine before reading it")
        for kind in KINDS:
            comm = ", ".join(f"{k} {v['seconds'] * 1e3:.1f}ms/{v['calls']}"
                             for k, v in row[kind]["collectives"].items())
            lines.append(f"\n{kind}: top ops by self CPU time, one profiled step on rank 0 "
                         f"({row[kind]['profiled_cpu_ms']:.0f} ms, of which "
                         f"{row[kind]['outside_ops_ms']:.0f} ms outside any op)")
            lines.append(f"  collectives: {comm or 'none'}")
            lines += [f"  {op['self_cpu_ms']:>9.1f} ms {op['calls']:>6}x  {op['op']}"
                      for op in row[kind]["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point under torchrun; the CLI (``foe-bench train``) has checked the input."""
    ap = argparse.ArgumentParser(prog="foe-bench train (worker)")
    ap.add_argument("--pair", nargs=2, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    init_distributed()
    cfgs = [load_config(path, args.overrides) for path in args.pair]
    jobs = {cfg.model.kind: build_job(cfg) for cfg in sorted(cfgs, key=lambda c: c.model.kind)}
    row = measure(jobs, args.steps, args.warmup)
    if dist.get_rank() == 0:
        topo = jobs["foe"].topo
        report = {"rows": [row], "pair": args.pair, "nodes": len(set(topo.node_of_rank)),
                  "world_size": dist.get_world_size(), "steps": args.steps,
                  "warmup": args.warmup}
        emit(report, format_report(report), args.json, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
