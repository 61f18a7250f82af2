"""Model outputs -> the predictions a client reads."""

from __future__ import annotations

import numpy as np

from cronnx.errors import NonFiniteOutput


def check_finite(scores: np.ndarray) -> None:
    """Raises NonFiniteOutput when any of `scores` (any shape) is NaN or infinite: a softmax of
    them is undefined, and JSON has no such numbers (they would leave as null in a 200)."""
    finite = np.isfinite(scores)
    if not finite.all():
        nan = int(np.isnan(scores).sum())
        infinite = scores.size - int(finite.sum()) - nan
        raise NonFiniteOutput(f"the model's output holds non-finite scores ({nan} NaN, {infinite} infinite of "
                              f"{scores.size}); the model overflowed on this input (float16 models often do)")


def top_k(output: np.ndarray, k: int, probabilities: bool = False) -> list[tuple[int, float]]:
    """The k most likely classes, highest first, with their probability: the softmax of
    logits, or the output itself when the model already gives probabilities. `output` holds one
    request's scores (any shape; read flat). Raises NonFiniteOutput when a score is NaN or
    infinite (`check_finite`)."""
    scores = output.reshape(-1)
    check_finite(scores)
    k = min(k, scores.size)
    # Softmax keeps the order of the scores: pick the top k first, normalise only those.
    best = np.argpartition(scores, scores.size - k)[-k:]
    best = best[np.argsort(-scores[best], kind="stable")]
    if probabilities:
        return [(int(i), float(scores[i])) for i in best]
    peak = float(scores[best[0]])
    total = float(np.exp(scores.astype(np.float64) - peak).sum())
    return [(int(i), float(np.exp(float(scores[i]) - peak) / total)) for i in best]
