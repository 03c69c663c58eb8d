"""foe-eval: score a foe-train checkpoint at any topology it loads at, so FoE and its MoE
baseline are compared on the same tasks by the same code.

Tasks (``--tasks``, comma-separated):
- ``val``: validation loss and perplexity on the recipe's held-out split, over the same
  ``training.eval_iters`` batches the training run's validation used (so the number equals the
  run's last ``val_loss`` for its final checkpoint).
- ``passkey``, ``kv``: long-context retrieval generated locally (``foe_train.evaluate.tasks``)
  at every ``--lengths`` x ``--depths`` cell, ``--samples`` prompts each, greedy, exact match.
- ``longbench:NAME``: a LongBench task from ``--longbench-dir``, with LongBench's prompt,
  generation length, middle truncation and metric (``foe_train.evaluate.longbench``).

Results go to ``<run_dir>/eval.json`` (or ``--out``), merged with the results an earlier
evaluation of the same checkpoint wrote there; rank 0 prints one line per task (``--json``:
the whole file). Like foe-generate, it starts torchrun itself unless already under it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from foe_train import checkpoint
from foe_train.arguments import OneLineParser, at_least
from foe_train.config import ConfigError, RecipeConfig
from foe_train.data.tokenizers import Tokenizer, build_tokenizer
from foe_train.evaluate import longbench, tasks
from foe_train.infer.generate import (
    as_flags,
    generate,
    inference_config,
    inference_dtype,
    start_workers,
    under_torchrun,
    world_size,
)
from foe_train.model.builder import build_model
from foe_train.runtime import init_distributed
from foe_train.topology import Topology, build_topology

RETRIEVAL = tuple(tasks.GENERATORS)


def parse_tasks(spec: str) -> list[str]:
    """The task names of ``--tasks``, each checked."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name.startswith("longbench:"):
            if name.split(":", 1)[1] not in longbench.TASKS:
                raise ConfigError(f"--tasks: unknown LongBench task in {name!r}; use one of "
                                  f"{', '.join(sorted(longbench.TASKS))}")
        elif name not in ("val", *RETRIEVAL):
            raise ConfigError(f"--tasks: unknown task {name!r}; use val, "
                              f"{', '.join(RETRIEVAL)} or longbench:NAME")
    if not names:
        raise ConfigError("--tasks: empty; give e.g. --tasks val,passkey")
    return names


def _numbers(spec: str | None, kind: type, flag: str) -> list | None:
    if spec is None:
        return None
    try:
        return [kind(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: {spec!r} is not a comma-separated list of numbers, e.g. "
                          f"{flag} 64,128") from None


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="foe-eval", description="evaluate a foe-train checkpoint")
    ap.add_argument("--checkpoint", required=True,
                    help="iter_N directory, or a run directory (its newest checkpoint)")
    ap.add_argument("--tasks", default="val",
                    help="comma-separated: val, passkey, kv, longbench:NAME (default val)")
    ap.add_argument("--lengths", help="prompt lengths in tokens for passkey/kv, comma-separated "
                                      "(default: seq_length/2 and seq_length-16)")
    ap.add_argument("--depths", help="needle depths in [0, 1], comma-separated (default "
                                     "0,0.5,1)")
    ap.add_argument("--samples", type=at_least(1), default=4,
                    help="prompts per length x depth cell")
    ap.add_argument("--longbench-dir", help="LongBench's data directory (NAME.jsonl files)")
    ap.add_argument("--limit", type=at_least(1), help="first N records of each LongBench task")
    ap.add_argument("--batch", type=at_least(1), default=16, help="prompts per generation batch")
    ap.add_argument("--out", help="results file (default <run_dir>/eval.json)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--nproc", type=at_least(1),
                    help="processes to start (default: the checkpoint's world size)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (parallel.*, ...)")
    return ap


