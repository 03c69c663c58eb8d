"""The training job: recipe -> topology -> data -> model -> megatron DDP + optimizer +
scheduler -> steps with gradient accumulation, validation, checkpoints and tracking.

Runs under torchrun (``python -m foe_train.train --config ...``). Every token shard reads its
own slice of each global batch; the loss each rank reports is averaged over all ranks, which
weights every shard equally because each FoE shard is seen by all C clusters alike.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import yaml
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from foe_train.budget import budget
from foe_train.config import RecipeConfig
from foe_train.data.loader import ShardedBatches, build_datasets
from foe_train.data.tokenizers import build_tokenizer
from foe_train.model import head
from foe_train.model.builder import build_model, count_parameters, wrap_ddp
from foe_train.topology import Topology, build_topology
from foe_train.train import checkpoint
from foe_train.train.tracking import Tracker

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class Job:
    cfg: RecipeConfig
    topo: Topology
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: Any
    scheduler: OptimizerParamScheduler
    train: ShardedBatches
    valid: ShardedBatches | None
    run_dir: Path
    dtype: torch.dtype


def _dtype(cfg: RecipeConfig) -> torch.dtype:
    bf16 = cfg.training.bf16 if cfg.training.bf16 is not None else torch.cuda.is_available()
    return torch.bfloat16 if bf16 else torch.float32


def build_job(cfg: RecipeConfig) -> Job:
    """Everything a step needs, built the same way on every rank."""
    topo = build_topology(cfg.model, cfg.parallel)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    train_ds, valid_ds, _ = build_datasets(cfg.data, cfg.model, cfg.training, tokenizer, cfg.seed)
    dtype = _dtype(cfg)
    model = build_model(cfg.model, topo, seed=cfg.seed, dtype=dtype,
                        recompute=cfg.training.recompute)
    ddp = wrap_ddp(model, topo, cfg.training.distributed_optimizer)
    optimizer, scheduler = build_optimizer(ddp, cfg, topo, dtype)
    t = cfg.training
    shards = (t.global_batch_size, t.micro_batch_size, topo.token_shards, topo.token_shard)
    train = ShardedBatches(train_ds, *shards)
    valid = ShardedBatches(valid_ds, *shards) if valid_ds is not None and len(valid_ds) else None
    return Job(cfg, topo, model, ddp, optimizer, scheduler, train, valid,
               cfg.logging.resolved_run_dir(), dtype)


def build_optimizer(
    ddp: torch.nn.Module, cfg: RecipeConfig, topo: Topology, dtype: torch.dtype
) -> tuple[Any, OptimizerParamScheduler]:
    """megatron's Adam (dense and expert parts chained) with FoE-correct gradient-norm
    groups, and its warmup + decay schedule."""
    t = cfg.training
    topo.mark_shared_duplicates(ddp.module)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
            bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=t.distributed_optimizer,
        ),
        [ddp],
        use_gloo_process_groups=False,
        pg_collection=topo.optimizer_pg_collection(),
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=t.train_iters, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _to_device(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.cuda(non_blocking=True) if torch.cuda.is_available() else tokens


def micro_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one micro-batch [b, s+1]."""
    tokens = _to_device(tokens)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
    logits = model(inputs, position, None)
    return head.cross_entropy(logits, labels, head.head_group(model)).mean()


def _world_mean(value: torch.Tensor) -> float:
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


