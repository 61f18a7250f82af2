"""`cronnx bench` output: a summary for people, a table for sweeps, a plot on request."""

from __future__ import annotations

from .bench import BenchResult


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def load_label(r: BenchResult) -> str:
    if r.loop == "closed":
        return f"closed loop, {r.concurrency} client{'' if r.concurrency == 1 else 's'}"
    return f"open loop, {r.rate:g} req/s"


def summary(r: BenchResult) -> str:
    lat = r.latency_ms
    lines = [
        f"cronnx bench {r.url} ({r.protocol}): {load_label(r)}, {r.window_s:.1f} s measured, "
        f"{r.procs} client process(es)",
        f"  throughput  {r.requests_per_s:.1f} req/s, {r.images_per_s:.1f} images/s ({r.ok} ok)",
        "  latency ms  " + "  ".join(f"{k.replace('_', '.')} {_f(lat[k])}"
                                    for k in ("p50", "p90", "p95", "p99", "p99_9", "max")),
    ]
    errors = {**r.errors_by_status, **r.errors_by_exception}
    lines.append("  errors      " + (", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"))
    if r.loop == "open":
        lines.append(f"  schedule    {r.late_sends} of {r.sent} sends more than 2 ms late")
    if r.server is not None:
        s = r.server
        sizes = ", ".join(f"<={float(b):g}: {n}" for b, n in s.batch_sizes.items()) or "none"
        lines.append(f"  server      {s.batches} batches, mean size {_f(s.mean_batch_size)}; sizes {sizes}")
        if s.phase_means_s:
            lines.append("  phases ms   " + "  ".join(f"{k} {v * 1000:.2f}" for k, v in s.phase_means_s.items()))
    lines.append("  client CPU  " + ", ".join(f"{c:.0%}" for c in r.client_cpu_per_process) + " of a core")
    lines += [f"  WARNING     {w}" for w in r.warnings]
    return "\n".join(lines)


def sweep_table(results: list[BenchResult]) -> str:
    rows = ["| load | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | mean batch |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        errors = sum(r.errors_by_status.values()) + sum(r.errors_by_exception.values())
        batch = _f(r.server.mean_batch_size) if r.server else "-"
        lat = r.latency_ms
        rows.append(f"| {load_label(r)} | {r.requests_per_s:.1f} | {_f(lat['p50'])} | {_f(lat['p90'])} | "
                    f"{_f(lat['p99'])} | {_f(lat['p99_9'])} | {errors} | {batch} |")
    return "\n".join(rows)


def plot(results: list[BenchResult], path: str) -> None:
    """Latency percentiles against throughput (needs matplotlib: pip install 'cronnx[bench]')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    throughput = [r.requests_per_s for r in results]
    for key, label in [("p50", "p50"), ("p90", "p90"), ("p99", "p99")]:
        axes.plot(throughput, [r.latency_ms[key] for r in results], marker="o", label=label)
    for r in results:
        axes.annotate(load_label(r).split(", ")[1], (r.requests_per_s, r.latency_ms["p99"] or 0),
                      fontsize=7, textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel("throughput (requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    axes.set_title(results[0].url)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
