"""Checkpoints with megatron-core dist_checkpointing.

Every weight is saved under its topology-free global name (cluster, layer, cluster-global
expert index; ``builder.global_name``), one replica writing it; FoE's split output layer
(``model.head``) is saved as vocabulary shards of the one full weight. So a checkpoint saved at
(D, C, L) loads at any (D', C, L'): each rank asks for the names it holds now. The optimizer
state follows the weights through megatron's optimizer.sharded_state_dict.

A save goes to ``iter_N.partial`` and is renamed to ``iter_N`` only when every rank has
finished, so a crash mid-save never hides the last complete checkpoint. A complete checkpoint
can still be damaged later (a disk filled up, a file truncated by a copy): resuming checks
every file the checkpoint's index names, and ``--resume auto`` falls back to the previous one.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from foe_train.checkpoint import PARTIAL, complete_checkpoints, damage, model_sharded_state_dict
from foe_train.config import ConfigError, RecipeConfig

if TYPE_CHECKING:
    from foe_train.train.job import Job


def checkpoint_root(job: Job) -> Path:
    return job.run_dir / "checkpoints"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout(job: Job) -> dict[str, Any]:
    t = job.topo
    return {"kind": t.kind, "data": t.data, "clusters": t.clusters,
            "ranks_per_cluster": t.ranks_per_cluster, "world_size": t.world_size,
            "engine": job.cfg.training.engine}


def _state(job: Job, loading: bool) -> dict[str, Any]:
    model = model_sharded_state_dict(job.model, job.cfg.model, job.topo)
    world, rank = job.topo.world_size, job.topo.rank
    return {
        "model": model,
        "optimizer": job.engine.optimizer_state(model, loading),
        "rng": ShardedObject(f"rng_world{world}", _rng_state(), (world,), (rank,),
                             replica_id=0),
    }


def _in_process_results_queue() -> None:
    """dist_checkpointing's writer reports results through a queue served by a spawned
    multiprocessing Manager, which async saves need; a killed rank orphans that process (and
    the pipes it inherited). Our saves are synchronous: a plain in-process queue does."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save(job: Job, step: int, wall_time_s: float = 0.0) -> Path:
    """Write iter_<step> atomically; keep the newest ``checkpoint.keep`` complete ones.
    ``wall_time_s`` (training time so far, all segments) lets a resumed run's summary report
    the whole run's time."""
    _in_process_results_queue()
    root = checkpoint_root(job)
    final, partial = root / f"iter_{step:07d}", root / f"iter_{step:07d}{PARTIAL}"
    if job.topo.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    # the common state must be the same on every rank: rank 0's clock speaks for the job
    agreed = [wall_time_s]
    dist.broadcast_object_list(agreed, src=0)
    state = _state(job, loading=False)
    state.update(step=step, scheduler=job.scheduler.state_dict(),
                 config=job.cfg.model_dump(), layout=_layout(job), wall_time_s=agreed[0])
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if job.topo.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in complete_checkpoints(root)[: -job.cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"foe-train: saved {final.name} (step {step}) to {final}", flush=True)
    dist.barrier()
    return final


def check_compatible(saved: dict[str, Any], cfg: RecipeConfig, path: Path) -> None:
    """Refuse (one line) a checkpoint this recipe cannot continue: another model kind, FoE
    cluster count or model shape; parallel.data and parallel.ranks_per_cluster may differ
    (not for DeepSpeed: its ZeRO partitions load only at the layout that saved them)."""
    layout = saved["layout"]
    engine = layout.get("engine", "megatron")
    if engine != cfg.training.engine:
        raise ConfigError(
            f"training.engine: checkpoint {path} was saved by the {engine} engine but this run "
            f"uses {cfg.training.engine}; resume with training.engine={engine}"
        )
    now = {"kind": cfg.model.kind,
           "clusters": cfg.parallel.clusters if cfg.model.kind == "foe" else layout["clusters"]}
    for key in ("kind", "clusters"):
        if layout[key] != now[key]:
            field = "model.kind" if key == "kind" else "parallel.clusters"
            raise ConfigError(
                f"{field}: checkpoint {path} was saved with {key}={layout[key]} but this run "
                f"has {now[key]}; only parallel.data and parallel.ranks_per_cluster may change"
            )
    model_now = cfg.model.model_dump()
    for key, value in saved["config"]["model"].items():
        if key not in ("balanced_routing",) and model_now.get(key) != value:
            raise ConfigError(
                f"model.{key}: checkpoint {path} has {value!r}, this run {model_now.get(key)!r}"
                f"; resume with the checkpoint's model section"
            )


def resume_target(run_dir: Path, which: str) -> tuple[Path | None, list[str]]:
    """The checkpoint ``--resume which`` continues from, and one warning per damaged newer
    checkpoint skipped on the way. ``which``: 'auto' (this run's newest intact checkpoint,
    None when it has none yet), a run directory (its newest intact one) or an iter_N
    directory (exactly that one). Raises ConfigError, one line, when there is nothing to load."""
    if which == "auto" or not (Path(which) / "metadata.json").is_file():
        root = run_dir if which == "auto" else Path(which)
        if which != "auto" and not (root / "checkpoints").is_dir():
            reason = "does not exist" if not root.exists() else "is neither an iter_N " \
                "checkpoint (with metadata.json) nor a run directory (with checkpoints/)"
            raise ConfigError(f"--resume: {root} {reason}; pass a checkpoint, a run directory "
                              f"or 'auto'")
        damaged: list[str] = []
        for path in reversed(complete_checkpoints(root / "checkpoints")):
            bad = damage(path)
            if bad is None:
                return path, [f"warning: --resume {which}: {why}; skipping that checkpoint, "
                              f"resuming from {path.name}" for why in damaged]
            damaged.append(bad)
        if damaged:
            raise ConfigError(f"--resume {which}: every checkpoint under {root / 'checkpoints'} "
                              f"is damaged (newest: {damaged[0]}); start over with --overwrite")
        if which == "auto":
            return None, []
        raise ConfigError(f"--resume: {root} holds no complete checkpoint yet; pass another run "
                          f"directory or checkpoint, or drop --resume to start fresh")
    path = Path(which)
    bad = damage(path)
    if bad is not None:
        raise ConfigError(f"--resume: checkpoint {path} is damaged: {bad}; pass an earlier "
                          f"iter_N directory, or its run directory to pick the newest intact one")
    return path, []


def resume(job: Job, path: Path) -> tuple[int, float]:
    """Load the checkpoint at ``path`` (chosen and checked before the run started:
    ``preflight.prepare_run_dir``) on every rank; returns the step to continue from and the
    training wall time already spent."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    if job.cfg.training.engine == "deepspeed" and common["layout"] != _layout(job):
        raise ConfigError(
            f"parallel: checkpoint {path} holds DeepSpeed ZeRO partitions of layout "
            f"{common['layout']}, this run has {_layout(job)}; resume at the saved layout"
        )
    state = _state(job, loading=True)
    if common["layout"]["world_size"] != job.topo.world_size:
        del state["rng"]
    loaded = dist_checkpointing.load(state, str(path))
    params = {key: sh.data for key, sh in
              model_sharded_state_dict(job.model, job.cfg.model, job.topo).items()}
    with torch.no_grad():
        for key, value in loaded["model"].items():
            params[key].copy_(value)
    job.engine.load_optimizer_state(loaded["optimizer"])
    job.scheduler.load_state_dict(common["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    step = int(common["step"])
    if job.topo.rank == 0:
        print(f"foe-train: resumed from {path.name} (step {step}) in {path.parent}", flush=True)
    return step, float(common.get("wall_time_s", 0.0))
