"""The run's lifecycle: build the job, resume, step to training.train_iters with validation,
checkpoints, tracking and signals, then the summary.

Every token shard reads its own slice of each global batch; the loss each rank reports is
averaged over all ranks, which weights every shard equally because each FoE shard is seen by
all C clusters alike.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from foe_train.budget import budget
from foe_train.config import RecipeConfig
from foe_train.model.builder import count_parameters
from foe_train.runtime import all_reduce_values
from foe_train.train import checkpoint
from foe_train.train.evaluation import evaluate
from foe_train.train.job import Job, build_job
from foe_train.train.step import Meters, StepResult, train_step
from foe_train.train.tracking import Tracker

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# wraps the first step of a run (e.g. to record its communication); gets the job and the step
StepWrapper = Callable[[Job, Callable[[], StepResult]], StepResult]


class StopSignal:
    """SIGTERM/SIGUSR1 ask for a checkpoint at the end of the current step, then exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank got the signal (ranks stop at the same step)."""
        flag = all_reduce_values([float(self.received is not None)], op=dist.ReduceOp.MAX)
        return bool(flag[0])


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def run(
    cfg: RecipeConfig, resume: Path | None = None, first_step: StepWrapper | None = None
) -> dict[str, Any]:
    """Train to cfg.training.train_iters (resuming from ``resume`` if given); returns the
    summary on rank 0."""
    job = build_job(cfg)
    t, topo = cfg.training, job.topo
    rank0 = topo.rank == 0
    if rank0:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    start, wall_before = checkpoint.resume(job, resume) if resume else (0, 0.0)
    numbers = budget(cfg)
    params = count_parameters(job.model, cfg.model, topo)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    tracker = Tracker(job.run_dir, cfg.logging, cfg.model_dump(), enabled=rank0,
                      total_steps=t.train_iters, start_step=start)
    stop, meters, peak = StopSignal(), Meters(job), _peak_flops()
    begin, last_val, metrics = time.perf_counter(), None, {}
    step = start
    while step < t.train_iters:
        if step == start and first_step is not None:
            result = first_step(job, lambda s=step: train_step(job, s))
        else:
            result = train_step(job, step)
        meters.add(result)
        step += 1
        stopping = stop.agreed()
        last = step == t.train_iters
        if step % cfg.logging.log_interval == 0 or last or stopping:
            metrics = meters.read()
            metrics.update(
                tokens=step * tokens_per_step,
                lr=job.scheduler.get_lr(job.engine.optimizer.param_groups[0]),
                tflops_per_rank=numbers["flops_per_token"] * metrics["tokens_per_s"]
                / topo.world_size / 1e12,
            )
            if peak:
                metrics["mfu"] = metrics["tflops_per_rank"] * 1e12 / peak
            tracker.log(step, metrics)
        with meters.paused():
            if job.valid is not None and t.eval_interval and (step % t.eval_interval == 0
                                                              or last):
                last_val = evaluate(job)
                tracker.log_eval(step, {"val_loss": last_val})
            interval = cfg.checkpoint.interval
            if last or stopping or (interval and step % interval == 0):
                saved = checkpoint.save(job, step, wall_before + time.perf_counter() - begin)
        if stopping:
            if rank0:
                name = signal.Signals(stop.received).name if stop.received \
                    else "a signal on another rank"
                print(f"foe-train: stopped by {name} after checkpoint {saved.name} (step {step});"
                      f" continue with --resume auto", flush=True)
            break
    if job.valid is not None and last_val is None and stop.received is None:
        last_val = evaluate(job)
        tracker.log_eval(step, {"val_loss": last_val})
    summary = {
        "final_train_loss": metrics["loss"] if step > start else None,
        "final_val_loss": last_val, "steps": step, "tokens": step * tokens_per_step,
        "wall_time_s": wall_before + time.perf_counter() - begin, "params": params,
        "active_params_per_token": numbers["active_params_per_token"],
        "stopped_by_signal": stop.received is not None, "kind": cfg.model.kind,
    }
    tracker.finish(summary)
    if rank0:
        _print_outputs(job.run_dir, summary)
    return summary if rank0 else {}


def _print_outputs(run_dir: Path, summary: dict[str, Any]) -> None:
    """The closing lines: how the run ended and where each of its outputs is."""
    done = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    print(f"foe-train: {'stopped' if summary['stopped_by_signal'] else 'finished'} at step "
          f"{summary['steps']} in {summary['wall_time_s']:.1f} s; run directory {run_dir}",
          flush=True)
    print(f"foe-train: summary {run_dir / 'summary.json'}, metrics {run_dir / 'metrics.jsonl'}, "
          f"checkpoint {done[-1] if done else 'none'}", flush=True)
    wandb = sorted((run_dir / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
    if wandb:
        upload = f" (upload: wandb sync {wandb[-1]})" if "offline" in wandb[-1].name else ""
        print(f"foe-train: W&B run files {wandb[-1]}{upload}", flush=True)