class ExpertLoad:
    """Tokens routed to each expert, per cluster, from forward hooks on the routers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if name.endswith("mlp.router"):
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module, inputs, output) -> None:
            counts = output[1].detach().sum(0).float().cpu()
            self.counts[name] = self.counts.get(name, 0) + counts
        return record

    def per_cluster(self, topo: Topology) -> dict[str, float]:
        """max/mean tokens per expert (1.0 = even), averaged over MoE layers and over the
        ranks of each cluster: one number per cluster (the whole baseline for MoE)."""
        ratios = [float(c.max() / c.mean().clamp_min(1e-9)) for c in self.counts.values()]
        self.counts.clear()
        mine = (topo.cluster, sum(ratios) / len(ratios) if ratios else 1.0)
        everyone: list[Any] = [None] * topo.world_size
        dist.all_gather_object(everyone, mine)
        by_cluster: dict[int, list[float]] = {}
        for cluster, value in everyone:
            by_cluster.setdefault(cluster, []).append(value)
        return {f"expert_load_imbalance/cluster{c}": sum(v) / len(v)
                for c, v in sorted(by_cluster.items())}


def aux_losses(micro_batches: int, moe_layers: int) -> dict[str, float]:
    """MoE auxiliary losses megatron's routers recorded this step (load balancing, z-loss),
    averaged over layers, micro-batches and ranks; the tracker is then reset."""
    tracker = get_moe_layer_wise_logging_tracker()
    out = {f"aux/{name}": _world_mean(tracker[name]["values"].sum().cpu()
                                      / max(micro_batches * moe_layers, 1))
           for name in sorted(tracker)}
    clear_aux_losses_tracker()
    return out


def train_step(job: Job, step: int) -> dict[str, float]:
    job.ddp.zero_grad_buffer()
    job.optimizer.zero_grad()
    micro = job.train.micro_batches(step)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(micro)))
    total = torch.zeros(())
    for tokens in micro:
        loss = micro_loss(job.ddp, tokens) / len(micro)
        loss.backward()
        total += loss.detach().cpu()
    job.ddp.finish_grad_sync()
    ok, grad_norm, _ = job.optimizer.step()
    job.scheduler.step(increment=1)
    return {"loss": _world_mean(total), "grad_norm": float(grad_norm or 0.0),
            "skipped": float(not ok)}


def recorded_step(job: Job, step: int) -> dict[str, float]:
    """A training step under the communication recorder; rank 0 writes what each collective
    kind sent per rank (mean over ranks) and whether it crossed nodes to comm_step.json."""
    from foe_train.bench.comm import CommRecorder, gather_summaries
    from foe_train.bench.comm_run import mean_over_ranks

    topo = job.topo
    with CommRecorder(group_kinds=topo.group_kinds(), node_of_rank=topo.node_of_rank) as rec:
        metrics = train_step(job, step)
    summaries = gather_summaries(rec, by="op_kind")
    spans: list[Any] = [None] * topo.world_size
    dist.all_gather_object(spans, sorted({(r.op, r.group_kind, r.spans_nodes)
                                          for r in rec.records}))
    if topo.rank == 0:
        report = {"step": step + 1, "nodes": len(set(topo.node_of_rank)),
                  "by_kind": mean_over_ranks(summaries),
                  "collectives": sorted({tuple(s) for per_rank in spans for s in per_rank})}
        (job.run_dir / "comm_step.json").write_text(json.dumps(report, indent=1))
    return metrics


@torch.no_grad()
def evaluate(job: Job) -> float:
    """Mean loss over the same eval_iters validation batches every time, so values are
    comparable across steps, runs and topologies."""
    job.ddp.eval()
    total, count = torch.zeros(()), 0
    for i in range(job.cfg.training.eval_iters):
        for tokens in job.valid.micro_batches(i):
            total += micro_loss(job.ddp, tokens).cpu()
            count += 1
    job.ddp.train()
    return _world_mean(total / max(count, 1))


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
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def run(cfg: RecipeConfig, resume: Path | None = None) -> dict[str, Any]:
    """Train to cfg.training.train_iters (resuming if asked); returns the summary on rank 0."""
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
    stop, load, peak = StopSignal(), ExpertLoad(job.model), _peak_flops()
    begin, last_val = time.perf_counter(), None
    moe_layers = sum(cfg.model.layer_is_moe(i) for i in range(cfg.model.num_layers))
    step = start
    while step < t.train_iters:
        tick = time.perf_counter()
        if step == start and cfg.logging.comm_report:
            metrics = recorded_step(job, step)
        else:
            metrics = train_step(job, step)
        step += 1
        elapsed = time.perf_counter() - tick
        tokens_per_s = tokens_per_step / elapsed
        metrics.update(
            tokens=step * tokens_per_step, lr=job.scheduler.get_lr(job.optimizer.param_groups[0]),
            tokens_per_s=tokens_per_s,
            tflops_per_rank=numbers["flops_per_token"] * tokens_per_s / topo.world_size / 1e12,
            **load.per_cluster(topo), **aux_losses(job.train.accumulation_steps, moe_layers),
        )
        if peak:
            metrics["mfu"] = metrics["tflops_per_rank"] * 1e12 / peak
        if step % cfg.logging.log_interval == 0 or step == t.train_iters:
            tracker.log(step, metrics)
        if job.valid is not None and t.eval_interval and (
            step % t.eval_interval == 0 or step == t.train_iters
        ):
            last_val = evaluate(job)
            tracker.log_eval(step, {"val_loss": last_val})
        interval = cfg.checkpoint.interval
        stopping = stop.agreed()
        if step == t.train_iters or stopping or (interval and step % interval == 0):
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


def init_distributed(timeout_s: float) -> None:
    """Join the job's process group with training.collective_timeout_s on every collective.
    torch's new_group takes the module default rather than the world group's timeout, so the
    default is set too: the topology's and megatron's groups then time out alike."""
    timeout = timedelta(seconds=timeout_s)
    dist.distributed_c10d.default_pg_timeout = timeout
    dist.distributed_c10d.default_pg_nccl_timeout = timeout
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    """Entry point under torchrun. A bad recipe, run directory or --resume ends every rank with
    exit 2 and one line on stderr from rank 0."""
    import argparse

    from foe_train.config import ConfigError, load_config
    from foe_train.train.preflight import preflight, prepare_run_dir

    ap = argparse.ArgumentParser(prog="foe-train")
    ap.add_argument("--config")
    ap.add_argument("--resume", help="'auto' (newest intact checkpoint of this run), a run "
                                     "directory or an iter_N checkpoint directory")
    ap.add_argument("--overwrite", action="store_true",
                    help="move an existing run directory aside and start over")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("foe_train").setLevel(logging.INFO)

    def fail(msg: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {msg}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(2)

    if not args.config:
        fail("--config: required; pass a recipe, e.g. --config configs/quickstart/foe.yaml")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        fail(str(exc))
    init_distributed(cfg.training.collective_timeout_s)
    try:
        preflight(cfg, dist.get_world_size())
        # rank 0 checks the run directory and picks the checkpoint; every rank loads that one
        picked: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                target, warnings = prepare_run_dir(cfg, args.resume, args.overwrite)
                for line in warnings:
                    print(line, file=sys.stderr, flush=True)
                picked = [target]
            except ConfigError as exc:
                picked = [exc]
        dist.broadcast_object_list(picked, src=0)
        if isinstance(picked[0], ConfigError):
            raise picked[0]
        run(cfg, picked[0])
    except ConfigError as exc:
        fail(str(exc))
    dist.destroy_process_group()
