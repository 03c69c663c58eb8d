"""Checkpoints with megatron-core dist_checkpointing.

Every weight is saved under its topology-free global name (cluster, layer, cluster-global
expert index; ``builder.global_name``), one replica writing it. So a checkpoint saved at
(D, C, L) loads at any (D', C, L'): each rank asks for the names it holds now. The optimizer
state follows the weights through megatron's optimizer.sharded_state_dict.

A save goes to ``iter_N.partial`` and is renamed to ``iter_N`` only when every rank has
finished, so a crash mid-save never hides the last complete checkpoint.
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
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from foe_train.config import ConfigError, ModelConfig
from foe_train.model.builder import named_global_parameters

if TYPE_CHECKING:
    from foe_train.topology import Topology
    from foe_train.train.loop import Job

PARTIAL = ".partial"


def checkpoint_root(job: Job) -> Path:
    return job.run_dir / "checkpoints"


def _replica_id(name: str, topo: Topology) -> int:
    """0 on the one rank that writes this weight, >0 on the ranks holding copies."""
    if ".local_experts." in name:
        return dist.get_rank(topo.groups["expert_dp"])
    if "decoder.layers." in name and topo.kind == "foe":
        return dist.get_rank(topo.groups["token_dp"])
    return topo.rank


def model_sharded_state_dict(
    model: torch.nn.Module, model_cfg: ModelConfig, topo: Topology
) -> dict[str, ShardedTensor]:
    """Every weight of this rank under its global name, the param itself as data."""
    out = {}
    for name, param in named_global_parameters(model, model_cfg, topo):
        key = name.replace("/", ".")
        out[key] = ShardedTensor.from_rank_offsets(key, param, replica_id=_replica_id(name, topo))
    return out


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
            "ranks_per_cluster": t.ranks_per_cluster, "world_size": t.world_size}


def _state(job: Job, loading: bool) -> dict[str, Any]:
    model = model_sharded_state_dict(job.model, job.cfg.model, job.topo)
    world, rank = job.topo.world_size, job.topo.rank
    return {
        "model": model,
        # no chained_N prefixes: whether experts form their own optimizer depends on the
        # topology (megatron treats experts as dense at EP = 1), the saved keys must not
        "optimizer": job.optimizer.sharded_state_dict(
            model, is_loading=loading, metadata={"chained_optim_avoid_prefix": True}
        ),
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


def save(job: Job, step: int) -> Path:
    """Write iter_<step> atomically; keep the newest ``checkpoint.keep`` complete ones."""
    _in_process_results_queue()
    root = checkpoint_root(job)
    final, partial = root / f"iter_{step:07d}", root / f"iter_{step:07d}{PARTIAL}"
    if job.topo.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    state = _state(job, loading=False)
    state.update(step=step, scheduler=job.scheduler.state_dict(),
                 config=job.cfg.model_dump(), layout=_layout(job))
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if job.topo.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in complete_checkpoints(root)[: -job.cfg.checkpoint.keep or None]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .partial directory never counts)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("iter_") and not p.name.endswith(PARTIAL)
             and (p / "metadata.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def _check_compatible(saved: dict[str, Any], job: Job, path: Path) -> None:
    layout, now = saved["layout"], _layout(job)
    for key in ("kind", "clusters"):
        if layout[key] != now[key]:
            field = "model.kind" if key == "kind" else "parallel.clusters"
            raise ConfigError(
                f"{field}: checkpoint {path} was saved with {key}={layout[key]} but this run "
                f"has {now[key]}; only parallel.data and parallel.ranks_per_cluster may change"
            )
    model_now = job.cfg.model.model_dump()
    for key, value in saved["config"]["model"].items():
        if key not in ("balanced_routing",) and model_now.get(key) != value:
            raise ConfigError(
                f"model.{key}: checkpoint {path} has {value!r}, this run {model_now.get(key)!r}"
                f"; resume with the checkpoint's model section"
            )


def resume(job: Job, which: str) -> int:
    """Load ``which`` ('auto' = newest complete checkpoint, or a directory); returns the
    step to continue from (0 when 'auto' finds none)."""
    if which == "auto":
        found = complete_checkpoints(checkpoint_root(job))
        if not found:
            return 0
        path = found[-1]
    else:
        path = Path(which)
        if not (path / "metadata.json").is_file():
            raise ConfigError(f"--resume: {path} is not a complete checkpoint directory; "
                              f"pass an iter_N directory or 'auto'")
    common = dist_checkpointing.load_common_state_dict(str(path))
    _check_compatible(common, job, path)
    state = _state(job, loading=True)
    if common["layout"]["world_size"] != job.topo.world_size:
        del state["rng"]
    loaded = dist_checkpointing.load(state, str(path))
    params = {key: sh.data for key, sh in
              model_sharded_state_dict(job.model, job.cfg.model, job.topo).items()}
    with torch.no_grad():
        for key, value in loaded["model"].items():
            params[key].copy_(value)
    job.optimizer.load_state_dict(loaded["optimizer"])
    job.scheduler.load_state_dict(common["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    return int(common["step"])
