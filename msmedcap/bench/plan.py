"""`msmedcap plan`: will a config fit, how long will it take, before any GPU time is spent.

Per stage (and variant):
- frozen weights (the parts the stage runs, in the dtypes they run in on the target GPUs);
- trainables and ZeRO-2's per-rank share: the engine's 16-bit working copy, the stage's gradient,
  fp32 master and Adam shards (/ ranks), the reduce bucket;
- activations per sample and the frozen encoders' transient per image, *measured*: a real forward
  and backward of the model at two micro batches (2 and 4) on this machine's device (CPU here: live
  tensor storages; GPU: the allocator's peak), extrapolated linearly and checked against a third
  measured micro batch (8); activations measured in fp32 are scaled to the engine's 16-bit element size;
- FLOPs per sample (FlopCounterMode, forward and backward as executed);
- the largest micro batch that fits, and the time of the configured steps at a stated MFU.

:func:`preflight` is the same estimate inside ``msmedcap train`` before the engine is built.
"""
from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2 ** 30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what the device reports as its total
    peak_tflops: float  # dense bf16


GPUS = {
    "h100": Gpu("H100 SXM 80GB", 79.6, 989.0),
    "h200": Gpu("H200 141GB", 139.8, 989.0),
    "a100-80": Gpu("A100 80GB", 79.2, 312.0),
    "a100-40": Gpu("A100 40GB", 39.4, 312.0),
}
# Per GPU and process: the CUDA context, NCCL's buffers and the allocator's fragmentation.
RESERVED_GIB = 2.0
FRAGMENTATION = 0.90
ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
# The longest caption a measured batch holds: ROCO's p99 in BERT WordPieces, what a micro batch of ~100 holds.
LONGEST_CAPTION_TOKENS = 123


def usable_bytes(memory_gib: float) -> float:
    return max(memory_gib - RESERVED_GIB, 0.0) * FRAGMENTATION * GIB


# --------------------------------------------------------------------------- static memory
def weights_memory(model, stage: int, ranks: int, precision: str, frozen_elem: int, lm_elem: int,
                   bucket_elements: int) -> dict:
    """Bytes per rank that do not grow with the micro batch, from the model's parameter counts."""
    encoders = sum(p.numel() for p in model.encoders.parameters())
    lm = model.captioner.lm
    lm_count = sum(p.numel() for p in lm.parameters()) if (stage == 2 and lm is not None) else 0
    trained = sum(p.numel() for _, p in model.stage_named_parameters(stage))
    held = sum(p.numel() for _, p in model.trainable_named_parameters()) - trained
    work = ELEMENT[precision]
    return {
        "frozen_weights": encoders * frozen_elem + lm_count * lm_elem,
        "trainables": trained * work + held * 4,  # the stage's in the engine's dtype, the others kept fp32
        "gradients": trained * work / ranks + 2 * bucket_elements * work,
        "master_and_adam": trained * (4 + 8) / ranks if precision != "fp32" else trained * 8 / ranks,
        "counts": {"encoders": encoders, "lm": lm_count, "trained": trained, "held": held},
    }


# --------------------------------------------------------------------------- measurement
class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once among those created inside (each storage counted once,
    released when Python drops it): an allocator's peak for devices that keep no statistics (CPU)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.known: set = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.known.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self.known:
                    self.known.add(id(storage))
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


class PeakMeter:
    """Peak bytes allocated during a block beyond what was allocated before it: the CUDA allocator's
    peak on GPUs, :class:`LiveBytes` elsewhere. Gradients are dropped as soon as each is accumulated, as
    ZeRO-2 moves them into its partitioned buffers (counted with the static memory)."""

    def __init__(self, model, dev: torch.device):
        self.model, self.dev, self.peak = model, dev, 0

    @contextlib.contextmanager
    def measure(self):
        hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
                 for p in self.model.parameters() if p.requires_grad]
        try:
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
                base = torch.cuda.memory_allocated(self.dev)
                torch.cuda.reset_peak_memory_stats(self.dev)
                yield
                torch.cuda.synchronize(self.dev)
                self.peak = torch.cuda.max_memory_allocated(self.dev) - base
            else:
                with LiveBytes() as live:
                    yield
                self.peak = live.peak
        finally:
            for h in hooks:
                h.remove()


