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

import json
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
from torch.distributed.checkpoint import FileSystemReader

from foe_train.config import ConfigError, ModelConfig, RecipeConfig
from foe_train.model.builder import named_global_parameters
from foe_train.model.head import vocab_shard

if TYPE_CHECKING:
    from foe_train.topology import Topology
    from foe_train.train.loop import Job

PARTIAL = ".partial"


def checkpoint_root(job: Job) -> Path:
    return job.run_dir / "checkpoints"


def _replica_id(name: str, param: torch.Tensor, topo: Topology) -> int:
    """0 on the one rank that writes this weight, >0 on the ranks holding copies."""
    if ".local_experts." in name:
        return dist.get_rank(topo.groups["expert_dp"])
    if topo.kind == "foe" and ("decoder.layers." in name or vocab_shard(param)):
        return dist.get_rank(topo.groups["token_dp"])
    return topo.rank


def model_sharded_state_dict(
    model: torch.nn.Module, model_cfg: ModelConfig, topo: Topology
) -> dict[str, ShardedTensor]:
    """Every weight of this rank under its global name, the param itself as data."""
    out = {}
    for name, param in named_global_parameters(model, model_cfg, topo):
        key = name.replace("/", ".")
        shard = vocab_shard(param)
        offsets = [(0, *shard)] if shard else []
        out[key] = ShardedTensor.from_rank_offsets(
            key, param, *offsets, replica_id=_replica_id(name, param, topo)
        )
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


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .partial directory never counts)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("iter_") and not p.name.endswith(PARTIAL)
             and (p / "metadata.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def check_compatible(saved: dict[str, Any], cfg: RecipeConfig, path: Path) -> None:
    """Refuse (one line) a checkpoint this recipe cannot continue: another model kind, FoE
    cluster count or model shape; parallel.data and parallel.ranks_per_cluster may differ."""
    layout = saved["layout"]
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


def damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot load, naming the damaged file, or None: its
    metadata files are readable and every shard file its index names is present and holds the
    byte ranges recorded for it. Cheap (no tensor is read), so it runs before any worker."""
    try:
        json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{path / 'metadata.json'} is unreadable ({type(exc).__name__})"
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # a torn pickle raises anything from EOFError to KeyError
        return f"{path / '.metadata'} is unreadable ({type(exc).__name__})"
    try:
        dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # as above
        return f"{path / 'common.pt'} is unreadable ({type(exc).__name__})"
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, size in sorted(needed.items()):
        shard = path / rel
        if not shard.is_file():
            return f"{shard} is missing"
        if shard.stat().st_size < size:
            return f"{shard} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


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
    step = int(common["step"])
    if job.topo.rank == 0:
        print(f"foe-train: resumed from {path.name} (step {step}) in {path.parent}", flush=True)
    return step, float(common.get("wall_time_s", 0.0))
