"""DeepSpeed ZeRO (stage 1 or 2) as the engine of a training job (``training.engine:
deepspeed``): the same megatron-core model, data, LR schedule, metrics and checkpoints, with
DeepSpeed's ZeRO optimizer in place of megatron's DDP and optimizer (docs/deepspeed.md).

FoE's reduction groups are handed to DeepSpeed through its own seams: an ``mpu`` whose
data-parallel group is the token-DP group (the baseline: its DP group) and whose
model-parallel group is the federation, and DeepSpeed's expert-data-parallel group registry
holding the expert-DP group. ZeRO then partitions and reduces dense gradients over token-DP and
expert gradients over expert-DP, and its gradient norm (summed over the data-parallel group,
then the model-parallel group) counts each weight once when the copies of shared weights on
clusters > 0 are the only parameters not marked model-parallel (``_count_once``). DeepSpeed
recognises a model as MoE only by its own MoE layer class, hence ``_MegatronMoEEngine``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ValidationError

from foe_train.config import ConfigError, RecipeConfig, _one_line
from foe_train.topology import Topology

EXPERT_GROUP = "foe_experts"  # DeepSpeed's name for the expert-DP group of this job
FIELD = "training.deepspeed.config"

# keys of a DeepSpeed JSON this engine honours; the first four must agree with the recipe
SUPPORTED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "zero_optimization", "bf16", "fp16", "communication_data_type",
    "steps_per_print", "wall_clock_breakdown",
)
# ZeRO settings that would reduce or update FoE's groups differently from the megatron engine,
# or compile C++ at run time, with the reason
_REFUSED_ZERO = {
    "offload_optimizer": "its CPU Adam is a C++ extension DeepSpeed compiles at run time",
    "offload_param": "parameter offload is a ZeRO-3 feature",
    "zero_quantized_gradients": "quantized gradients change the numbers the recipe trains on",
    "zero_quantized_weights": "quantized weights change the numbers the recipe trains on",
}


def _import_deepspeed() -> Any:
    """DeepSpeed on this machine's accelerator, without its run-time C++ builds: on CPU it
    would compile a shared-memory collective (``deepspeed_shm_comm``) at first init; gloo
    does that work here."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _read_json(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{FIELD}: {path} does not exist; pass a DeepSpeed JSON file")
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise ConfigError(f"{FIELD}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{FIELD}: {path} must hold a JSON object at top level")
    return data


