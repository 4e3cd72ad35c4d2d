"""`msmedcap bench --parts gpu`: the paper preset's GPU check, in one process, within a time budget.

Sections (each records its numbers or its error; none starts once the budget is spent):
- ``encoders``: each frozen encoder in fp16 and bf16 against fp32 on the same uint8 batch (finite,
  relative error), SAM's neck LayerNorm2d input deviation against fp16's 255.9, ms per image;
- ``steps``: stage 1 and 2 through the trainer's DeepSpeed engine (msmedcap.bench.step.bench_step) at
  each micro batch (16 and 32 by default): s/step, samples/s, FLOPs/sample, MFU, peak memory, with the
  planner's prediction (msmedcap.bench.plan, measured at micro batch 2 and 4) beside it;
- ``generate``: batched beam search at each batch (16 and 64) against batch 1, captions per second;
- ``collectives``: the process group's object and tensor collectives in a world of one (NCCL on GPUs).
Writes ``gpu_check.json`` and ``gpu_check.md`` (for docs/benchmarks.md) after every section.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from msmedcap.bench.common import device_name, synthetic_batch, to_device
from msmedcap.bench.plan import GIB, LONGEST_CAPTION_TOKENS, captions_with_longest, plan_before_engine

FP16_MAX_SQUARE_ROOT = 255.9  # (x - u)^2 overflows fp16 above this deviation


class Budget:
    def __init__(self, seconds: float, results: dict, out: Path):
        self.t0, self.seconds, self.results, self.out = time.time(), seconds, results, out

    def section(self, name: str, fn, log=print) -> None:
        if time.time() - self.t0 > self.seconds:
            self.results[name] = {"skipped": f"budget of {self.seconds:.0f} s spent"}
        else:
            start = time.time()
            try:
                self.results[name] = fn()
            except Exception as e:  # noqa: BLE001 - one section failing must not lose the others' numbers
                import traceback

                self.results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            log(f"gpu check: {name} {time.time() - start:.0f} s")
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.results))


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def uint8_images(cfg, branch: str, n: int, dev, seed: int = 0) -> tuple:
    """Loader-shaped pixels of ``branch``'s input size and their sizes."""
    size = getattr(cfg.model, branch).image_size
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return pixels.to(dev), torch.tensor([[size, size]] * n)


def neck_deviation(encoder, pixels, sizes) -> float:
    """max |x - mean over channels| at the input of SAM's first neck LayerNorm2d (what fp16 squares)."""
    seen = []
    neck_norm = encoder.encoder.neck[1]
    handle = neck_norm.register_forward_pre_hook(
        lambda _m, args: seen.append((args[0].float() - args[0].float().mean(1, keepdim=True)).abs().max().item()))
    try:
        encoder(pixels, sizes)
    finally:
        handle.remove()
    return max(seen)


def encoders_section(cfg, dev, batch: int = 2, timing_batch: int = 8) -> dict:
    from msmedcap.models.encoders import fixed_seed
    from msmedcap.registry import encoder_spec

    out = {}
    for branch in cfg.model.branches:
        with fixed_seed():
            reference = encoder_spec(branch).build(getattr(cfg.model, branch)).freeze(torch.float32).to(dev)
        pixels, sizes = uint8_images(cfg, branch, batch, dev)
        want = reference(pixels, sizes).float()
        row = {"tokens": list(want.shape[1:]), "fp32_finite": bool(torch.isfinite(want).all())}
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            half = copy.deepcopy(reference).freeze(dtype)
            got = half(pixels, sizes).float()
            row[name] = {"finite": bool(torch.isfinite(got).all()),
                         "relative_error": ((got - want).norm() / want.norm()).item()}
            if branch == "sam":
                row[name]["neck_max_deviation"] = neck_deviation(half, pixels, sizes)
            timed_pixels, timed_sizes = uint8_images(cfg, branch, timing_batch, dev, seed=1)
            half(timed_pixels, timed_sizes)
            _sync(dev)
            start = time.perf_counter()
            half(timed_pixels, timed_sizes)
            _sync(dev)
            row[name]["ms_per_image"] = 1000 * (time.perf_counter() - start) / timing_batch
            del half
        if branch == "sam":
            row["fp32_neck_max_deviation"] = neck_deviation(reference, pixels, sizes)
            row["fp16_square_limit"] = FP16_MAX_SQUARE_ROOT
        out[branch] = row
        del reference
    return out


