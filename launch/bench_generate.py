#!/usr/bin/env python
"""Benchmark: captions/s of batched beam search vs a batch-1 loop over the same samples, and
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="export or run directory (default: random-init model of --config)")
    p.add_argument("--config", default="demo", help="preset or YAML when no checkpoint is given")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)

    import torch

    from msmedcap.data.loader import make_eval_loader
    from msmedcap.eval.evaluate import generation_kwargs, model_device, sample_batch, to_device

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        from msmedcap.eval.checkpoints import find_export, load_for_eval

        model, cfg = load_for_eval(find_export(args.checkpoint), args.overrides)
    else:
        from msmedcap.config import load_config
        from msmedcap.models import build_model

        cfg = load_config(args.config, args.overrides)
        model = build_model(cfg.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    gen = generation_kwargs(cfg)

    batches, n = [], 0
    for batch in make_eval_loader(cfg, cfg.data.eval, 0, 1, args.batch_size):
        batches.append(batch)
        n += len(batch["key"])
        if n >= args.samples:
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
        "samples": len(batched), "batch_size": args.batch_size, "device": str(device),
        "threads": torch.get_num_threads(), "generation": gen, "variant": cfg.model.variant,
        "frozen_dtype": cfg.model.frozen_dtype,
        "batched_captions_per_s": round(len(batched) / t_batched, 2),
        "batch1_captions_per_s": round(len(singles) / t_single, 2),
        "speedup": round(t_single / t_batched, 2),
        "same_captions": f"{same}/{len(batched)}",
    }
    print(json.dumps(result))
    if same != len(batched):
        diff = next(i for i, (a, b) in enumerate(zip(batched, singles)) if a != b)
        print(f"first difference, sample {diff}: batched {batched[diff]!r} vs batch-1 {singles[diff]!r}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
