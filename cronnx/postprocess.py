"""Model outputs -> the predictions a client reads."""

from __future__ import annotations

import numpy as np


def top_k(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Softmax probabilities of the k most likely classes, highest first."""
    scores = logits.reshape(-1).astype(np.float64)
    exp = np.exp(scores - scores.max())
    probs = exp / exp.sum()
    k = min(k, probs.size)
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best], kind="stable")]
    return [(int(i), float(probs[i])) for i in best]
