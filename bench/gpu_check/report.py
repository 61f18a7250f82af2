"""The markdown tables of a run, drawn from its JSON (the result dict) alone: onnxruntime alone, CUDA
graphs, host memory, the preprocessing limit, served, parity and the GPU targets, then the time
per part. A part that is missing or failed draws its error instead of its rows."""

from __future__ import annotations

from .plan import CUDA, NA_CPU
from .targets import gpu_targets

def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _g(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _error_line(part: dict) -> list[str]:
    return [f"**error**: {part['error']}", ""] if part.get("error") else []


def _targets_table(meta: dict, parts: dict) -> list[str]:
    targets = gpu_targets(parts)
    if not targets:
        return []
    on_cpu = "" if meta["provider"] == CUDA else " (set for a GPU: on the CPU EP they only show the arithmetic)"
    lines = ["", f"The GPU targets, from this run (`gpu_targets`){on_cpu}:", "",
             "| model | target | placement | measured | limit | met |", "| --- | --- | --- | ---: | ---: | --- |"]
    for t in targets:
        lines.append(f"| {t['model']} | {t['target']} | {t['placement']} | {t['measured']:.1f} | {t['limit']:.1f} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    return lines


def _cell_error(cell: dict) -> str:
    return f"error: {cell['error'][:160]}" if cell.get("error") else ""


def _onnxruntime_tables(meta: dict, ort_part: dict) -> list[str]:
    device = meta["provider"] == CUDA
    lines = ["onnxruntime alone, one session per bucket (intra-op 1, IO binding; medians of timed runs):", ""]
    lines += _error_line(ort_part)
    lines += ["| model | batch | host input ms | host input img/s |"
              + (" device input ms | device input img/s |" if device else "")
              + " alternating shapes ms | slowdown |",
              "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if device else "") + " ---: | ---: |"]
    models = ort_part.get("models", {})
    for name, m in models.items():
        alternating = {r["batch"]: r for r in m.get("alternating", {}).get("rows", [])}
        for row in m.get("buckets", []):
            alt = alternating.get(row["batch"], {})
            cells = [name, str(row["batch"]), _f(row["host"]["ms_per_batch"], 2), _f(row["host"]["img_per_s"])]
            if device:
                dev = row.get("device", {})
                cells += ([_cell_error(dev), ""] if dev.get("error")
                          else [_f(dev.get("ms_per_batch"), 2), _f(dev.get("img_per_s"))])
            cells += [_f(alt.get("ms_alternating"), 2), _f(alt.get("slowdown"), 2) + "x" if alt else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        if m.get("alternating", {}).get("rows"):
            a = m["alternating"]
            lines.append(f"| {name} | all buckets in turn | | {_f(a['cycle_img_per_s_alternating'])} "
                         f"(fixed shapes: {_f(a['cycle_img_per_s_fixed'])}) |" + (" | |" if device else "") + " | |")
        if m.get("error"):
            lines.append(f"| {name} | error: {m['error'][:200]} |")
    lines.append("")

    lines += _per_bucket_table(models, "cuda_graph", "graph", "CUDA graphs", _cuda_graph_heading, _cuda_graph_cells)
    lines += _per_bucket_table(models, "host_memory", "pageable", "Pinned against pageable host memory",
                               _host_memory_heading, _host_memory_cells)
    return lines


def _per_bucket_table(models: dict, key: str, measured: str, title: str, heading, cells) -> list[str]:
    """A CUDA-only table of the bucket rows' `key` rows: one line where every model says "n/a on
    CPU", else heading(models) and a line per bucket, cells(bucket row, its `key` row) where it
    holds `measured`, its error otherwise."""
    chosen = {name: m for name, m in models.items() if isinstance(m.get(key), dict)}
    if not chosen:
        return []
    if all(m[key].get("status") == NA_CPU for m in chosen.values()):
        return [f"{title}: {NA_CPU}.", ""]
    lines = heading(chosen)
    for name, m in chosen.items():
        for row in m.get("buckets", []):
            cell = row.get(key, {})
            drawn = cells(row, cell) if measured in cell and not cell.get("error") else _cell_error(cell) or "-"
            lines.append(f"| {name} | {row['batch']} | {drawn} |")
    lines.append("")
    return lines


def _cuda_graph_heading(models: dict) -> list[str]:
    return ["CUDA graphs (`enable_cuda_graph` 1; a session per bucket, input and output bound once to "
            "device buffers; per batch: copy in with `update_inplace`, run, copy out to a numpy array; "
            "medians), against the same on the bucket's session without graphs, and the rows above:", "",
            "| model | batch | graph: copy in / run / copy out ms | graph ms per batch | graph img/s "
            "| no graph: run ms | no graph ms per batch | speed-up (per batch / run) | host input ms "
            "| device input ms | first four runs ms | max abs diff, no graph |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]


def _cuda_graph_cells(row: dict, g: dict) -> str:
    w, wo = g["graph"], g["no_graph"]
    return (f"{_f(w['copy_in_ms'], 3)} / {_f(w['run_ms'], 3)} / {_f(w['copy_out_ms'], 3)} | "
            f"{_f(w['ms_per_batch'], 3)} | {_f(w['img_per_s'])} | {_f(wo['run_ms'], 3)} | "
            f"{_f(wo['ms_per_batch'], 3)} | {_f(g['speedup_total'], 2)}x / {_f(g['speedup_run'], 2)}x | "
            f"{_f(row['host']['ms_per_batch'], 3)} | {_f(row.get('device', {}).get('ms_per_batch'), 3)} | "
            f"{' / '.join(_f(ms, 0) for ms in g['first_runs_ms'])} | {_g(g['max_abs_diff_vs_no_graph'])}"
            + ("" if g["output_follows_input"] else " (**output did not follow the input**)"))


HOST_MEMORY_KINDS = ("pageable", "onnxruntime_pinned", "cuda_host_register")


def _host_memory_heading(models: dict) -> list[str]:
    lines = ["Host memory of the input and output (CUDA): the run with both bound in pageable memory (the "
             "host-input row above: numpy arrays), in onnxruntime's pinned memory (OrtValues of the CUDA EP "
             "device's HOST_ACCESSIBLE memory info), and in a shared mapping like the ring's, page-locked with "
             "`cudaHostRegister`; and the host-to-device copy of the input alone (`update_inplace` into a "
             "device OrtValue) from each:", ""]
    sources = next((m["host_memory"]["sources"] for m in models.values() if m["host_memory"].get("sources")), {})
    for key, label in (("onnxruntime_pinned", "onnxruntime pinned"), ("cuda_host_register", "cudaHostRegister")):
        if sources.get(key):
            lines += [f"- {label}: {sources[key]}"]
    if any(sources.values()):
        lines.append("")
    return lines + ["| model | batch | run ms: pageable | onnxruntime pinned | cudaHostRegister "
                    "| copy in ms: pageable | onnxruntime pinned | cudaHostRegister |",
                    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]


def _host_memory_cells(row: dict, h: dict) -> str:
    def run(cell: dict) -> str:
        if "status" in cell:
            return "not measurable"
        return _cell_error(cell) or _f(cell["run"]["ms_per_batch"], 3)

    def copy(cell: dict) -> str:
        return "-" if "copy_in_ms" not in cell else _f(cell["copy_in_ms"], 3)

    cells = [h.get(kind, {}) for kind in HOST_MEMORY_KINDS]
    return " | ".join(run(c) for c in cells) + " | " + " | ".join(copy(c) for c in cells)


def markdown(result: dict) -> str:
    meta, parts = result["meta"], result["parts"]
    lines = [f"Provider {meta['provider']} ({meta['gpu_name'] or 'no GPU'}), {meta['cores']} cores, onnxruntime "
             f"{meta['onnxruntime']}, {meta['pil']}, batch size {meta['batch_size']}, buckets {meta['buckets']}"
             + (", `--quick`" if meta["quick"] else "")
             + "".join(f", served with `cuda.{s}`" + ("" if meta["provider"] == CUDA else " (ignored on the CPU EP)")
                       for s in meta.get("served_cuda_settings", [])) + ".", ""]
    if "onnxruntime" in parts:
        lines += _onnxruntime_tables(meta, parts.get("onnxruntime", {}))

    if "preprocess" in parts:
        pre = parts.get("preprocess", {})
        lines += ["Preprocessing limit (Cronnx's preprocessing of the photos, all cores):", ""]
        lines += _error_line(pre)
        lines += ["| how | img/s | ms per image per worker |", "| --- | ---: | ---: |"]
        for how in ("threads", "processes"):
            if how in pre:
                lines.append(f"| {pre['workers']} {how} | {_f(pre[how]['img_per_s'])} | "
                             f"{_f(pre[how]['ms_per_image_per_worker'], 2)} |")
        lines.append("")

    if "served" in parts:
        served = parts.get("served", {})
        lines += ["Served (`cronnx serve`, 1 worker, `cronnx bench` closed loop, raw bodies); preprocessing in the "
                  "server process's threads, in preprocessing processes, or in front processes (their threads); server "
                  "CPU in cores: all (event loop thread of the server process / worker / other children, i.e. "
                  "preprocessing or front processes):", ""]
        lines += _error_line(served)
        lines += ["| model | preprocessing | clients | img/s | p50 ms | p99 ms | ok / sent | errors | mean batch "
                  "| batches by size | phases ms (pre / queue / infer) | server CPU cores (loop / worker / children) "
                  "| GPU util % mean / max | GPU MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
        notes = []
        for name, m in served.get("models", {}).items():
            for placement, p in m.get("placements", {}).items():
                pre_info = p.get("preprocessing", {})
                label = f"{pre_info.get('configured', '')} {placement}".strip()
                for run in p.get("runs", []):
                    sizes = ", ".join(f"<={float(b):g}: {n}" for b, n in (run["batch_sizes"] or {}).items())
                    ph = run["phases_ms"]
                    phases = " / ".join(_f(ph.get(k), 2) for k in ("preprocess", "queue", "inference"))
                    gpu = run["gpu"] or {}
                    by_part = run.get("server_cpu_by_part_cores") or {}
                    cpu = " / ".join(_f(by_part.get(k), 2) for k in ("event loop thread", "worker processes",
                                                                      "other child processes"))
                    lines.append(f"| {name} | {label} | {run['clients']} | {_f(run['img_per_s'])} | "
                                 f"{_f(run['p50_ms'], 2)} | {_f(run['p99_ms'], 2)} | {run['ok']} / {run['sent']} | "
                                 f"{run['errors']} | {_f(run['mean_batch'], 2)} | {sizes or '-'} | {phases} | "
                                 f"{_f(run['server_cpu_cores'], 2)} ({cpu}) | "
                                 f"{_f(gpu.get('util_mean_pct'), 0)} / {_f(gpu.get('util_max_pct'), 0)} | "
                                 f"{_f(gpu.get('memory_used_max_mib'), 0)} |")
                if p.get("error"):
                    lines.append(f"| {name} | {placement} | error: {p['error'][:200]} |")
                if placement == "processes" and pre_info:
                    notes.append(f"{name}: {pre_info['processes_at_start']} preprocessing processes under the server "
                                 f"at the start, {pre_info['processes_at_end']} at the end, "
                                 f"{_f(pre_info['process_restarts'], 0)} restarted.")
            if m.get("error") and not m.get("placements"):
                lines.append(f"| {name} | | error: {m['error'][:200]} |")
        if notes:
            lines += [""] + notes
        gpu_part = parts.get("gpu", {})
        if gpu_part.get("status") == "n/a":
            lines += ["", "GPU utilisation: n/a (no nvidia-smi)."]
        lines.append("")

    if "parity" in parts:
        parity = parts.get("parity", {})
        lines += ["Parity (softmax probabilities against the CPU EP, batch 1, on the photos):", ""]
        lines += _error_line(parity)
        lines += ["| model | provider | max abs diff, batch 1 | max abs diff, batch size | top-1 agree |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for name, m in parity.get("models", {}).items():
            for v in m.get("variants", []):
                batched = next(v[k] for k in v if k.startswith("max_abs_diff_batch") and k != "max_abs_diff_batch1")
                lines.append(f"| {name} | {v['label']} | {v['max_abs_diff_batch1']:.3g} | {batched:.3g} | "
                             f"{v['top1_agree']} / {m['photos']} |")
            for placement, s in (m.get("served") or {}).items():
                lines.append(f"| {name} | served `/predict` top-5, preprocessing {placement} | "
                             f"{_g(s['max_abs_diff_top5'])} | | ids match {s['top5_ids_match']} / {s['answers']} |")
    lines += _targets_table(meta, parts)
    total = result.get("total_s")
    lines += ["", "Time per part: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["timings_s"].items())
              + (f"; total {total:.1f} s." if total is not None else "; (run not finished).")]
    return "\n".join(lines)