def loader_shaped_batch(cfg, size: int, dev, captions=None) -> dict:
    """``synthetic_batch``'s text with uint8 images as the loader hands them over."""
    batch = synthetic_batch(cfg, size, captions)
    for branch in cfg.model.branches:
        batch[f"{branch}_image"], batch[f"{branch}_size"] = uint8_images(cfg, branch, size, torch.device("cpu"))
    return batch


def steps_section(cfg, dev, sizes: tuple, peak_tflops: float, iters: int = 2, captions=None, log=print) -> list:
    from msmedcap.bench.common import CAPTIONS, packaged_ds_config
    from msmedcap.bench.step import bench_step
    from msmedcap.models import build_model
    from msmedcap.train.ds_config import precision_of

    rows = []
    for stage in (1, 2):
        torch.manual_seed(0)
        model = build_model(cfg.model, with_lm=stage == 2).to(dev)
        precision = precision_of(packaged_ds_config(cfg, stage, 1))
        plan = plan_before_engine(model, cfg, stage, 1, dev, 1e6, precision, peak_tflops)
        # the steps' batches hold the caption the plan measured with, so the two peaks compare
        pool = captions_with_longest(cfg, stage, LONGEST_CAPTION_TOKENS, captions or CAPTIONS)
        for size in sizes:
            batch = loader_shaped_batch(cfg, size, torch.device("cpu"), pool)
            row = bench_step(model, cfg, stage, batch, dev, iters, 1, {"tflops": peak_tflops})
            row["planned_peak_gib"] = plan.peak_bytes(size) / GIB
            if row.get("peak_memory_mib"):
                measured_gib = row["peak_memory_mib"] / 1024
                row["planner_error"] = (row["planned_peak_gib"] - measured_gib) / measured_gib
            rows.append(row)
            log(f"  stage {stage} micro batch {size}: {row['samples_per_s']:.2f} samples/s, MFU {row.get('mfu')}")
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def generate_section(cfg, dev, sizes: tuple, singles: int = 8, captions=None) -> list:
    from msmedcap.eval.evaluate import generation_kwargs
    from msmedcap.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev).eval()
    gen = generation_kwargs(cfg)
    rows = []

    def rate(batch) -> float:
        _sync(dev)
        start = time.perf_counter()
        captions_out = model.generate(to_device(batch, dev), **gen)
        _sync(dev)
        return len(captions_out) / (time.perf_counter() - start)

    one = loader_shaped_batch(cfg, 1, torch.device("cpu"), captions)
    rate(one)  # warm-up
    single = sum(rate(loader_shaped_batch(cfg, 1, torch.device("cpu"), captions)) for _ in range(singles)) / singles
    for size in sizes:
        batch = loader_shaped_batch(cfg, size, torch.device("cpu"), captions)
        rate(batch)  # warm-up at this shape
        batched = rate(batch)
        rows.append({"batch": size, "captions_per_s": batched, "batch1_captions_per_s": single,
                     "speedup": batched / single, "generation": gen})
    return rows