def _section(given: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = given.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a JSON object (got {value!r})")
    return value


def _check_zero(zero: dict[str, Any], where: str) -> None:
    """Refuse ZeRO settings DeepSpeed rejects, or that cannot keep FoE's groups and the
    megatron engine's numbers."""
    _import_deepspeed()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        stage = int(DeepSpeedZeroConfig(**zero).stage)
    except ValidationError as exc:
        raise ConfigError(f"{where}: zero_optimization.{_one_line(exc)}") from None
    if stage == 0:
        raise ConfigError(
            f"{where}: zero_optimization.stage=0 is not supported: DeepSpeed's stage-0 clipping "
            f"averages per-rank gradient norms (runtime/utils.py clip_grad_norm_), which "
            f"miscounts expert weights held on other ranks; use stage 1 or 2"
        )
    if stage == 3:
        raise ConfigError(
            f"{where}: zero_optimization.stage=3 is not supported: DeepSpeed ZeRO-3 accepts "
            f"expert parameters only in its own MoE layers (engine.py "
            f"_validate_zero3_moe_compatibility), not megatron-core's FoE/MoE experts; use "
            f"stage 1 or 2"
        )
    for key, why in _REFUSED_ZERO.items():
        if zero.get(key):
            raise ConfigError(f"{where}: zero_optimization.{key} is not supported ({why}); "
                              f"remove it")
    if not zero.get("reduce_scatter", True) or not zero.get("contiguous_gradients", True):
        raise ConfigError(
            f"{where}: zero_optimization.reduce_scatter and contiguous_gradients must stay "
            f"true: DeepSpeed's expert-gradient path needs both (without reduce_scatter ZeRO "
            f"all-reduces expert gradients over the dense group, not expert-DP)"
        )


def deepspeed_config(cfg: RecipeConfig, token_shards: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a recipe: generated from training.* (ZeRO stage
    ``training.deepspeed.zero_stage``, default 1), or ``training.deepspeed.config``'s JSON
    checked against the recipe. Raises ConfigError (one line) for a key this engine does not
    support, a value that disagrees with the recipe, or a ZeRO setting it cannot run."""
    t, ds = cfg.training, cfg.training.deepspeed
    given = _read_json(ds.config) if ds.config else {}
    where = f"{FIELD}: {ds.config}" if ds.config else "training.deepspeed"
    for key in given:
        if key in ("optimizer", "scheduler"):
            raise ConfigError(
                f"{where}: '{key}' comes from the recipe (training.lr, min_lr, warmup_iters, "
                f"lr_decay_style, weight_decay, adam_beta1/2) so both engines train alike; "
                f"remove it from the JSON"
            )
        if key not in SUPPORTED_KEYS:
            raise ConfigError(f"{where}: unknown or unsupported key '{key}'; remove it "
                              f"(supported: {', '.join(SUPPORTED_KEYS)})")
    from_recipe = {
        "train_batch_size": (t.global_batch_size, "training.global_batch_size"),
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "training.micro_batch_size"),
        "gradient_accumulation_steps": (
            t.global_batch_size // (token_shards * t.micro_batch_size),
            f"training.global_batch_size / ({token_shards} token shards x "
            f"training.micro_batch_size)",
        ),
        "gradient_clipping": (t.clip_grad, "training.clip_grad"),
    }
    for key, (value, source) in from_recipe.items():
        if key in given and given[key] != value:
            raise ConfigError(f"{where}: {key}={given[key]!r} but {source} is {value!r}; make "
                              f"them agree or drop the key (it is filled from the recipe)")
    if _section(given, "fp16", where).get("enabled", False):
        raise ConfigError(f"{where}: fp16.enabled is not supported (the megatron engine trains "
                          f"in fp32 or bf16 without loss scaling); use training.bf16=true")
    if _section(given, "bf16", where).get("enabled", bf16) != bf16:
        raise ConfigError(f"{where}: bf16.enabled={not bf16} but the recipe trains in "
                          f"{'bf16' if bf16 else 'fp32'}; set training.bf16={str(not bf16).lower()}"
                          f" or change the JSON")
    zero_given = _section(given, "zero_optimization", where)
    zero = {"stage": 1, "contiguous_gradients": True, "reduce_scatter": True,
            "overlap_comm": False, **zero_given}
    if ds.zero_stage is not None:
        if "stage" in zero_given and zero["stage"] != ds.zero_stage:
            raise ConfigError(f"{where}: zero_optimization.stage={zero['stage']} but "
                              f"training.deepspeed.zero_stage={ds.zero_stage}; set one of them")
        zero["stage"] = ds.zero_stage
    _check_zero(zero, where)
    return {
        # megatron reduces gradients in fp32 whatever the training dtype; so does this engine
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,  # foe-train's tracker logs the steps
        **given,
        **{key: value for key, (value, _) in from_recipe.items()},
        "zero_optimization": zero,
        "bf16": {**_section(given, "bf16", where), "enabled": bf16},
    }


class _Mpu:
    """DeepSpeed's model-parallel unit: data-parallel = the group dense gradients reduce over
    (FoE's token-DP), model-parallel = the group gradient norms sum over (the federation)."""

    def __init__(self, data: dist.ProcessGroup, model: dist.ProcessGroup) -> None:
        self.data, self.model = data, model

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.data

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.data)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.data)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.model

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.model)

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.model)


def _count_once(model: torch.nn.Module, topo: Topology) -> None:
    """ZeRO's norm counts a parameter on model-parallel rank c > 0 only if it is marked
    model-parallel; megatron's engine counts every parameter but the shared copies marked by
    ``mark_shared_duplicates``. Marking exactly the others makes both count each weight once.
    Expert weights get DeepSpeed's expert-group name, which routes them to expert-DP."""
    topo.mark_shared_duplicates(model)
    for name, param in model.named_parameters():
        shared = getattr(param, "shared", False)
        param.model_parallel = not shared
        if shared:
            param.tensor_model_parallel = False
        if ".local_experts." in name:
            param.group_name = EXPERT_GROUP


