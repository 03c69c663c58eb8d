"""Recipe schema: YAML recipes checked by pydantic, with base-recipe inheritance and
dotted ``key=value`` overrides. Every error is one line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A recipe problem, phrased as one line: the field, what is wrong, the fix."""


# sizes and counts: 0 or a negative value is refused in one line naming the field, instead of
# failing deep inside megatron (a division by zero, an empty tensor)
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """One model section serves both kinds: ``kind`` picks FoE or the stock MoE baseline."""

    kind: Literal["foe", "moe"] = "foe"
    num_layers: Positive = 2
    hidden_size: Positive = 64
    num_attention_heads: Positive = 8
    num_query_groups: Positive = 4
    ffn_hidden_size: Positive = 128
    num_experts: Positive = 8
    moe_ffn_hidden_size: Positive = 32
    moe_router_topk: Positive = 2
    cluster_topk: Positive | None = None
    moe_layer_freq: int | list[int] = 1
    residual_sync: Literal["post_attention", "post_attention_and_moe"] = "post_attention"
    token_dispatcher: Literal["auto", "alltoall", "allgather"] = "auto"
    router_pre_softmax: bool = True
    balanced_routing: bool = False
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float | None = None
    vocab_size: Positive = 256
    seq_length: Positive = 64
    rotary_base: Positive = 10000
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    swiglu: bool = True
    untie_embeddings: bool = True

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                "model.hidden_size must be divisible by model.num_attention_heads"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                "model.num_attention_heads must be divisible by model.num_query_groups"
            )
        if self.moe_router_topk > self.num_experts:
            raise ValueError("model.moe_router_topk must not exceed model.num_experts")
        return self

    def layer_is_moe(self, layer: int) -> bool:
        """megatron-core's moe_layer_freq: an int N makes every N-th layer MoE, a list is 1/0."""
        if isinstance(self.moe_layer_freq, int):
            return layer % self.moe_layer_freq == 0
        return bool(self.moe_layer_freq[layer])


class ParallelConfig(_Section):
    """FoE world = data x clusters x ranks_per_cluster; the MoE baseline uses the same ranks."""

    data: Positive = 1
    clusters: Positive = 1
    ranks_per_cluster: Positive = 1
    expert_parallel: Positive | None = None
    # Where several clusters of a federation share a node and it spans nodes, a federated sum
    # of at least this many bytes is two-level (inside the node, across nodes, back: fewer
    # bytes cross nodes, three calls); a smaller one, such as a decode step's, is one flat
    # all-reduce, since its time is the calls' latency. Any size: 0 (tests of the path).
    two_level_min_bytes: int = Field(default=512 * 1024, ge=0)
    # Inference (no gradients) with at least two sequences per rank: a layer whose federated
    # sum has at least this many bytes runs on two halves of the batch, so that one half's sum
    # travels while the other half computes. Smaller sums run whole, since halving doubles
    # their calls (on the emulated 1 Gbit fabric, bench pair at C = 4: halving cost 1-14% at
    # 1-2 MiB and paid 2-3% at 3.9 MiB, 9-13% at 4-8 MiB). Never: a value above any sum;
    # always: 0. CPU (gloo) only: on CUDA layers sum whole batches.
    overlap_min_bytes: int = Field(default=3 * 1024 * 1024, ge=0)

    @property
    def world_size(self) -> int:
        return self.data * self.clusters * self.ranks_per_cluster


class DataConfig(_Section):
    """Training data: megatron indexed datasets (prefixes of .bin/.idx made by
    foe-prepare-data). No prefixes: the embedded default corpus, prepared on first use."""

    prefixes: list[str] = []
    weights: list[float] | None = None
    split: str = "98,2,0"
    tokenizer: Literal["byte", "bpe", "hf"] = "byte"
    tokenizer_path: str | None = None
    cache_dir: str = "~/.cache/foe-train"


class DeepSpeedSection(_Section):
    """DeepSpeed settings of ``training.engine: deepspeed`` (docs/deepspeed.md): the ZeRO stage
    of the config generated from the recipe (default 1), or a DeepSpeed JSON file, whose
    batch, clipping and precision keys must then agree with the recipe."""

    zero_stage: int | None = None
    config: str | None = None