def _retrieval_grid(args: argparse.Namespace, cfg: RecipeConfig) -> tuple[list[int], list[float]]:
    seq = cfg.model.seq_length
    lengths = _numbers(args.lengths, int, "--lengths") or [seq // 2, seq - 16]
    depths = _numbers(args.depths, float, "--depths") or [0.0, 0.5, 1.0]
    return lengths, depths


def run_dir_of(checkpoint_dir: Path) -> Path:
    """The run directory an iter_N checkpoint belongs to (RUN/checkpoints/iter_N)."""
    parent = checkpoint_dir.parent
    return parent.parent if parent.name == "checkpoints" else parent


def validation(model: torch.nn.Module, cfg: RecipeConfig, topo: Topology,
               tokenizer: Tokenizer) -> dict[str, float]:
    """Mean loss over the training run's validation batches (same samples, same order)."""
    from foe_train.data.loader import ShardedBatches, build_datasets
    from foe_train.train.evaluation import mean_loss

    _, valid, _ = build_datasets(cfg.data, cfg.model, cfg.training, tokenizer, cfg.seed)
    if valid is None or not len(valid):
        raise ConfigError(f"data.split: {cfg.data.split!r} gives no validation share; the val "
                          f"task needs one (e.g. data.split=98,2,0)")
    t = cfg.training
    batches = ShardedBatches(valid, t.global_batch_size, t.micro_batch_size, topo.token_shards,
                             topo.token_shard)
    model.eval()
    loss = mean_loss(model, batches, t.eval_iters,
                     lambda r: tqdm(r, desc="val", disable=topo.rank != 0, file=sys.stderr))
    return {"loss": loss, "perplexity": math.exp(loss),
            "tokens": t.eval_iters * t.global_batch_size * cfg.model.seq_length}


def _continuations(model: torch.nn.Module, topo: Topology, tokenizer: Tokenizer,
                   prompts: list[list[int]], max_new: int, batch: int, desc: str) -> list[str]:
    """Greedy continuations of every prompt, ``batch`` prompts per generate call, each cut at
    the first end-of-text."""
    out: list[str] = []
    starts = range(0, len(prompts), batch)
    for start in tqdm(starts, desc=desc, disable=topo.rank != 0, file=sys.stderr):
        for ids in generate(model, topo, prompts[start:start + batch], max_new,
                            vocab_size=tokenizer.vocab_size):
            out.append(tokenizer.decode(ids[:ids.index(tokenizer.eod)]
                                        if tokenizer.eod in ids else ids))
    return out


def retrieval(task: str, model: torch.nn.Module, topo: Topology, tokenizer: Tokenizer,
              args: argparse.Namespace, cfg: RecipeConfig) -> dict[str, Any]:
    """Exact match of greedy answers to generated passkey or key-value prompts."""
    lengths, depths = _retrieval_grid(args, cfg)
    items = tasks.samples(task, tokenizer, lengths, depths, args.samples, seed=cfg.seed)
    max_new = max(len(tokenizer.encode(s.completion)) for s in items) + 1
    texts = _continuations(model, topo, tokenizer, [tokenizer.encode(s.prompt) for s in items],
                           max_new, args.batch, task)
    return tasks.score(items, texts)


def longbench_task(name: str, model: torch.nn.Module, topo: Topology, tokenizer: Tokenizer,
                   args: argparse.Namespace, cfg: RecipeConfig) -> dict[str, Any]:
    """LongBench's score of one task, prompts middle-truncated to fit model.seq_length."""
    records = longbench.load(longbench.data_file(args.longbench_dir, name), args.limit)
    max_new = min(longbench.max_new_tokens(name), cfg.model.seq_length // 2)
    budget = cfg.model.seq_length - max_new
    prompts = [longbench.truncate_middle(tokenizer.encode(longbench.prompt(name, r)), budget)
               for r in records]
    texts = _continuations(model, topo, tokenizer, prompts, max_new, args.batch, name)
    return {"metric": longbench.metric_name(name), "score": longbench.score(name, texts, records),
            "samples": len(records), "max_new_tokens": max_new}


def _summary_line(task: str, result: dict[str, Any]) -> str:
    if task == "val":
        return f"val: loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}"
    if task in RETRIEVAL:
        cells = ", ".join(f"{n}: {v:.2f}" for n, v in result["by_length"].items())
        return (f"{task}: exact match {result['exact_match']:.3f} of {result['samples']} "
                f"(by length {cells})")
    return f"{task}: {result['metric']} {result['score']:.2f} over {result['samples']} records"


def _worker(args: argparse.Namespace, cfg: RecipeConfig, path: Path) -> None:
    """One rank: build the topology and model, load the weights, run every task; rank 0
    writes the results."""
    init_distributed(cfg.training.collective_timeout_s)
    try:
        topo = build_topology(cfg.model, cfg.parallel)
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
        model = build_model(cfg.model, topo, seed=cfg.seed, dtype=inference_dtype(cfg))
        checkpoint.load_weights(model, cfg.model, topo, path)
        results: dict[str, Any] = {}
        for task in parse_tasks(args.tasks):
            if task == "val":
                results[task] = validation(model, cfg, topo, tokenizer)
            elif task in RETRIEVAL:
                results[task] = retrieval(task, model, topo, tokenizer, args, cfg)
            else:
                results[task] = longbench_task(task.split(":", 1)[1], model, topo, tokenizer,
                                               args, cfg)
            if topo.rank == 0 and not args.json:
                print(f"foe-eval: {_summary_line(task, results[task])}", flush=True)
    except ConfigError as exc:
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(2) from None
    if topo.rank == 0:
        out = Path(args.out) if args.out else run_dir_of(path) / "eval.json"
        report = _merged(out, path, results, cfg, topo.world_size)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1) if args.json else f"foe-eval: results {out}",
              flush=True)
    dist.destroy_process_group()