@contextlib.contextmanager
def precomputed_features(model, features: dict):
    """``model.encode`` returns the given frozen features (rows ``index`` of them), so a step's
    measurement leaves the encoders' transient out (measured on its own)."""
    def encode(batch, branch, index=None):
        tokens = features[branch]
        return tokens if index is None else tokens[index.to(tokens.device)]

    model.encode = encode
    try:
        yield
    finally:
        del model.encode


def _step(model, stage: int, batch: dict) -> None:
    getattr(model, f"stage{stage}_loss")(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)


def measure_stage(model, cfg, stage: int, sizes: tuple, dev: torch.device, captions=None) -> dict:
    """Activation peak (a forward and backward, frozen features given) and the frozen encoders'
    transient (their forward alone) per micro batch size in ``sizes``; FLOPs per sample at the
    smallest. Bytes as allocated on ``dev`` in the model's current dtypes."""
    from msmedcap.bench.common import synthetic_batch, to_device
    from msmedcap.train.metrics import count_flops

    model.train()
    model.set_stage(stage)
    meter = PeakMeter(model, dev)
    out = {"activations": {}, "encoders": {}}
    for size in sizes:
        batch = to_device(synthetic_batch(cfg, size, captions), dev)
        with meter.measure(), torch.no_grad():
            features = {b: model.encode(batch, b) for b in model.branches}
        out["encoders"][size] = meter.peak
        with precomputed_features(model, features):
            with meter.measure():
                _step(model, stage, batch)
            out["activations"][size] = meter.peak
            if "flops_per_sample" not in out:
                _, flops = count_flops(lambda: _step(model, stage, batch))
                out["flops_per_sample"] = flops / size
        if "encoder_flops_per_sample" not in out:  # once, as the step's: the encoders run again for it
            with torch.no_grad():
                _, enc_flops = count_flops(lambda: [model.encode(batch, b) for b in model.branches])
            out["encoder_flops_per_sample"] = enc_flops / size
        del features, batch
    model.set_stage(None)
    return out


def captions_with_longest(cfg, stage: int, tokens: int, pool: list) -> list:
    """``pool`` with a first caption of at least ``tokens`` tokens (up to the limit) for the tokenizer
    the stage pads by: the Q-Former's in stage 1, the LM's in stage 2. Every measured batch holds it, so
    its text is padded as a large micro batch's would be."""
    from msmedcap.tokenization import load_lm_tokenizer, load_qformer_tokenizer

    m = cfg.model
    if stage == 1:
        tok, want = load_qformer_tokenizer(m.qformer.tokenizer), min(tokens, m.qformer.max_text_len)
    else:
        tok, want = load_lm_tokenizer(m.lm.tokenizer), min(tokens, m.lm.max_caption_len)
    words = " ".join(pool).split()
    long = []
    for word in words * (tokens + 1):  # one word at a time: stop at the length, not a caption later
        if len(tok(" ".join(long)).input_ids) >= want:
            break
        long.append(word)
    return [" ".join(long)] + list(pool)


def linear_fit(points: dict) -> tuple:
    """(per unit, fixed) through the two smallest sizes of ``{size: bytes}``."""
    (a, ya), (b, yb) = sorted(points.items())[:2]
    slope = (yb - ya) / (b - a)
    return slope, ya - slope * a