class TrainingConfig(_Section):
    """Budget and optimisation. Batch sizes count sequences; micro_batch_size is per token
    shard, global_batch_size per optimizer step over all shards."""

    micro_batch_size: Positive = 2
    global_batch_size: Positive = 8
    train_iters: Positive = 100
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: NonNegative = 10
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    eval_interval: NonNegative = 20
    eval_iters: Positive = 2
    distributed_optimizer: bool = False
    recompute: bool = False
    bf16: bool | None = None
    # megatron: megatron-core's DDP and optimizer; deepspeed: the same model under DeepSpeed ZeRO
    engine: Literal["megatron", "deepspeed"] = "megatron"
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    # a collective that waits longer than this (a dead or stopped peer) fails the job instead
    # of hanging it for torch's 10-30 minute default
    collective_timeout_s: float = 600.0

    @model_validator(mode="after")
    def _schedule(self) -> TrainingConfig:
        if self.warmup_iters >= self.train_iters:
            raise ValueError(
                f"training.warmup_iters={self.warmup_iters} must be below training.train_iters="
                f"{self.train_iters}; shorten the warmup"
            )
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"training.min_lr={self.min_lr} must lie in [0, training.lr]")
        if self.engine != "deepspeed" and self.deepspeed != DeepSpeedSection():
            raise ValueError(
                "training.deepspeed: applies only to training.engine=deepspeed; set "
                "training.engine=deepspeed or remove the training.deepspeed section"
            )
        if self.engine == "deepspeed" and self.distributed_optimizer:
            raise ValueError(
                "training.distributed_optimizer: megatron's distributed optimizer has no role "
                "under training.engine=deepspeed (ZeRO partitions the optimizer); set it to false"
            )
        if self.collective_timeout_s <= 0:
            raise ValueError(
                f"training.collective_timeout_s={self.collective_timeout_s} must be positive "
                f"(seconds a collective may wait for its peers)"
            )
        return self


class CheckpointConfig(_Section):
    """``interval`` steps between saves (0: only the last step and stop signals); ``keep`` the
    newest complete checkpoints kept, at least the one just written."""

    interval: int = 0
    keep: int = 2

    @model_validator(mode="after")
    def _counts(self) -> CheckpointConfig:
        if self.keep < 1:
            raise ValueError(
                f"checkpoint.keep={self.keep} must be at least 1 (the checkpoint just written "
                f"is always kept); set checkpoint.keep=1 or more"
            )
        if self.interval < 0:
            raise ValueError(
                f"checkpoint.interval={self.interval} must be >= 0 (0: save only at the end)"
            )
        return self


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "foe-train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = []
    group: str | None = None


class LoggingConfig(_Section):
    run_dir: str = "runs/{name}"
    name: str = "run"
    log_interval: Positive = 1
    progress: bool = True
    comm_report: bool = True  # record the first step's collectives to comm_step.json
    wandb: WandbConfig = WandbConfig()

    def resolved_run_dir(self) -> Path:
        """The run directory, ``{name}`` filled in, as an absolute path."""
        return Path(self.run_dir.format(name=self.name)).expanduser().resolve()


class RecipeConfig(_Section):
    """A whole recipe: model, topology, data, optimisation, checkpoints, tracking."""

    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    seed: int = 1234


def cluster_topk(model: ModelConfig, clusters: int) -> int:
    """Top-k of each cluster's router: explicit, or the baseline k split evenly (C*k_c = k)."""
    if model.cluster_topk is not None:
        return model.cluster_topk
    if model.moe_router_topk % clusters:
        raise ConfigError(
            f"model.cluster_topk: moe_router_topk={model.moe_router_topk} is not divisible by "
            f"parallel.clusters={clusters}; set model.cluster_topk explicitly"
        )
    return model.moe_router_topk // clusters


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The recipe at ``path`` merged over its ``base:`` chain; ``chain`` holds the recipes
    that led here, so a cycle is refused instead of recursing until Python gives up."""
    if path.resolve() in chain:
        loop = " -> ".join(p.name for p in (*chain[chain.index(path.resolve()):], path))
        raise ConfigError(f"base: cycle {loop}; remove one of these base: lines")
    if not path.is_file():
        raise ConfigError(f"config: file {path} does not exist; pass an existing recipe path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config: {path} is not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml((path.parent / base).resolve(), (*chain, path.resolve())), data)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. model.num_layers=4")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown key; remove it or fix its spelling"
    if err["type"] == "missing":
        return f"{field}: required and missing; add it (is this the right kind of file?)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return msg
    got = repr(err.get("input"))
    return f"{field}: {msg} (got {got if len(got) <= 80 else got[:77] + '...'})"


def build_config(data: dict, schema: type[BaseModel] = RecipeConfig) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def load_config(
    path: str | Path | None, overrides: list[str] | None = None,
    schema: type[BaseModel] = RecipeConfig,
) -> Any:
    """Read a recipe (following ``base:``), apply overrides, validate against ``schema``."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return build_config(apply_overrides(data, overrides or []), schema)
