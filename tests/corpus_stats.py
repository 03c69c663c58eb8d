"""Statistics of a prepared dataset that tests compare a trained model against."""

from __future__ import annotations

import math

import numpy as np


def unigram_entropy(dataset, max_samples: int) -> float:
    """Entropy (nats/token) of the token frequencies over the first max_samples samples: the
    loss of the best context-free predictor, so a model that learned anything beats it."""
    counts: np.ndarray = np.zeros(0, dtype=np.int64)
    for i in range(min(max_samples, len(dataset))):
        item = dataset[i]  # a sample's ids: its inputs and the last label
        c = np.bincount(np.concatenate([item["tokens"].numpy(), item["labels"][-1:].numpy()]))
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) if p.size else math.nan
