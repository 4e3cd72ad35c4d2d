"""`msmedcap bench` / launch/benchmark.py: throughput, FLOPs utilisation and memory, side by side.

    python launch/benchmark.py --preset demo                       # CPU, a few minutes
    python launch/benchmark.py --preset paper --batch 8            # one GPU, random weights of the paper's sizes

Parts (``--parts``, default all): ``loader`` shard loader vs a plain tar-read + decode loop; ``step``
stage 1 and 2 of each variant (samples/s, time split, FLOPs per sample, achieved FLOP/s, MFU);
``cache`` the frozen-feature cache's effect on the stage-2 step; ``hf`` the blip2 variant vs
transformers' Blip2ForConditionalGeneration; ``generate`` captions/s batched vs batch 1; ``memory``
ZeRO-2 vs stage 0 on 2 ranks (the deepspeed launcher on ``--module msmedcap.bench.memory``). All parts
but ``memory`` run in this process, from the package alone (no checkout needed). Writes one JSON file
and prints rich tables.
Weights and tokenizers that are not local files are replaced by random-init stand-ins of the same
size: a benchmark needs shapes, not weights, and nothing is downloaded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("loader", "step", "cache", "hf", "generate", "memory", "gpu")
DEFAULT_PARTS = PARTS[:-1]  # gpu: the one-GPU check at the preset's shapes (msmedcap.bench.gpu), asked for by name
VARIANTS = ("blip2", "sam-blip2", "msmedcap")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", help="packaged preset (demo, paper) or YAML path (default: demo)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all but gpu)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="variants for the step part")
    p.add_argument("--stages", default="1,2", help="stages for the step part")
    p.add_argument("--batch", type=int, default=0, help="micro batch per step (default: the preset's stage-2 "
                                                      "micro_batch_size, at most 16)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (known for H100/H200/A100; on CPU a measured GEMM rate otherwise)")
    p.add_argument("--loader-batches", type=int, default=20, help="timed batches per loader")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (both loaders)")
    p.add_argument("--loader-paper-sizes", action="store_true",
                   help="loader part at the paper's sizes (CLIP 224, SAM 1024) on generated ~700x500 and "
                        "~2000x1500 JPEG/PNG figures (msmedcap.bench.loader, launch/bench_loader.py --paper-sizes)")
    p.add_argument("--gen-samples", type=int, default=32)
    p.add_argument("--max-batch", action="store_true",
                   help="GPU: also find the largest micro batch that fits per variant and stage (doubling from --batch)")
    p.add_argument("--memory-batch", type=int, default=4, help="micro batch of the 2-rank ZeRO comparison")
    p.add_argument("--gpu-budget", type=float, default=330, help="gpu part: seconds after which no section starts")
    p.add_argument("--gpu-batches", default="16,32", help="gpu part: micro batches of the training steps")
    p.add_argument("--gen-batches", default="16,64", help="gpu part: batches of the beam search (vs batch 1)")
    p.add_argument("--cache-dir", default=None, help="where the cache benchmark writes (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON output (default: runs/bench/<preset>-<time>.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark throughput, FLOPs utilisation and memory",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)


def release(dev) -> None:
    """Free a finished variant's memory before the next one is built (paper-sized models are GBs)."""
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _part(results: dict, name: str, fn, console) -> None:
    """Run one part; a failure is recorded (with its reason) and the others still run."""
    console.print(f"[bold]{name}[/bold] ...")
    t = time.time()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - a benchmark part failing must not lose the others' numbers
        import traceback

        results[name] = {"error": f"{type(e).__name__}: {e}"}
        console.print(f"[red]{name} failed[/red]: {traceback.format_exc()}")
    console.print(f"  {name}: {time.time() - t:.0f} s")