def _merged(out: Path, path: Path, results: dict[str, Any], cfg: RecipeConfig,
            world_size: int) -> dict[str, Any]:
    """This evaluation's results over those an earlier one wrote for the same checkpoint."""
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    kept = earlier.get("results", {}) if earlier.get("checkpoint") == str(path) else {}
    return {"checkpoint": str(path), "step": int(path.name.rsplit("_", 1)[-1]),
            "kind": cfg.model.kind, "residual_sync": cfg.model.residual_sync,
            "world_size": world_size, "results": {**kept, **results}}


def _worker_argv(args: argparse.Namespace) -> list[str]:
    flags = ("checkpoint", "tasks", "lengths", "depths", "samples", "longbench_dir", "limit",
             "batch", "out")
    return as_flags(args, flags) + (["--json"] if args.json else []) + args.overrides


def check(args: argparse.Namespace, cfg: RecipeConfig) -> None:
    """Every input problem foe-eval can see before starting processes, as a ConfigError."""
    names = parse_tasks(args.tasks)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    lengths, depths = _retrieval_grid(args, cfg)
    for task in names:
        if task in RETRIEVAL:
            tasks.samples(task, tokenizer, lengths, depths, 1)
        elif task.startswith("longbench:"):
            longbench.data_file(args.longbench_dir, task.split(":", 1)[1])


def main(argv: list[str] | None = None) -> None:
    """foe-eval --checkpoint DIR [--tasks LIST] [--json] [--nproc N] [key=value ...]

    Bad input ends in one line on stderr and exit 2 before any process starts."""
    args = _parser().parse_args(argv)
    try:
        cfg, path = inference_config(args.checkpoint, None, args.overrides)
        check(args, cfg)
        nproc = world_size(cfg, args.nproc)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if under_torchrun():
        _worker(args, cfg, path)
        return
    start_workers("foe_train.evaluate.run", _worker_argv(args), nproc,
                  f"foe-eval: {path}, {nproc} processes, tasks {args.tasks}")


if __name__ == "__main__":
    main()