def collectives_section(dev) -> dict:
    import torch.distributed as dist

    from msmedcap.train.world import init_world, single_process_env

    single_process_env()
    if not dist.is_initialized():
        init_world(cpu_threads=False)
    out = {"backend": dist.get_backend()}
    objects = [None]
    dist.all_gather_object(objects, {"rank": dist.get_rank()})
    gathered = [None]
    dist.gather_object({"ok": True}, gathered, dst=0)
    message = ["stop?"]
    dist.broadcast_object_list(message, src=0)
    t = torch.ones(1 << 20, device=dev)
    _sync(dev)
    start = time.perf_counter()
    dist.all_reduce(t)
    _sync(dev)
    out.update({"all_gather_object": objects == [{"rank": 0}], "gather_object": gathered == [{"ok": True}],
                "broadcast_object_list": message == ["stop?"], "all_reduce_4MiB_ms": 1000 * (time.perf_counter() - start),
                "all_reduce_ok": bool((t == 1).all())})
    return out


def gpu_check(cfg, dev, out: Path, budget_s: float, step_sizes=(16, 32), gen_sizes=(16, 64), peak_tflops: float = 989.0,
              captions=None, log=print) -> dict:
    results = {"device": device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
               "variant": cfg.model.variant, "frozen_dtype": cfg.model.frozen_dtype, "peak_tflops": peak_tflops}
    try:
        import deepspeed
        import transformers

        results.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    budget = Budget(budget_s, results, out)
    budget.section("collectives", lambda: collectives_section(dev), log)
    budget.section("encoders", lambda: encoders_section(cfg, dev), log)
    budget.section("steps", lambda: steps_section(cfg, dev, step_sizes, peak_tflops, captions=captions, log=log), log)
    budget.section("generate", lambda: generate_section(cfg, dev, gen_sizes, captions=captions), log)
    return results


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(r: dict) -> str:
    lines = [f"GPU check on {r.get('device')} (torch {r.get('torch')}, CUDA {r.get('cuda')}, DeepSpeed "
             f"{r.get('deepspeed')}, transformers {r.get('transformers')}), variant {r.get('variant')}, "
             f"{r.get('elapsed_s')} s", ""]
    enc = r.get("encoders", {})
    if enc and "error" not in enc and "skipped" not in enc:
        lines += ["| encoder | dtype | finite | rel. error vs fp32 | ms/image | neck max dev. (fp16 limit 255.9) |",
                  "|---|---|---|---|---|---|"]
        for branch, row in enc.items():
            for dtype in ("fp16", "bf16"):
                d = row[dtype]
                lines.append(f"| {branch} | {dtype} | {d['finite']} | {_fmt(d['relative_error'])} | "
                             f"{_fmt(d['ms_per_image'])} | {_fmt(d.get('neck_max_deviation'))} |")
        lines.append("")
    steps = r.get("steps")
    if isinstance(steps, list):
        lines += ["| stage | micro batch | s/step | samples/s | TFLOP/sample | MFU | peak GiB | planned GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in steps:
            peak = s["peak_memory_mib"] / 1024 if s.get("peak_memory_mib") else None
            lines.append(f"| {s['stage']} | {s['micro_batch']} | {_fmt(s['step_s'])} | {_fmt(s['samples_per_s'])} | "
                         f"{_fmt(s['flops_per_sample'] / 1e12)} | {_fmt(s.get('mfu'))} | {_fmt(peak)} | "
                         f"{_fmt(s['planned_peak_gib'])} |")
        lines.append("")
    gen = r.get("generate")
    if isinstance(gen, list):
        lines += ["| generation batch | captions/s | batch-1 captions/s | speedup |", "|---|---|---|---|"]
        lines += [f"| {g['batch']} | {_fmt(g['captions_per_s'])} | {_fmt(g['batch1_captions_per_s'])} | "
                  f"{_fmt(g['speedup'])} |" for g in gen]
        lines.append("")
    col = r.get("collectives")
    if col:
        lines.append("collectives: " + ", ".join(f"{k} {_fmt(v)}" for k, v in col.items() if k != "traceback"))
    for name in ("collectives", "encoders", "steps", "generate"):
        if isinstance(r.get(name), dict) and ("error" in r[name] or "skipped" in r[name]):
            lines.append(f"{name}: {r[name].get('error') or r[name].get('skipped')}")
    return "\n".join(lines) + "\n"
