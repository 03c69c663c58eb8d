"""Text generation with a KV cache for both model kinds, on the training topologies.

The cache is megatron-core's static-batching machinery: a ``StaticInferenceContext`` passed to
``GPTModel.forward`` makes every SelfAttention store its keys and values in
``context.key_value_memory_dict[layer_number]`` ([max_len, batch, kv_heads, head_dim]) and, once
``sequence_len_offset`` > 0, attend over the cache without a mask. An FoE cluster's attention is
its own SelfAttention with G/C KV heads, so each rank caches only its cluster's KV heads.

Batches: the prompt list (the same on every rank) is split over the token shards like a
training batch (FoE: the D x L pairs (dp, l), MoE: every rank); each shard generates for its own
slice, padded with copies of the last prompt to an equal share. Prompts of different lengths
are handled as megatron's static engine does: the batch prefills the shortest prompt length
and longer prompts feed their remaining tokens through decode steps, so no padding ever enters
attention and every position is exact. Every rank makes the same number of forward calls, with
lengths agreed over the job, because all-to-alls and federated sums are collectives.

Sampling: greedy (temperature 0) or top-p at a temperature, each prompt with its own generator
seeded by (seed, prompt index), so a prompt's text does not depend on its batch-mates. FoE's
clusters each hold V/C of the logits (the split head): greedy picks the best of the shards'
best without gathering the logits, and top-p sampling exchanges a few numbers per shard (its
mass and likeliest candidates; the logits only when the nucleus is wider than those,
``head.sample``). Every rank of the federation draws with the same uniform per prompt from
the same exchanged numbers, so every cluster continues with the same token.

Run ``foe-generate`` (``main``): it starts torchrun itself unless already under it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel

from foe_train import checkpoint
from foe_train.arguments import OneLineParser, at_least, fail
from foe_train.config import (
    ConfigError,
    RecipeConfig,
    apply_overrides,
    build_config,
    load_config,
)
from foe_train.data.tokenizers import build_tokenizer
from foe_train.model import head
from foe_train.model.builder import build_model
from foe_train.runtime import init_distributed
from foe_train.topology import Topology, build_topology, check_layout, consecutive_nodes


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy; otherwise softmax(logits / temperature) cut to its top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must lie in (0, 1]")


def new_context(batch: int, max_len: int) -> StaticInferenceContext:
    """A KV cache for ``batch`` sequences of up to ``max_len`` tokens (allocated lazily by each
    attention layer on the first forward, in the layer's own KV-head count)."""
    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)


def _forward(
    model: GPTModel, context: StaticInferenceContext, tokens: torch.Tensor
) -> torch.Tensor:
    start = context.sequence_len_offset
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
    # megatron refuses inference without gathering; the output layer keeps the vocabulary
    # shards all the same (head.keep_logits_split)
    logits = model(tokens, positions.unsqueeze(0).expand_as(tokens), None,
                   inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(tokens.shape[1])
    return logits[:, -1]


@torch.no_grad()
def prefill(model: GPTModel, context: StaticInferenceContext, tokens: torch.Tensor) -> torch.Tensor:
    """Run the prompts [b, s] through the model (in eval mode), filling the cache from
    position 0; returns the last position's logits [b, V/C] (this rank's vocabulary shard,
    ``model.head``). Timing hook: TTFT is this plus
    choosing the first token."""
    context.reset()
    return _forward(model, context, tokens)


@torch.no_grad()
def decode_step(
    model: GPTModel, context: StaticInferenceContext, tokens: torch.Tensor
) -> torch.Tensor:
    """Append one token per sequence ([b]) at the cache's offset; returns its logits
    [b, V/C].
    Timing hook: TBT is this plus choosing the token."""
    context.enable_decode_mode()
    return _forward(model, context, tokens.unsqueeze(1))


def choose(
    logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator],
    active: torch.Tensor, group: dist.ProcessGroup | None = None, vocab_size: int | None = None,
) -> torch.Tensor:
    """The next token of every sequence ([b]) from this rank's vocabulary shard of the logits,
    identical on all ranks of the ``group`` the vocabulary is split over (None: not split):
    ``head.greedy`` at temperature 0, else ``head.sample``. Only ``active`` rows (those past
    their prompt) draw from their generator; ids at or above ``vocab_size`` (the model's
    padding of the tokenizer's vocabulary) are never chosen."""
    if sampling.temperature == 0:
        return head.greedy(logits, group, vocab_size)
    uniforms = torch.zeros(len(generators), dtype=torch.float64)
    for i in active.nonzero().flatten().tolist():
        uniforms[i] = torch.rand((), generator=generators[i], dtype=torch.float64)
    return head.sample(logits, group, uniforms, sampling.temperature, sampling.top_p, vocab_size)