# --------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    stage: int
    variant: str
    micro_batch: int
    grad_accum: int
    steps: int
    static: dict
    activation_per_sample: float
    activation_fixed: float
    encoder_per_image: float
    encoder_chunk: int
    flops_per_sample: float
    check: dict
    budget: float
    gpus: int
    peak_tflops: float
    mfu: float
    gpu: str = ""

    def peak_bytes(self, micro: int) -> float:
        images = min(micro, self.encoder_chunk) if self.encoder_chunk else micro
        s = self.static
        return (s["frozen_weights"] + s["trainables"] + s["gradients"] + s["master_and_adam"]
                + self.activation_fixed + self.activation_per_sample * micro + self.encoder_per_image * images)

    def largest_micro_batch(self) -> int:
        if self.peak_bytes(1) > self.budget:
            return 0
        lo, hi = 1, 2
        while self.peak_bytes(hi) <= self.budget and hi < 1 << 16:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak_bytes(mid) <= self.budget else (lo, mid)
        return lo

    def hours(self) -> float:
        samples = self.steps * self.micro_batch * self.grad_accum * self.gpus
        return samples * self.flops_per_sample / (self.gpus * self.peak_tflops * 1e12 * self.mfu) / 3600

    def to_dict(self) -> dict:
        largest = self.largest_micro_batch()
        global_batch = self.micro_batch * self.grad_accum
        return {**asdict(self), "peak_gib_at_micro_batch": self.peak_bytes(self.micro_batch) / GIB,
                "fits": self.peak_bytes(self.micro_batch) <= self.budget, "largest_micro_batch": largest,
                "accumulation_for_global_batch": math.ceil(global_batch / largest) if largest else None,
                "hours": self.hours(), "gpu_hours": self.hours() * self.gpus}


def stage_settings(cfg, stage: int) -> tuple:
    st = getattr(cfg.train, f"stage{stage}")
    return st.micro_batch_size, st.grad_accum, st.steps


def plan_stage(model, cfg, stage: int, measured: dict, gpus: int, memory_gib: float, peak_tflops: float,
               mfu: float, precision: str, frozen_elem: int, act_scale: float, enc_scale: float) -> StagePlan:
    """A :class:`StagePlan` from a measurement of :func:`measure_stage`: activations times ``act_scale``
    (measured element size -> the engine's), the encoders' transient times ``enc_scale`` (measured ->
    the frozen dtype they run in), frozen weights at ``frozen_elem`` bytes (the LM at the engine's)."""
    per_sample, fixed = linear_fit(measured["activations"])
    enc_per_image, _ = linear_fit(measured["encoders"])
    check_size = max(measured["activations"])
    predicted = per_sample * check_size + fixed
    actual = measured["activations"][check_size]
    hidden = cfg.model.qformer.hidden_size
    static = weights_memory(model, stage, gpus, precision, frozen_elem, ELEMENT[precision], hidden * hidden)
    micro, accum, steps = stage_settings(cfg, stage)
    return StagePlan(
        stage=stage, variant=cfg.model.variant, micro_batch=micro, grad_accum=accum, steps=steps, static=static,
        activation_per_sample=per_sample * act_scale, activation_fixed=max(fixed, 0.0) * act_scale,
        encoder_per_image=enc_per_image * enc_scale, encoder_chunk=getattr(cfg.model.sam, "encoder_chunk", 0) or 0,
        flops_per_sample=measured["flops_per_sample"] + measured["encoder_flops_per_sample"],
        check={"micro_batch": check_size, "predicted": predicted, "measured": actual,
               "error": (predicted - actual) / actual if actual else None},
        budget=usable_bytes(memory_gib), gpus=gpus, peak_tflops=peak_tflops, mfu=mfu)


def measurement_dtype(dev: torch.device, precision: str) -> torch.dtype:
    """The trainables' dtype to measure in: the engine's where this device runs it natively (as the
    engine would cast them), else fp32 (activations then scaled to the engine's element size)."""
    from msmedcap.models.encoders import DTYPES, cpu_has_native_bf16

    if precision == "fp32":
        return torch.float32
    native = dev.type == "cuda" or (precision == "bf16" and cpu_has_native_bf16())
    return DTYPES[precision] if native else torch.float32


