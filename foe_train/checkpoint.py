"""foe-train checkpoints on disk, as training and inference both read them: megatron-core
dist_checkpointing directories ``iter_<step>`` (written as ``iter_<step>.partial`` and renamed
when complete), every weight under its topology-free global name so any parallel.data and
parallel.ranks_per_cluster load it; finding the newest complete one, checking one for damage
before any worker starts, and loading the model weights alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader

from foe_train.config import ConfigError, ModelConfig
from foe_train.model.builder import named_global_parameters
from foe_train.model.head import vocab_shard
from foe_train.topology import Topology

PARTIAL = ".partial"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .partial directory never counts)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("iter_") and not p.name.endswith(PARTIAL)
             and (p / "metadata.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def newest(path: str | Path) -> Path:
    """An iter_N directory as given, or the newest complete one under a checkpoints or run
    directory."""
    root = Path(path)
    if (root / "metadata.json").is_file():
        return root
    found = complete_checkpoints(root / "checkpoints") or \
        complete_checkpoints(root)
    if not found:
        raise ConfigError(f"--checkpoint: {path} holds no complete checkpoint; pass an iter_N "
                          f"directory written by foe-train, or its run directory")
    return found[-1]


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


def load_weights(model: torch.nn.Module, model_cfg: ModelConfig, topo: Topology,
                 path: Path) -> None:
    """Only the model weights of a foe-train checkpoint, each rank reading the global names it
    holds now (so any D and L load, as in training's resume)."""
    state = model_sharded_state_dict(model, model_cfg, topo)
    loaded = dist_checkpointing.load({"model": state}, str(path))
    with torch.no_grad():
        for key, value in loaded["model"].items():
            state[key].data.copy_(value)
