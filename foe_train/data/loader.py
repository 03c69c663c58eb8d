"""Train/valid/test datasets from megatron's GPTDataset (blends, splits, shuffling and the
index cache are megatron's), and the deterministic token-sharded batches the trainer reads:
the batch of step s is a pure function of (dataset, s), so a checkpoint only stores the step."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from foe_train.config import ConfigError, DataConfig, ModelConfig, TrainingConfig
from foe_train.data.prepare import default_corpus
from foe_train.data.tokenizers import Tokenizer

_SPLIT = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")


def _check_prefixes(data: DataConfig) -> list[str]:
    prefixes = [os.path.expanduser(p) for p in data.prefixes]
    for p in prefixes:
        missing = [p + ext for ext in (".idx", ".bin") if not os.path.isfile(p + ext)]
        if missing:
            raise ConfigError(f"data.prefixes: {p} has no {' or '.join(missing)}; run "
                              f"foe-prepare-data --output-prefix {p} first or fix the path")
    if data.weights is not None:
        if len(data.weights) != len(prefixes):
            raise ConfigError(f"data.weights: {len(data.weights)} weights for "
                              f"{len(prefixes)} data.prefixes; give one weight per prefix")
        if any(w <= 0 for w in data.weights):
            raise ConfigError(f"data.weights: all must be positive (got {data.weights})")
    return prefixes


def _split_matrix(split: str) -> list[tuple[float, float] | None]:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )

    parts = [float(x) for x in split.split(",")] if _SPLIT.match(split) else []
    if not parts or parts[0] <= 0:
        raise ConfigError(f"data.split: {split!r} must be 1-3 comma-separated non-negative "
                          f"train,valid,test shares with train > 0, e.g. 98,2,0")
    parts += [0.0] * (3 - len(parts))
    return convert_split_vector_to_split_matrix([x / sum(parts) for x in parts])


def _check_split_documents(prefixes: list[str], split: str, sizes: list[int]) -> None:
    """megatron loops forever on a split with no tokens: refuse such a split up front."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = _split_matrix(split)
    for prefix in prefixes:
        n = IndexedDataset(prefix).sequence_lengths.shape[0]
        for name, bounds, size in zip(("train", "valid", "test"), matrix, sizes, strict=True):
            if bounds is not None and size > 0 and round(bounds[1] * n) <= round(bounds[0] * n):
                raise ConfigError(f"data.split: {split!r} leaves the {name} split of {prefix} "
                                  f"({n} documents) empty; change the shares or add documents")


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """megatron's BlendedDataset asks for the rank when it writes its index cache; a single
    process without torch.distributed gets a private world-1 gloo group for the build."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_data(data: DataConfig, model: ModelConfig, tokenizer: Tokenizer) -> list[str]:
    """The configured prefixes, after checking they exist and the vocabulary fits (cheap:
    run before launching anything)."""
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is below the {tokenizer.name} "
                          f"tokenizer's {tokenizer.vocab_size} tokens; set model.vocab_size >= "
                          f"{tokenizer.vocab_size}")
    return _check_prefixes(data)


def dataset_sizes(training: TrainingConfig) -> list[int]:
    """Samples for train, valid (every eval plus the final one) and test (one eval's worth)."""
    G = training.global_batch_size
    evals = training.train_iters // training.eval_interval + 1 if training.eval_interval > 0 else 1
    return [training.train_iters * G, evals * training.eval_iters * G, training.eval_iters * G]


def build_datasets(data: DataConfig, model: ModelConfig, training: TrainingConfig,
                   tokenizer: Tokenizer, seed: int) -> tuple:
    """(train, valid, test) megatron datasets of model.seq_length+1 tokens per sample; valid or
    test is None when data.split gives it no share. Empty data.prefixes: the default corpus.
    Must be called on every rank when torch.distributed is initialized (megatron builds on
    rank 0 first, then the others read its index cache: data.cache_dir must be shared)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cache_dir = os.path.expanduser(data.cache_dir)
    prefixes = check_data(data, model, tokenizer) or [default_corpus(cache_dir, tokenizer)]
    weights = data.weights if len(prefixes) > 1 else None
    sizes = dataset_sizes(training)
    _check_split_documents(prefixes, data.split, sizes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=model.seq_length,
        blend=(prefixes, weights),
        split=data.split,
        path_to_cache=os.path.join(cache_dir, "indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    with _process_group() if len(prefixes) > 1 else contextlib.nullcontext(), \
            warnings.catch_warnings():
        # pad == eod: megatron warns, then stops masking pad ids, which is what we want (we
        # never pad, and eod must stay a trained token).
        warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
        train, valid, test = builder.build()
    return train, valid, test


def _sample(dataset, index: int) -> torch.Tensor:
    """seq_length+1 token ids: inputs are x[:-1], labels x[1:]."""
    item = dataset[index]
    return torch.cat([item["tokens"], item["labels"][-1:]])


class ShardedBatches:
    """The micro-batches of one token shard: step s uses samples [s*G, (s+1)*G) (mod the
    dataset length, offset by consumed_samples); shard i takes the i-th contiguous 1/S of
    them, cut into micro-batches. Only the step needs checkpointing."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int,
                 token_shards: int, token_shard: int, consumed_samples: int = 0):
        per_step = token_shards * micro_batch_size
        if global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size={global_batch_size} is not divisible by "
                f"{token_shards} token shards x training.micro_batch_size={micro_batch_size}; "
                f"use a multiple of {per_step}")
        if not 0 <= token_shard < token_shards:
            raise ValueError(f"token_shard {token_shard} outside 0..{token_shards - 1}")
        if len(dataset) == 0:
            raise ConfigError("data: the training dataset has no samples; add data or lower "
                              "model.seq_length")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.shard_size = global_batch_size // token_shards
        self.token_shard = token_shard
        self.consumed_samples = consumed_samples

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each shard."""
        return self.shard_size // self.micro_batch_size

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """LongTensors [micro_batch_size, seq_length+1] of this shard for optimizer step."""
        start = self.consumed_samples + step * self.global_batch_size
        start += self.token_shard * self.shard_size
        n = len(self.dataset)
        rows = [_sample(self.dataset, (start + j) % n) for j in range(self.shard_size)]
        m = self.micro_batch_size
        return [torch.stack(rows[i: i + m]) for i in range(0, self.shard_size, m)]