def shard_prompts(prompts: list[list[int]], topo: Topology) -> list[int]:
    """Indices of the prompts this rank's token shard generates for, in an equal share: the
    list is padded with the last prompt's index to a multiple of the shard count."""
    shards = topo.token_shards
    per = -(-len(prompts) // shards)
    padded = list(range(len(prompts))) + [len(prompts) - 1] * (per * shards - len(prompts))
    return padded[topo.token_shard * per:(topo.token_shard + 1) * per]


def _agreed_lengths(lengths: list[int], device: torch.device) -> tuple[int, int]:
    """(shortest, longest) prompt length over the whole job."""
    both = torch.tensor([-min(lengths), max(lengths)], device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return int(-both[0]), int(both[1])


@torch.no_grad()
def generate(
    model: GPTModel, topo: Topology, prompts: list[list[int]], max_new_tokens: int,
    sampling: Sampling = Sampling(), vocab_size: int | None = None,
) -> list[list[int]]:
    """``max_new_tokens`` new ids for every prompt (the list must be the same on every rank);
    the whole result is returned on every rank."""
    if not prompts or any(not p for p in prompts):
        raise ConfigError("--prompt: every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    mine = shard_prompts(prompts, topo)
    lengths = torch.tensor([len(prompts[i]) for i in mine], device=device)
    shortest, longest = _agreed_lengths(lengths.tolist(), device)
    total = longest + max_new_tokens
    seq = torch.zeros(len(mine), total, dtype=torch.long, device=device)
    for row, i in enumerate(mine):
        seq[row, :len(prompts[i])] = torch.tensor(prompts[i], device=device)
    generators = [torch.Generator().manual_seed(sampling.seed * 1_000_003 + i) for i in mine]
    context = new_context(len(mine), total)
    logits = prefill(model, context, seq[:, :shortest])
    for pos in range(shortest, total):
        active = pos >= lengths
        seq[:, pos] = torch.where(
            active,
            choose(logits, sampling, generators, active.cpu(), topo.vocab_group, vocab_size),
            seq[:, pos],
        )
        if pos + 1 < total:
            logits = decode_step(model, context, seq[:, pos])
    mine_out = {i: seq[row, len(prompts[i]):len(prompts[i]) + max_new_tokens].tolist()
                for row, i in enumerate(mine)}
    everyone: list[dict[int, list[int]]] = [{}] * topo.world_size
    dist.all_gather_object(everyone, mine_out)
    merged = {i: ids for part in everyone for i, ids in part.items()}
    return [merged[i] for i in range(len(prompts))]


def inference_config(
    checkpoint_dir: str | None, recipe: str | None, overrides: list[str]
) -> tuple[RecipeConfig, Path | None]:
    """The recipe to generate with: a checkpoint's own (with parallel.* and other non-model
    overrides) or a recipe file's (randomly initialised weights)."""
    if checkpoint_dir is None:
        if recipe is None:
            raise ConfigError("pass --checkpoint DIR, or --config RECIPE for random weights")
        return load_config(recipe, overrides), None
    if recipe is not None:
        raise ConfigError("--config: the checkpoint brings its own recipe; drop --config")
    path = checkpoint.newest(checkpoint_dir)
    for item in overrides:
        if item.startswith("model."):
            raise ConfigError(f"override '{item}': the model section comes from the checkpoint;"
                              f" drop the override")
    saved = dist_checkpointing.load_common_state_dict(str(path))
    cfg = build_config(apply_overrides(saved["config"], overrides))
    clusters = saved["layout"]["clusters"]
    if cfg.model.kind == "foe" and cfg.parallel.clusters != clusters:
        raise ConfigError(f"parallel.clusters: checkpoint {path} has {clusters} clusters, not "
                          f"{cfg.parallel.clusters}; keep the checkpoint's clusters")
    return cfg, path


def inference_dtype(cfg: RecipeConfig) -> torch.dtype:
    """The training run's precision: training.bf16, by default bf16 exactly when on CUDA."""
    bf16 = cfg.training.bf16 if cfg.training.bf16 is not None else torch.cuda.is_available()
    return torch.bfloat16 if bf16 else torch.float32


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog="foe-generate",
        description="generate text from a foe-train checkpoint (or a recipe's random weights)",
    )
    ap.add_argument("--checkpoint", help="iter_N directory, or a run directory (newest)")
    ap.add_argument("--config", help="recipe YAML: random weights instead of a checkpoint")
    ap.add_argument("--prompt", action="append", required=True, help="repeatable")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=32)
    ap.add_argument("--top-p", type=float, help="sample from the top-p nucleus (default greedy)")
    ap.add_argument("--temperature", type=float,
                    help="sampling temperature (default 1 with --top-p, else 0 = greedy)")
    ap.add_argument("--seed", type=int, help="sampling seed (default: the recipe's seed)")
    ap.add_argument("--nproc", type=at_least(1),
                    help="processes to start (default: the checkpoint's or recipe's world size)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    return ap


def _sampling(args: argparse.Namespace, cfg: RecipeConfig) -> Sampling:
    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if args.top_p is not None else 0.0
    seed = cfg.seed if args.seed is None else args.seed
    return Sampling(temperature, 1.0 if args.top_p is None else args.top_p, seed)


def as_flags(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The options given, again as --flag=value, so that torchrun's own parser, which scans
    them too, never takes one for an abbreviation of its options (--nproc would be
    ambiguous); the world size is torchrun's."""
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names
            if getattr(args, name) is not None]


def start_workers(module: str, argv: list[str], nproc: int, banner: str) -> NoReturn:
    """Start ``nproc`` torchrun workers of an inference command's module on this machine."""
    from launch.torchrun import run_local

    print(banner, file=sys.stderr, flush=True)
    sys.exit(run_local(module, argv, nproc))


def _worker_argv(args: argparse.Namespace) -> list[str]:
    flags = ("checkpoint", "config", "max_new_tokens", "top_p", "temperature", "seed")
    return [f"--prompt={p}" for p in args.prompt] + as_flags(args, flags) + args.overrides


def _worker(args: argparse.Namespace, cfg: RecipeConfig, path: Path | None) -> None:
    """One rank: build the topology and model, load weights, generate, print on rank 0."""
    init_distributed(cfg.training.collective_timeout_s)
    try:
        topo = build_topology(cfg.model, cfg.parallel)
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"data.tokenizer: {tokenizer.vocab_size} ids exceed "
                              f"model.vocab_size={cfg.model.vocab_size}")
        model = build_model(cfg.model, topo, seed=cfg.seed, dtype=inference_dtype(cfg))
        if path is not None:
            checkpoint.load_weights(model, cfg.model, topo, path)
        prompts = tokenizer.encode_batch(args.prompt)
        out = generate(model, topo, prompts, args.max_new_tokens, _sampling(args, cfg),
                       tokenizer.vocab_size)
    except ConfigError as exc:
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(2) from None
    if topo.rank == 0:
        for i, (prompt, ids) in enumerate(zip(prompts, out, strict=True)):
            if tokenizer.eod in ids:
                ids = ids[:ids.index(tokenizer.eod)]
            print(f"[{i}] {tokenizer.decode(prompt + ids)}", flush=True)
    dist.destroy_process_group()


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (else a command that starts them)."""
    return "LOCAL_RANK" in os.environ


def world_size(cfg: RecipeConfig, nproc: int | None) -> int:
    """The processes an inference command runs on: torchrun's world in a worker, else
    ``--nproc`` or the recipe's layout; the layout is checked (on one node) either way."""
    n = int(os.environ["WORLD_SIZE"]) if under_torchrun() else nproc or cfg.parallel.world_size
    check_layout(cfg.model, cfg.parallel, n, consecutive_nodes(n, 1))
    return n


def main(argv: list[str] | None = None) -> None:
    """foe-generate --checkpoint DIR | --config RECIPE --prompt TEXT [--prompt TEXT ...]
    [--max-new-tokens N] [--top-p P] [--temperature T] [--seed S] [--nproc N] [key=value ...]

    Rank 0 prints ``[i] prompt+continuation`` for every prompt, the continuation cut at the
    first end-of-text. Bad input ends in one line on stderr and exit 2 before any process
    starts. Under torchrun (LOCAL_RANK set) this process is a worker and the world size is
    torchrun's; otherwise it starts torchrun on this machine."""
    args = _parser().parse_args(argv)
    try:
        cfg, path = inference_config(args.checkpoint, args.config, args.overrides)
        _sampling(args, cfg)
        if any(not p for p in args.prompt):
            raise ConfigError("--prompt: empty prompt; give at least one character")
        nproc = world_size(cfg, args.nproc)
    except ConfigError as exc:
        fail(str(exc))
    if under_torchrun():
        if os.environ.get("RANK") == "0":
            weights = f"checkpoint {path}" if path else f"random weights ({args.config})"
            print(f"foe-generate: {weights}, {nproc} processes, {len(args.prompt)} prompt(s)",
                  file=sys.stderr, flush=True)
        _worker(args, cfg, path)
        return
    start_workers("foe_train.infer.generate", _worker_argv(args), nproc,
                  f"foe-generate: starting {nproc} processes")


if __name__ == "__main__":
    main()
