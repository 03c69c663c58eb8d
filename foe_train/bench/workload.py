"""LongBench-shaped prompt lengths, so latency numbers (measured or projected) describe the
long-context workload the FoE paper reports on rather than one arbitrary prompt length.

Without the data set: lengths drawn from LongBench's published per-task average lengths
(LONGBENCH_AVG_LEN): a task uniformly, then a length lognormal around the task's average
(sigma SIGMA; LongBench publishes averages only, the spread is an assumption), scaled so that
the longest task average maps to the model's maximum length and clipped to [1, max_len].
Scaling rather than truncating keeps LongBench's relative spread (short code completion next to
long narrative QA) at any model size, instead of piling most prompts at the limit.

With the data set: the real LongBench files (data.zip of the LongBench repository: one
<task>.jsonl per task, each record with "context" and "input"), read with `datasets` from a
local directory (HF_DATASETS_OFFLINE=1: nothing is fetched), a task uniformly, then a record,
context + input tokenised with the given tokenizer and truncated to max_len, as LongBench
itself truncates prompts longer than the model's window.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from pathlib import Path

from foe_train.data.tokenizers import ByteTokenizer, Tokenizer

# Average length per task: words for English and code, characters for Chinese. Source: Bai et
# al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding" (ACL 2024,
# arXiv 2308.14508), task statistics table (also task.md of the THUDM/LongBench repository).
LONGBENCH_AVG_LEN: dict[str, int] = {
    "narrativeqa": 18409, "qasper": 3619, "multifieldqa_en": 4559, "multifieldqa_zh": 6701,
    "hotpotqa": 9151, "2wikimqa": 4887, "musique": 11214, "dureader": 15768,
    "gov_report": 8734, "qmsum": 10614, "multi_news": 2113, "vcsum": 15380,
    "trec": 5177, "triviaqa": 8209, "samsum": 6258, "lsht": 22337,
    "passage_count": 11141, "passage_retrieval_en": 9289, "passage_retrieval_zh": 6745,
    "lcc": 1235, "repobench-p": 4206,
}
SIGMA = 0.5


def sample_requests(n: int, max_len: int, seed: int) -> list[tuple[str, int]]:
    """(task, prompt length) of n synthetic LongBench-shaped requests (module docstring)."""
    if n < 1 or max_len < 1:
        raise ValueError(f"need n >= 1 and max_len >= 1 (got n={n}, max_len={max_len})")
    rng = random.Random(seed)
    scale = max_len / max(LONGBENCH_AVG_LEN.values())
    tasks = sorted(LONGBENCH_AVG_LEN)
    out = []
    for _ in range(n):
        task = rng.choice(tasks)
        # mean-preserving lognormal: E[exp(sigma*z - sigma^2/2)] = 1
        units = LONGBENCH_AVG_LEN[task] * math.exp(SIGMA * rng.gauss(0, 1) - SIGMA**2 / 2)
        out.append((task, min(max_len, max(1, round(units * scale)))))
    return out


def _real_lengths(n: int, max_len: int, seed: int, source: str,
                  tokenizer: Tokenizer) -> list[int]:
    files = sorted(Path(source).glob("*.jsonl"))
    if not files:
        raise ValueError(f"LongBench source {source}: no *.jsonl files (unpack LongBench's "
                         f"data.zip there)")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as cache:
        tasks = {f.stem: load_dataset("json", data_files=str(f), split="train", cache_dir=cache)
                 for f in files}
        names = sorted(tasks)
        texts = []
        for _ in range(n):
            records = tasks[rng.choice(names)]
            record = records[rng.randrange(len(records))]
            texts.append((record.get("context") or "") + (record.get("input") or ""))
    return [min(max_len, max(1, len(ids))) for ids in tokenizer.encode_batch(texts)]


def prompt_lengths(n: int, max_len: int, seed: int, source: str | None = None,
                   tokenizer: Tokenizer | None = None) -> list[int]:
    """n prompt lengths in (0, max_len], deterministic in seed: synthetic from LongBench's
    published statistics, or (source: a directory of LongBench *.jsonl) real prompts counted
    in the tokenizer's tokens (default: bytes)."""
    if source is None:
        return [length for _, length in sample_requests(n, max_len, seed)]
    return _real_lengths(n, max_len, seed, source, tokenizer or ByteTokenizer())
