"""Long-context retrieval generated locally, so it needs no download and works in any
tokenizer: passkey retrieval (a number hidden in repeated filler text) and key-value retrieval
(one key looked up among many random pairs), each at a chosen prompt length in tokens and
needle depth (0: the needle opens the context, 1: it closes it), scored by exact match.

The same generator writes training corpora (``write_corpus``): a prompt followed by its
answer, so a model can be trained on the task and scored by the same code.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from foe_train.config import ConfigError
from foe_train.data.tokenizers import Tokenizer

_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
           "There and back again. ")


@dataclass(frozen=True)
class Sample:
    """One prompt; ``completion`` is the text that follows it in a training document, and
    ``answer`` the word a correct continuation starts with."""

    prompt: str
    completion: str
    answer: str
    length: int
    depth: float


def _fit(tokenizer: Tokenizer, length: int, build: Callable[[int], str], task: str) -> str:
    """The longest build(n) (n filler units) whose encoding fits ``length`` tokens."""

    def size(n: int) -> int:
        return len(tokenizer.encode(build(n)))

    if size(0) > length:
        raise ConfigError(f"--lengths: {length} tokens is too short for a {task} prompt (needs "
                          f"at least {size(0)}); pass longer lengths")
    per_unit = max(1.0, (size(8) - size(0)) / 8)
    n = max(0, int((length - size(0)) / per_unit))
    while n > 0 and size(n) > length:
        n -= 1
    while size(n + 1) <= length:
        n += 1
    return build(n)


def passkey(tokenizer: Tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    """A 5-digit pass key stated at ``depth`` inside filler sentences, asked at the end (the
    format of Mohtashami and Jaggi's passkey test)."""
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"

    def build(n: int) -> str:
        filler = [_FILLER[i % len(_FILLER)] for i in range(n)]
        at = round(depth * n)
        return "".join(filler[:at]) + needle + "".join(filler[at:]) + question

    return Sample(_fit(tokenizer, length, build, "passkey"), f" {key}.", key, length, depth)


def key_value(tokenizer: Tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    """A JSON object of random hex keys and values; the key at ``depth`` of it is asked for.
    The pairs are drawn once at the longest size so shorter fits keep the same prefix."""
    pairs = [(f"{rng.getrandbits(24):06x}", f"{rng.getrandbits(24):06x}")
             for _ in range(length)]

    def build(n: int) -> str:
        chosen = pairs[:n + 1]
        key = chosen[round(depth * n)][0]
        body = ", ".join(f'"{k}": "{v}"' for k, v in chosen)
        return f"JSON data: {{{body}}}\nKey: \"{key}\"\nValue:"

    prompt = _fit(tokenizer, length, build, "kv")
    key = prompt.rsplit('Key: "', 1)[1].split('"', 1)[0]
    value = dict(pairs)[key]
    return Sample(prompt, f' "{value}"', value, length, depth)


GENERATORS: dict[str, Callable[[Tokenizer, int, float, random.Random], Sample]] = {
    "passkey": passkey, "kv": key_value,
}


def samples(task: str, tokenizer: Tokenizer, lengths: list[int], depths: list[float],
            per_cell: int, seed: int = 0) -> list[Sample]:
    """``per_cell`` samples for every (length, depth), the same for the same seed."""
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ConfigError(f"--depths: {depth} is outside [0, 1]")
    rng = random.Random(f"{task}-{seed}")
    return [GENERATORS[task](tokenizer, length, depth, rng)
            for length in lengths for depth in depths for _ in range(per_cell)]


def exact_match(continuation: str, answer: str) -> bool:
    """The continuation's first word, without surrounding punctuation, is the answer."""
    words = continuation.split()
    return bool(words) and words[0].strip(string.punctuation) == answer


def score(items: list[Sample], continuations: list[str]) -> dict[str, object]:
    """Exact match overall, per length, per depth and per (length, depth) cell."""
    hits = [exact_match(c, s.answer) for s, c in zip(items, continuations, strict=True)]

    def mean(keep: Callable[[Sample], bool]) -> float:
        chosen = [h for s, h in zip(items, hits, strict=True) if keep(s)]
        return sum(chosen) / len(chosen)

    lengths = sorted({s.length for s in items})
    depths = sorted({s.depth for s in items})
    return {
        "exact_match": sum(hits) / len(hits),
        "samples": len(hits),
        "by_length": {str(n): mean(lambda s, n=n: s.length == n) for n in lengths},
        "by_depth": {str(d): mean(lambda s, d=d: s.depth == d) for d in depths},
        "cells": [{"length": n, "depth": d,
                   "exact_match": mean(lambda s, n=n, d=d: s.length == n and s.depth == d)}
                  for n in lengths for d in depths],
    }


def write_corpus(task: str, path: Path, tokenizer: Tokenizer, documents: int,
                 min_length: int, max_length: int, seed: int = 0) -> None:
    """``documents`` training documents (prompt + completion) as JSONL with a ``text`` field,
    prompt lengths uniform in [min_length, max_length] tokens, depths uniform in [0, 1]."""
    rng = random.Random(f"corpus-{task}-{seed}")
    make = GENERATORS[task]
    with open(path, "w") as f:
        for _ in range(documents):
            item = make(tokenizer, rng.randint(min_length, max_length), rng.random(), rng)
            f.write(json.dumps({"text": item.prompt + item.completion}) + "\n")
