"""The GPU serving targets, met or not, computed from the run's own rows: served throughput
against what onnxruntime alone and the decoding allow, 1-client latency, GPU time per batch."""

from __future__ import annotations


def gpu_targets(parts: dict) -> list[dict]:
    """The targets, per model, from this run's parts (all three need the onnxruntime, preprocess
    and served parts; a target whose figures are missing is left out):

    - throughput: the best placement's img/s at the most clients, at least 0.85 of the bound,
      min(onnxruntime alone at its best bucket with host input, as the worker binds it; the
      preprocessing limit, the better of threads and processes on all cores);
    - latency: each placement's p50 at 1 client at most preprocessing (ms per image per worker,
      all cores busy) + onnxruntime alone at batch 1 + 1 ms;
    - GPU time per batch: the served runs' inference ms per batch at the most clients at most 1.2x
      onnxruntime alone at the bucket that holds their mean batch.
    Each entry: model, target, placement, measured, limit, met."""
    ort_part, pre, served = parts.get("onnxruntime", {}), parts.get("preprocess", {}), parts.get("served", {})
    limits = [pre[how]["img_per_s"] for how in ("threads", "processes") if how in pre]
    out = []
    for name, m in served.get("models", {}).items():
        buckets = {row["batch"]: row["host"] for row in ort_part.get("models", {}).get(name, {}).get("buckets", [])
                   if "host" in row and not row["host"].get("error")}
        runs = [(placement, run) for placement, p in m.get("placements", {}).items() for run in p.get("runs", [])]
        if not buckets or not limits or not runs:
            continue
        most = max(run["clients"] for _, run in runs)
        bound = min(max(row["img_per_s"] for row in buckets.values()), max(limits))
        placement, best = max(((p, r) for p, r in runs if r["clients"] == most), key=lambda pr: pr[1]["img_per_s"])
        out.append({"model": name, "target": f"img/s at {most} clients >= 0.85 x {bound:.0f}", "placement": placement,
                    "measured": best["img_per_s"], "limit": 0.85 * bound, "met": best["img_per_s"] >= 0.85 * bound})
        if 1 in buckets:
            budget = pre["threads" if "threads" in pre else "processes"]["ms_per_image_per_worker"] \
                + buckets[1]["ms_per_batch"] + 1.0
            for placement, run in runs:
                if run["clients"] == 1:
                    out.append({"model": name, "target": "p50 ms at 1 client <= preprocessing + batch 1 + 1 ms",
                                "placement": placement, "measured": run["p50_ms"], "limit": budget,
                                "met": run["p50_ms"] <= budget})
        for placement, run in runs:
            mean = run.get("mean_batch") or 0
            bucket = min((b for b in buckets if b >= mean), default=None)
            inference = (run.get("phases_ms") or {}).get("inference")
            if run["clients"] == most and bucket is not None and inference is not None:
                alone = buckets[bucket]["ms_per_batch"]
                out.append({"model": name, "target": f"inference ms per batch <= 1.2 x alone at bucket {bucket}",
                            "placement": placement, "measured": inference, "limit": 1.2 * alone,
                            "met": inference <= 1.2 * alone})
    return out