def run(args) -> int:
    import torch
    from rich.console import Console

    from msmedcap.bench import common, report
    from msmedcap.config import ConfigError

    console = Console(width=None if sys.stdout.isatty() else 160)
    parts = [x for x in args.parts.split(",") if x]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ConfigError(f"--parts: unknown part {bad[0]!r} (parts: {', '.join(PARTS)})")
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        raise ConfigError(f"--variants: unknown variant in {args.variants!r} ({', '.join(VARIANTS)})")
    stages = [int(s) for s in args.stages.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = common.device()
    clock = common.use_clock(dev)
    work = tempfile.TemporaryDirectory(prefix="msmedcap-bench-")
    cfg, standins = common.bench_config(args.preset, args.overrides, Path(work.name))
    batch_size = args.batch or min(cfg.train.stage2.micro_batch_size, 16)
    captions = common.captions_from_shards(cfg, 256) or None
    batch = common.synthetic_batch(cfg, batch_size, captions)
    peak = common.peak_tflops(dev, args.peak_tflops, torch.get_num_threads())
    out = Path(args.out or f"runs/bench/{Path(args.preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["msmedcap bench" if Path(sys.argv[0]).name == "msmedcap" else "python " + sys.argv[0],
                             *sys.argv[1:]]),
        "preset": args.preset, "overrides": args.overrides, "random_weight_standins": standins,
        "device": {"type": dev.type, "name": common.device_name(dev), "threads": torch.get_num_threads(),
                   "torch": torch.__version__},
        "frozen_dtype": str(common.frozen_dtype_of(cfg)), "micro_batch": batch_size,
        "caption_source": "eval shards" if captions else "built-in captions", "peak": peak,
        "iters": args.iters, "warmup": args.warmup, "step_timing": clock,
    }
    console.print(f"device {results['device']['name']} ({dev.type}, {torch.get_num_threads()} threads); "
                  f"peak {peak['tflops']} TFLOP/s ({peak['source']})")

    def build(variant):
        import copy

        from msmedcap.models import build_model

        c = copy.deepcopy(cfg)
        c.model.variant = variant
        torch.manual_seed(0)
        return c, build_model(c.model).to(dev)

    if "loader" in parts:
        from msmedcap.bench.loader import loader_bench

        _part(results, "loader", lambda: loader_bench(args.preset, args.overrides, args.loader_workers,
                                                      args.loader_batches, paper_sizes=args.loader_paper_sizes),
              console)
    if "step" in parts:
        def steps():
            from msmedcap.bench.step import bench_step, largest_micro_batch

            rows = []
            for v in variants:
                c, model = build(v)
                for s in stages:
                    rows.append(bench_step(model, c, s, batch, dev, args.iters, args.warmup, peak))
                    console.print(f"  {v} stage {s}: {rows[-1]['samples_per_s']:.2f} samples/s")
                    if args.max_batch:
                        rows[-1]["largest_micro_batch"] = largest_micro_batch(
                            model, c, s, lambda n: common.synthetic_batch(c, n, captions), dev, batch_size)
                del model
                release(dev)
            return rows
        _part(results, "step", steps, console)
    if "cache" in parts:
        from msmedcap.bench.cache import bench_feature_cache, paper_feature_sizes

        def cache():
            row = bench_feature_cache(cfg, batch, dev, args.iters, args.warmup, peak, args.cache_dir)
            return {**row, "paper_sizes": paper_feature_sizes()}
        _part(results, "cache", cache, console)
    if "hf" in parts:
        from msmedcap.bench.hf_blip2 import bench_vs_transformers

        _part(results, "hf", lambda: bench_vs_transformers(cfg, batch, dev, args.iters, args.warmup, peak), console)
    if "generate" in parts:
        from msmedcap.bench.generate import generate_bench

        _part(results, "generate", lambda: generate_bench(None, args.preset, args.overrides + standins,
                                                          args.gen_samples, batch_size, args.threads), console)
    if "memory" in parts:
        from msmedcap.bench.memory import run_zero_comparison

        _part(results, "memory", lambda: run_zero_comparison(args.preset, args.overrides, args.memory_batch,
                                                             max(1, args.iters), args.threads), console)
    if "gpu" in parts:
        from msmedcap.bench.gpu import gpu_check

        sizes = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
        _part(results, "gpu", lambda: gpu_check(cfg, dev, out.with_name(out.stem + "-gpu"), args.gpu_budget,
                                                sizes(args.gpu_batches), sizes(args.gen_batches), peak["tflops"],
                                                captions, log=console.print), console)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(out)
    report.print_tables(results, console)
    console.print(f"results: {out}", highlight=False)
    work.cleanup()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    from msmedcap.config import ConfigError

    try:
        return run(args)
    except ConfigError as e:
        print(f"benchmark: config error: {e}", file=sys.stderr)
        return 2
