"""Parity with the CPU EP: softmax probabilities of the provider under test (CUDA with use_tf32 0,
Cronnx's default, and with use_tf32 1; the CPU EP itself on the CPU) against the CPU EP on the
photos, at batch 1 and at the batch size: max abs difference and top-1 agreement; and the served
/predict answers (top-5 confidences) of each placement against a direct CPU run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cronnx.models.spec import ModelSpec, inspect_model

from .plan import CPU, CUDA, Plan
from .served import TOP_K
from .sessions import infer, make_session, output_buffer, photo_tensors, softmax, tiled


def measure(plan: Plan, photo_paths: list[Path], name: str, served_answers: dict[str, list[dict]]) -> dict:
    """One model's variants against the CPU EP at batch 1, and `served_answers` (placement -> the
    /predict answers of served.ServedPart) against the same reference."""
    path = plan.model_paths[name]
    spec = inspect_model(str(path))
    photos = photo_tensors(photo_paths, spec)
    rows = plan.batch_size
    reference = _probabilities(make_session(path, CPU), spec, photos, 1)  # CPU EP, one photo a run
    variants = ([("CUDA EP, use_tf32 0", CUDA, False), ("CUDA EP, use_tf32 1", CUDA, True)] if plan.cuda
                else [("CPU EP", CPU, False)])
    out = {"photos": len(photos), "against": "CPU EP, batch 1", "variants": []}
    for label, provider, tf32 in variants:
        session = make_session(path, provider, tf32)
        single = _probabilities(session, spec, photos, 1)
        batched = _probabilities(session, spec, tiled(photos, rows), rows)
        expected = tiled(reference, rows)
        out["variants"].append({
            "label": label, "max_abs_diff_batch1": float(np.abs(single - reference).max()),
            f"max_abs_diff_batch{rows}": float(np.abs(batched - expected).max()),
            "max_abs_diff": float(max(np.abs(single - reference).max(), np.abs(batched - expected).max())),
            "top1_agree": int((single.argmax(1) == reference.argmax(1)).sum())})
    by_name = {p.name: i for i, p in enumerate(photo_paths)}
    out["served"] = {}  # placement -> the served answers against the CPU EP
    for placement, answers in served_answers.items():
        diffs, ids_match = [], 0
        for answer in answers:
            probs = reference[by_name[answer["photo"]]]
            expected_ids = [int(i) for i in np.argsort(-probs, kind="stable")[:TOP_K]]
            served_ids = [p["class_id"] for p in answer["predictions"]]
            ids_match += served_ids == expected_ids
            diffs += [abs(p["confidence"] - probs[p["class_id"]]) for p in answer["predictions"]]
        out["served"][placement] = {"answers": len(answers), "top5_ids_match": ids_match,
                                    "max_abs_diff_top5": float(max(diffs)) if diffs else None}
    for v in out["variants"]:
        print(f"  {name} {v['label']} vs CPU EP: max |diff| {v['max_abs_diff']:.3g}", flush=True)
    return out


def _probabilities(session, spec: ModelSpec, photos: np.ndarray, rows: int) -> np.ndarray:
    """Probabilities of every photo, run `rows` at a time."""
    binding = session.io_binding()
    out = []
    for first in range(0, len(photos), rows):
        x = np.ascontiguousarray(photos[first:first + rows])
        y = output_buffer(spec, len(x))
        infer(session, binding, spec, x, y)
        out.append(softmax(y, spec.outputs_probabilities))
    return np.concatenate(out)
