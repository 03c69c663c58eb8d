"""Cluster descriptions (configs/clusters/*.yaml, overridable from the command line) and the
placement of a recipe's ranks on a cluster's nodes, checked before anything is launched."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from foe_train.config import ConfigError, RecipeConfig, load_config

if TYPE_CHECKING:
    from foe_train.topology import Grid

# SLURM's --time forms we accept: [days-]hours:minutes:seconds
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$")


def _seconds(time: str) -> int:
    days, hours, minutes, seconds = _TIME.match(time).groups()
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)


class ClusterConfig(BaseModel):
    """Where a job runs: nodes, processes (GPUs) per node, scheduler settings and the
    software environment (a container image for pyxis/enroot, or a virtualenv)."""

    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1)
    # processes per node: one per GPU, or CPU processes on an `accelerator: cpu` cluster
    gpus_per_node: int | None = Field(None, ge=1)
    accelerator: Literal["gpu", "cpu"] = "gpu"
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    # SIGUSR1 this long before the time limit gives the job time to checkpoint and requeue
    preempt_signal_seconds: int = Field(300, ge=1, le=65535)
    exclusive: bool = True
    container_image: str | None = None
    container_mounts: list[str] = []
    venv: str | None = None
    env: dict[str, str] = {}

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(
                f"time: {value!r} is not a [days-]HH:MM:SS string; quote it in YAML "
                f"(unquoted, 12:00:00 reads as the number 43200)"
            )
        if not _TIME.match(value):
            raise ValueError(f"time: {value!r} is not [days-]HH:MM:SS, e.g. '04:00:00'")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ClusterConfig:
        if self.gpus_per_node is None:
            raise ValueError(
                "gpus_per_node: not set; pass --gpus-per-node or set it in the cluster file"
            )
        if (self.container_image is None) == (self.venv is None):
            raise ValueError(
                "container_image/venv: set exactly one (--container-image IMG or --venv PATH)"
            )
        limit = _seconds(self.time)
        if self.preempt_signal_seconds >= limit:
            raise ValueError(
                f"preempt_signal_seconds: {self.preempt_signal_seconds} s is not below the "
                f"time limit {self.time} ({limit} s); lower it or raise time"
            )
        return self


def load_cluster(path: str | None, **flags: object) -> ClusterConfig:
    """The cluster file (optional) with the command line's non-None flags on top; a flag
    choosing the environment (container_image or venv) replaces the file's choice."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"--cluster: file {path} does not exist; see configs/clusters/")
    given = {key: value for key, value in flags.items() if value is not None}
    if given.keys() & {"container_image", "venv"}:
        given = {"container_image": None, "venv": None, **given}
    # JSON values are YAML scalars of the same type: '01:00:00' stays a string
    overrides = [f"{key}={json.dumps(value)}" for key, value in given.items()]
    try:
        return load_config(path, overrides, schema=ClusterConfig)
    except ConfigError as exc:
        msg = str(exc)  # file-level problems say "config:", field problems name the field
        raise ConfigError(msg.replace("config:", "--cluster:", 1) if msg.startswith("config:")
                          else f"cluster.{msg}") from None


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _foe_node(grid: Grid, ranks: list[int]) -> str:
    L = grid.ranks_per_cluster
    replicas: dict[int, list[int]] = {}
    for dp, c, l in map(grid.coords, ranks):
        if l == 0:
            replicas.setdefault(dp, []).append(c)
    parts = []
    for dp, cs in replicas.items():
        many = len(cs) > 1
        parts.append(f"replica {dp} cluster{'s' if many else ''} {_span(cs[0], cs[-1])} "
                     f"({L} rank{'s' if L > 1 else ''}{' each' if many else ''})")
    return ", ".join(parts)


def _moe_node(grid: Grid, ranks: list[int]) -> str:
    # the baseline's grid has one cluster: an EP group is a replica (Grid's docstring)
    groups = sorted({grid.coords(rank).dp for rank in ranks})
    return (f"MoE baseline, EP group{'s' if len(groups) > 1 else ''} "
            f"{_span(groups[0], groups[-1])} of {grid.expert_parallel} ranks")


def placement(cfg: RecipeConfig, nodes: int, per_node: int) -> list[str]:
    """One line per node: which ranks it runs and what they are. Ranks are consecutive per
    node, as torchrun assigns them. Raises TopologyError (one line) for a layout that cannot
    run, e.g. a cluster spanning nodes."""
    from foe_train.topology import check_layout, consecutive_nodes

    world = nodes * per_node
    grid = check_layout(cfg.model, cfg.parallel, world, consecutive_nodes(world, nodes))
    lines = []
    for node, ranks in enumerate(grid.node_ranks()):
        what = _foe_node(grid, ranks) if grid.kind == "foe" else _moe_node(grid, ranks)
        lines.append(f"node{node}: ranks {_span(ranks[0], ranks[-1])}: {what}")
    return lines
