"""Benchmark (``msmedcap bench --parts generate``, launch/bench_generate.py): captions/s of batched beam search vs a batch-1 loop over the same samples, and
whether both give the same captions.

    python launch/bench_generate.py                                  # random-init demo model
    python launch/bench_generate.py --checkpoint runs/demo --samples 128 --batch-size 16
    python launch/bench_generate.py model.frozen_dtype=fp32 eval.num_beams=5

Not a test: timings depend on the machine. Prints one JSON line with both rates and their ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="export or run directory (default: random-init model of --config)")
    p.add_argument("--config", default="demo", help="preset or YAML when no checkpoint is given")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def generate_bench(checkpoint=None, config: str = "demo", overrides=(), samples: int = 64, batch_size: int = 16,
                   threads: int = 0) -> dict:
    """Both rates, their ratio and how many captions agree (``first_difference`` names the first that
    does not)."""
    import torch

    from msmedcap.data.loader import make_eval_loader
    from msmedcap.eval.evaluate import generation_kwargs, model_device, sample_batch, to_device

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if checkpoint:
        from msmedcap.eval.checkpoints import find_export, load_for_eval

        model, cfg = load_for_eval(find_export(checkpoint), list(overrides))
    else:
        from msmedcap.config import load_config
        from msmedcap.models import build_model

        cfg = load_config(config, list(overrides))
        model = build_model(cfg.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    gen = generation_kwargs(cfg)

    batches, n = [], 0
    for batch in make_eval_loader(cfg, cfg.data.eval, 0, 1, batch_size):
        batches.append(batch)
        n += len(batch["key"])
        if n >= samples:
            break
    device = model_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(batch_list):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            caps = [c for b in batch_list for c in model.generate(to_device(b, device), **gen)]
        sync()
        return caps, time.perf_counter() - start

    run(batches[:1])  # warm-up: allocator, kernels, tokenizer caches
    batched, t_batched = run(batches)
    singles, t_single = run([sample_batch(b, i) for b in batches for i in range(len(b["key"]))])
    same = sum(a == b for a, b in zip(batched, singles))
    result = {
        "samples": len(batched), "batch_size": batch_size, "device": str(device),
        "threads": torch.get_num_threads(), "generation": gen, "variant": cfg.model.variant,
        "frozen_dtype": cfg.model.frozen_dtype,
        "batched_captions_per_s": round(len(batched) / t_batched, 2),
        "batch1_captions_per_s": round(len(singles) / t_single, 2),
        "speedup": round(t_single / t_batched, 2),
        "same_captions": f"{same}/{len(batched)}",
    }
    if same != len(batched):
        diff = next(i for i, (a, b) in enumerate(zip(batched, singles)) if a != b)
        result["first_difference"] = f"first difference, sample {diff}: batched {batched[diff]!r} vs batch-1 " \
                                     f"{singles[diff]!r}"
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = generate_bench(args.checkpoint, args.config, args.overrides, args.samples, args.batch_size, args.threads)
    difference = result.pop("first_difference", None)
    print(json.dumps(result))
    if difference:
        print(difference, file=sys.stderr)
    return 0