def build_for_stage(cfg, stage: int, dev: torch.device, dtype: torch.dtype = torch.float32):
    """The stage's model on ``dev``, its trainables and LM in ``dtype`` (what the engine runs them in)."""
    from msmedcap.models import build_model

    cfg = copy.deepcopy(cfg)
    cfg.model.lm.dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    model = build_model(cfg.model, with_lm=stage == 2)
    for _, p in model.trainable_named_parameters():
        p.data = p.data.to(dtype)
    return model.to(dev)


# --------------------------------------------------------------------------- preflight (msmedcap train)
def _elem(params) -> int:
    return next(iter(params)).element_size()


def plan_before_engine(model, cfg, stage: int, world_size: int, dev: torch.device, memory_gib: float, precision: str,
                       peak_tflops: float = 1.0, mfu: float = 1.0) -> StagePlan:
    """The plan of this stage on this device, measured on the model before its engine is built: its
    trainables cast for the measurement as the engine will cast them, then given back their values; each
    measured batch holds a caption of :data:`LONGEST_CAPTION_TOKENS`."""
    from msmedcap.bench.common import CAPTIONS

    dtype = measurement_dtype(dev, precision)
    params = model.trainable_named_parameters()
    kept = [p.data for _, p in params]
    try:
        for _, p in params:
            p.data = p.data.to(dtype)
        captions = captions_with_longest(cfg, stage, LONGEST_CAPTION_TOKENS, CAPTIONS)
        measured = measure_stage(model, cfg, stage, (2, 4), dev, captions)  # even: the same domain mix
    finally:
        for (_, p), data in zip(params, kept):
            p.data = data
    return plan_stage(model, cfg, stage, measured, world_size, memory_gib, peak_tflops, mfu, precision,
                      frozen_elem=_elem(model.encoders.parameters()), act_scale=ELEMENT[precision] / dtype.itemsize,
                      enc_scale=1.0)


def preflight(model, cfg, stage: int, world_size: int, dev: torch.device, memory_gib: float, precision: str) -> dict:
    """:func:`plan_before_engine` for ``msmedcap train``: a micro batch that cannot fit is a ConfigError
    naming the largest that does and the accumulation that keeps the global batch."""
    from msmedcap.config import ConfigError

    plan = plan_before_engine(model, cfg, stage, world_size, dev, memory_gib, precision)
    summary = plan.to_dict()
    if not summary["fits"]:
        micro, accum, _ = stage_settings(cfg, stage)
        largest = summary["largest_micro_batch"]
        key = f"train.stage{stage}"
        if not largest:
            raise ConfigError(f"{key}: even micro batch 1 needs {plan.peak_bytes(1) / GIB:.2f} GiB per rank, more "
                              f"than the {plan.budget / GIB:.2f} GiB usable of {memory_gib:g} GiB")
        keep = math.ceil(micro * accum / largest)
        raise ConfigError(
            f"{key}.micro_batch_size={micro} needs ~{summary['peak_gib_at_micro_batch']:.2f} GiB per rank, more than "
            f"the {plan.budget / GIB:.2f} GiB usable of {memory_gib:g} GiB; the largest that fits is {largest}: set "
            f"{key}.micro_batch_size={largest} {key}.grad_accum={keep} to keep the global batch "
            f"({micro * accum} per rank; `msmedcap plan` shows the whole estimate)")
    return summary