def _param_groups(model: torch.nn.Module, cfg: RecipeConfig) -> list[dict[str, Any]]:
    """megatron's optimizer groups (no weight decay on norms and biases via ``wd_mult``, the
    schedule's max/min LR), with DeepSpeed's expert groups split off."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    t = cfg.training
    groups: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
    for name, param in model.named_parameters():
        groups[len(param.shape) == 1 or name.endswith(".bias")].append(param)
    return split_params_into_different_moe_groups_for_optimizer([
        {"name": "no_wd" if no_wd else "wd", "params": params, "wd_mult": 0.0 if no_wd else 1.0,
         "lr_mult": 1.0, "max_lr": t.lr, "min_lr": t.min_lr, "default_config": True}
        for no_wd, params in groups.items() if params
    ])


def _register_expert_groups(topo: Topology) -> None:
    """DeepSpeed looks expert groups up by name (deepspeed/utils/groups.py); its own builders
    assume EP-major layouts over the whole world, so FoE's per-cluster groups are entered as
    they are."""
    from deepspeed.utils import groups

    pgc = topo.cluster_pg_collection()
    for table, ranks, group in ((groups._EXPERT_PARALLEL_GROUP,
                                 groups._EXPERT_PARALLEL_GROUP_RANKS, pgc.ep),
                                (groups._EXPERT_DATA_PARALLEL_GROUP,
                                 groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, pgc.expt_dp)):
        table[EXPERT_GROUP] = group
        ranks[EXPERT_GROUP] = dist.get_process_group_ranks(group)


def build_deepspeed(
    model: torch.nn.Module, cfg: RecipeConfig, topo: Topology, dtype: torch.dtype
) -> DeepSpeedTrainer:
    """The model under a DeepSpeed ZeRO engine with FoE's groups and the recipe's AdamW."""
    deepspeed = _import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    class _MegatronMoEEngine(DeepSpeedEngine):
        """DeepSpeed sets up expert groups, partitions and norms only for models holding its
        own MoE layer class; a megatron-core model is declared MoE here instead."""

        def _set_client_model(self, client: torch.nn.Module) -> None:
            self.has_moe_layers = True
            super()._set_client_model(client)

    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    pgc = topo.cluster_pg_collection()
    mpu = _Mpu(pgc.dp, topo.vocab_group)
    config = deepspeed_config(cfg, topo.token_shards, dtype == torch.bfloat16)
    _count_once(model, topo)
    _register_expert_groups(topo)
    t = cfg.training
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=t.lr, eps=1e-8,
                                  weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2))
    engine = _MegatronMoEEngine(args=None, model=model, optimizer=optimizer, mpu=mpu,
                                dist_init_required=False, config=config,
                                config_class=DeepSpeedConfig(config, mpu))
    return DeepSpeedTrainer(engine, optimizer)


class DeepSpeedTrainer:
    """The Engine interface (``train/engine.py``) over a DeepSpeed engine. Each micro-batch's
    loss arrives already divided by the number of micro-batches (as for megatron), so
    DeepSpeed does not divide it again; its micro-step counter advances after every backward
    but the last, whose ``step`` is the update."""

    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = engine, optimizer

    def zero_grad(self) -> None:
        self.module.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)
        if not self.module.is_gradient_accumulation_boundary():
            self.module.step()

    def update(self) -> tuple[bool, float]:
        self.module.step()
        norm = self.module.get_global_grad_norm()  # None when nothing computed it
        return self.module.was_step_applied(), 0.0 if norm is None else float(norm)

    def optimizer_state(self, model_state: dict[str, Any], loading: bool) -> Any:
        """This rank's ZeRO partition state, one object per rank: ZeRO state loads only at
        the layout it was saved at (``checkpoint.resume`` refuses another)."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        world, rank = dist.get_world_size(), dist.get_rank()
        return ShardedObject(f"deepspeed_zero_world{world}", self.module.optimizer.state_dict(),
                             (world,), (rank,), replica_id=0)

    def load_optimizer_state(self, state: Any) -> None:
        zero = self.module.optimizer
        states: list[Any] = [None] * dist.get_world_size(zero.dp_process_group)
        states[dist.get_rank(zero.dp_process_group)] = state
        zero.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
