"""The benchmark JSON as tables: rich on the terminal, Markdown for docs/benchmarks.md (same rows).

    python -m msmedcap.bench.report runs/bench/demo-....json     # prints the Markdown tables
"""
from __future__ import annotations

import json
import sys


def _f(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 10 ** -digits or abs(x) >= 1e5 else f"{x:.{digits}f}"
    return str(x)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _error(results: dict, part: str):
    value = results.get(part)
    return value.get("error") if isinstance(value, dict) else None


def tables(results: dict) -> list:
    """[(title, columns, rows)] for every part present."""
    out = []
    step_cols = ["variant", "stage", "batch", "samples/s", "encoders ms", "Q-Formers ms", "OPT fwd+bwd ms",
                 "optimizer ms", "GFLOP/sample", "achieved GFLOP/s", "MFU"]

    def step_row(r):
        s = r.get("split_s", {})
        return [r["variant"], str(r["stage"]), str(r["micro_batch"]), _f(r["samples_per_s"]), _ms(s.get("encoders")),
                _ms(s.get("qformers_fwd_bwd")), _ms(s.get("opt_fwd_bwd")), _ms(s.get("optimizer")),
                _f(r["flops_per_sample"] / 1e9), _f(r["achieved_tflops"] * 1e3),
                "-" if r.get("mfu") is None else f"{r['mfu'] * 100:.1f}%"]

    peak = results.get("peak", {})
    if isinstance(results.get("step"), list):
        rows = [step_row(r) for r in results["step"]]
        cols = list(step_cols)
        if any(r.get("peak_memory_mib") for r in results["step"]):  # GPU runs
            cols.append("peak MiB")
            for row, r in zip(rows, results["step"]):
                row.append(_f(r.get("peak_memory_mib"), 0))
        if any("largest_micro_batch" in r for r in results["step"]):
            cols.append("largest micro batch")
            for row, r in zip(rows, results["step"]):
                row.append(_f(r.get("largest_micro_batch", {}).get("largest")))
        out.append((f"Training step (one rank, DeepSpeed ZeRO-2; MFU vs {_f(peak.get('tflops'), 3)} TFLOP/s: "
                    f"{peak.get('source')})", cols, rows))
    c = results.get("cache")
    if isinstance(c, dict) and "error" not in c:
        out.append(("Frozen-feature cache, stage 2 (" + c["variant"] + ")",
                    ["", "samples/s", "encoders ms/step", "step ms", "MiB/image", "encoder ms/image",
                     "cache read ms/image", "break-even read MB/s"],
                    [["encoders each step", _f(c["encoders"]["samples_per_s"]), _ms(c["encoders"]["split_s"]["encoders"]),
                      _ms(c["encoders"]["step_s"]), _f(c["mib_per_image"], 3), _ms(c["encoder_s_per_image"]),
                      "-", _f(c["break_even_read_mb_s"], 3)],
                     ["cache hits", _f(c["cached"]["samples_per_s"]), _ms(c["cached"]["split_s"]["encoders"]),
                      _ms(c["cached"]["step_s"]), "", "", _ms(c["read_s_per_image"]), ""]]))
    h = results.get("hf")
    if isinstance(h, dict) and "error" not in h:
        rows = [[r["variant"], _f(r["samples_per_s"]), _ms(r["step_s"]), _f(r["flops_per_sample"] / 1e9),
                 f"{r['params']['trainable'] / 1e6:.2f}M",
                 f"{r['params'].get('in_optimizer', r['params']['trainable']) / 1e6:.2f}M", f"{r['params']['frozen'] / 1e6:.2f}M"]
                for r in (h["ours"], h["transformers"])]
        out.append((f"Stage-2 step, blip2 variant vs transformers Blip2ForConditionalGeneration: ratio {h['ratio']:.2f}",
                    ["model", "samples/s", "step ms", "GFLOP/sample", "trainable", "in optimizer", "frozen"], rows))
    lo = results.get("loader")
    if isinstance(lo, dict) and "error" not in lo:
        per_worker, nbytes = lo.get("samples_per_s_per_worker", {}), lo.get("bytes_per_sample", {})
        out.append((f"Loader, {lo['workers']} workers, batch {lo['batch_size']}"
                    + (" (paper sizes)" if lo.get("paper_sizes") else "")
                    + f": {lo['ratio_vs_plain_decode']:.2f} of plain decode",
                    ["loader", "samples/s", "per worker", "MB/sample across workers"],
                    [[k, _f(v), _f(per_worker.get(k)) if k in per_worker else "",
                      _f(nbytes[k] / 1e6, 2) if k in nbytes else ""] for k, v in lo["samples_per_s"].items()]))
    g = results.get("generate")
    if isinstance(g, dict) and "error" not in g:
        out.append((f"Generation, {g['samples']} samples, beams {g['generation'].get('num_beams')}",
                    ["batched (batch %d) captions/s" % g["batch_size"], "batch-1 captions/s", "speedup", "same captions"],
                    [[_f(g["batched_captions_per_s"]), _f(g["batch1_captions_per_s"]), _f(g["speedup"]),
                      g["same_captions"]]]))
    m = results.get("memory")
    if isinstance(m, dict) and "error" not in m:
        rows = []
        for zero in ("zero0", "zero2"):
            for r in m[zero]["ranks"]:
                st = r["optimizer_state_bytes"]
                rows.append([f"{zero[-1]}", str(r["rank"]), r["precision"], _f(r["peak_memory_mb"], 1),
                             f"{st['total'] / 2 ** 20:.2f}", _f(r["optimizer_bytes_per_trainable_param"]),
                             st["optimizer_class"]])
        first = m["zero0"]["ranks"][0]
        out.append((f"Memory on {first['world_size']} ranks ({first['peak_memory_kind']}), "
                    f"{first['trainable_params'] / 1e6:.2f}M trainable parameters",
                    ["ZeRO", "rank", "precision", "peak MiB", "optimizer state MiB", "bytes/trainable param",
                     "optimizer"], rows))
    failed = [[p, _error(results, p)] for p in ("loader", "step", "cache", "hf", "generate", "memory") if _error(results, p)]
    if failed:
        out.append(("Parts that did not run", ["part", "reason"], failed))
    return out


def print_tables(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for title, cols, rows in tables(results):
        t = Table(title=title, title_justify="left")
        for col in cols:
            t.add_column(col, justify="left" if col in ("variant", "model", "loader", "", "part", "reason", "optimizer")
                         else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)


def markdown(results: dict) -> str:
    parts = []
    for title, cols, rows in tables(results):
        lines = [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(markdown(json.loads(open(sys.argv[1]).read())))