def plan_config(cfg, stages: tuple, gpus: int, targets: list, mfu: float, dev: torch.device,
                sizes: tuple = (2, 4, 8), precision: str = "bf16", captions=None, caption_tokens: int = 0,
                log=print) -> list:
    """Measure ``cfg``'s stages on ``dev`` (one model per stage, released before the next) and plan them
    for each GPU of ``targets``: frozen encoders in fp16 unless ``model.frozen_dtype`` names another
    dtype, the LM and the trainables' activations in ``precision``. Returns StagePlans."""
    import gc
    import time

    from msmedcap.models.encoders import DTYPES

    target_frozen = DTYPES[cfg.model.frozen_dtype].itemsize if cfg.model.frozen_dtype != "auto" else 2
    plans = []
    for stage in stages:
        t = time.time()
        model = build_for_stage(cfg, stage, dev, measurement_dtype(dev, precision))
        pool = captions_with_longest(cfg, stage, caption_tokens, captions) if caption_tokens else captions
        measured = measure_stage(model, cfg, stage, sizes, dev, pool)
        log(f"{cfg.model.variant} stage {stage}: measured at micro batch {', '.join(map(str, sizes))} on {dev.type} "
            f"in {time.time() - t:.0f} s")
        work = _elem(p for _, p in model.trainable_named_parameters())
        for gpu in targets:
            plan = plan_stage(model, cfg, stage, measured, gpus, gpu.memory_gib, gpu.peak_tflops, mfu, precision,
                              frozen_elem=target_frozen, act_scale=ELEMENT[precision] / work,
                              enc_scale=target_frozen / _elem(model.encoders.parameters()))
            plan.gpu = gpu.name
            plans.append(plan)
        del model
        gc.collect()
    return plans


def host_memory(cfg, stages: tuple, ranks_per_node: int) -> list:
    """Per stage: one data worker's memory and the node's /dev/shm need (msmedcap.data.memory)."""
    from msmedcap.data.memory import shm_need_bytes, worker_memory

    out = []
    for stage in stages:
        w = worker_memory(cfg, stage)
        out.append({"stage": stage, **w, "worker_gib": w["total_bytes"] / GIB, "workers": cfg.data.num_workers,
                    "ranks_per_node": ranks_per_node, "shm_need_gib": shm_need_bytes(cfg, stage, ranks_per_node) / GIB})
    return out


def resolve_gpu(name: Optional[str], memory_gib: Optional[float], peak_tflops: Optional[float]) -> Gpu:
    from msmedcap.config import ConfigError

    base = GPUS.get((name or "h100").lower())
    if base is None:
        raise ConfigError(f"--gpu {name}: known GPUs are {', '.join(GPUS)} (or give --gpu-mem and --peak-tflops)")
    return Gpu(base.name if memory_gib is None and peak_tflops is None else f"{base.name} (overridden)",
               memory_gib if memory_gib is not None else base.memory_gib,
               peak_tflops if peak_tflops is not None else base.peak_tflops)


# --------------------------------------------------------------------------- command line
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="memory and time of a config on GPUs, before launching it",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", default="paper", metavar="PRESET_OR_YAML")
    p.add_argument("--gpus", type=int, default=8, help="ranks (GPUs) in all (default 8)")
    p.add_argument("--gpu", default="h100,h200", help=f"known GPUs, comma-separated: {', '.join(GPUS)}")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GIB", help="override the GPU's memory")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the time (0.35)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="the engine's (bf16)")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--variants", default="", help="comma-separated (default: the config's)")
    p.add_argument("--caption-tokens", type=int, default=LONGEST_CAPTION_TOKENS,
                   help="length of the longest caption in each measured batch (default 123: ROCO's p99, what a "
                        "micro batch of ~100 holds)")
    p.add_argument("--measure", default="2,4,8", help="micro batches measured: the first two fit, the last checks "
                   "(even sizes: the synthetic batches alternate domains, so each holds the same mix)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=run, intermixed=True)


def table(plans: list, console) -> None:
    from rich.table import Table

    unit, size = ("GiB", GIB) if max(p.peak_bytes(p.micro_batch) for p in plans) >= GIB else ("MiB", 2 ** 20)
    g = lambda b: f"{b / size:.2f}"  # noqa: E731
    t = Table(title=f"msmedcap plan ({unit} per rank; activations measured, see docs/benchmarks.md)")
    for col in ("variant", "stage", "GPU", "frozen", "trainables", "ZeRO-2 grads + optim", "act/sample",
                "enc/image", "TFLOP/sample", "micro batch", "peak", "fits", "largest", "accum", "hours", "GPU-h"):
        t.add_column(col, justify="right")
    for p in plans:
        d = p.to_dict()
        s = p.static
        t.add_row(p.variant, str(p.stage), p.gpu, g(s["frozen_weights"]), g(s["trainables"]),
                  g(s["gradients"] + s["master_and_adam"]), g(p.activation_per_sample), g(p.encoder_per_image),
                  f"{p.flops_per_sample / 1e12:.2f}", f"{p.micro_batch}x{p.grad_accum}",
                  g(p.peak_bytes(p.micro_batch)), "yes" if d["fits"] else "[red]no[/red]",
                  str(d["largest_micro_batch"]), str(d["accumulation_for_global_batch"]), f"{d['hours']:.1f}",
                  f"{d['gpu_hours']:.0f}")
    console.print(t)
    for p in plans[:: max(1, len({q.gpu for q in plans}))]:
        c = p.check
        console.print(f"{p.variant} stage {p.stage}: activations at micro batch {c['micro_batch']} measured "
                      f"{c['measured'] / GIB:.3f} GiB, extrapolated from the two smaller {c['predicted'] / GIB:.3f} GiB "
                      f"({100 * c['error']:+.1f} %)")


def run(args) -> int:
    import json
    import sys
    import tempfile
    from pathlib import Path

    from rich.console import Console

    from msmedcap.bench.common import bench_config, captions_from_shards, device
    from msmedcap.config import ConfigError

    console = Console(width=None if sys.stdout.isatty() else 200)
    targets = [resolve_gpu(n, args.gpu_mem, args.peak_tflops) for n in args.gpu.split(",") if n]
    sizes = tuple(int(x) for x in args.measure.split(","))
    if len(sizes) < 2 or sorted(sizes) != list(sizes) or sizes[0] < 1:
        raise ConfigError(f"--measure {args.measure}: at least two increasing micro batches")
    work = tempfile.TemporaryDirectory(prefix="msmedcap-plan-")
    cfg, standins = bench_config(args.config, args.overrides, Path(work.name))
    from msmedcap.bench.common import CAPTIONS

    captions = captions_from_shards(cfg, 256) or CAPTIONS
    dev = device()
    plans = []
    for variant in [v for v in args.variants.split(",") if v] or [cfg.model.variant]:
        vcfg = copy.deepcopy(cfg)
        vcfg.model.variant = variant
        plans += plan_config(vcfg, tuple(int(s) for s in args.stages.split(",")), args.gpus, targets, args.mfu, dev,
                             sizes, args.precision, captions, args.caption_tokens, log=console.print)
    table(plans, console)
    host = host_memory(cfg, tuple(int(s) for s in args.stages.split(",")), min(args.gpus, 8))
    for h in host:
        console.print(f"host, stage {h['stage']}: a data worker holds up to {h['worker_gib']:.2f} GiB (shuffle buffer "
                      f"{h['shuffle_buffer_samples']} x {h['sample_bytes'] / 1e6:.2f} MB ({h['sample_bytes_from']}) + "
                      f"{h['batches_in_flight']} batches x {h['batch_bytes'] / 1e6:.0f} MB); /dev/shm for "
                      f"{h['ranks_per_node']} ranks x {h['workers']} workers: {h['shm_need_gib']:.1f} GiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "config": args.config, "overrides": args.overrides, "random_weight_standins": standins,
            "measured_on": dev.type, "caption_tokens": args.caption_tokens, "gpus": args.gpus, "mfu": args.mfu, "precision": args.precision,
            "reserved_gib": RESERVED_GIB, "fragmentation": FRAGMENTATION,
            "plans": [p.to_dict() for p in plans], "host": host}, indent=2, default=str))
    return 0
