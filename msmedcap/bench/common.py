"""What every benchmark part shares: the device and its peak, the config (random weights where a run
would download), batches, timing, and a DeepSpeed engine of one rank as the trainer builds it
(``to_device`` is msmedcap.train.world's, re-exported)."""
from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from msmedcap.train.world import to_device  # noqa: F401  (the bench parts import it from here)


# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                     "A100": 312.0, "L40S": 362.0, "A10G": 125.0}

# OPT-2.7B's architecture (facebook/opt-2.7b config.json) for a random-init LM of the paper's size.
OPT_2_7B = {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 10240,
            "max_position_embeddings": 2048, "word_embed_proj_dim": 2560, "vocab_size": 50272}
BERT_BASE_VOCAB = 30522


_CLOCK = {"fn": time.perf_counter, "kind": "wall time"}


def use_clock(dev: torch.device) -> str:
    """Time steps with the process's CPU time on a CPU run with one thread: on a shared machine wall
    time counts other processes' load too, CPU time does not. Wall time otherwise (GPUs, many threads)."""
    if dev.type == "cpu" and torch.get_num_threads() == 1:
        _CLOCK.update(fn=time.process_time, kind="process CPU time (1 thread; other processes' load excluded)")
    else:
        _CLOCK.update(fn=time.perf_counter, kind="wall time")
    return _CLOCK["kind"]


def now() -> float:
    return _CLOCK["fn"]()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_tflops(dev: torch.device, given: Optional[float], threads: int) -> dict:
    """The peak MFU is measured against: ``given``; a known GPU's datasheet figure; on CPU a measured
    bf16/fp32 GEMM rate (an estimate, the best this process reaches, not a datasheet peak)."""
    if given:
        return {"tflops": given, "source": "--peak-tflops"}
    name = device_name(dev)
    if dev.type == "cuda":
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return {"tflops": value, "source": f"datasheet dense bf16 ({key})"}
        return {"tflops": None, "source": f"unknown GPU {name!r}: pass --peak-tflops for MFU"}
    return {"tflops": measured_gemm_tflops(dev), "threads": threads,
            "source": "estimate: measured 512^3 GEMM rate on this CPU, best of bf16/fp32"}


def measured_gemm_tflops(dev: torch.device, n: int = 512, repeats: int = 3) -> float:
    """Best rate of an n^3 GEMM in bf16 and fp32 (CPUs without native bf16 run it ~30x slower than fp32:
    n stays small so that the measurement takes seconds there)."""
    best = 0.0
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        a @ b
        for _ in range(repeats):  # the fastest repeat: the one least disturbed by other processes
            start = now()
            a @ b
            best = max(best, 2 * n ** 3 / (now() - start) / 1e12)
    return best


# --------------------------------------------------------------------------- config
def _local(path: Optional[str]) -> bool:
    from msmedcap.config import resolve_asset

    return bool(path) and os.path.exists(resolve_asset(path))


def synthetic_bert_vocab(out: Path, size: int = BERT_BASE_VOCAB) -> Path:
    """A WordPiece vocabulary of bert-base-uncased's size (its special tokens, letters, then fillers):
    the Q-Former's embeddings and ITG head get the paper's shapes without downloading BERT."""
    from transformers import BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,-")
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    words += [f"[unused{i}]" for i in range(size - len(words))]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(out)
    return out


def random_weight_overrides(cfg, workdir: Path) -> list:
    """Overrides replacing every weight or tokenizer that is not a local file by a random-init module of
    the same size (a benchmark measures shapes, not weights): OPT by OPT-2.7B's config when it was
    ``facebook/opt-2.7b``, the Q-Former tokenizer by a bert-base-sized vocabulary; and
    ``model.allow_random_weights=true`` (a frozen part without weights is refused otherwise)."""
    m, out = cfg.model, ["model.allow_random_weights=true"]  # shapes, not weights: frozen parts may be random
    if m.clip.pretrained and not _local(m.clip.pretrained):
        out.append("model.clip.pretrained=null")
    if m.qformer.init_from and not _local(m.qformer.init_from):
        out.append("model.qformer.init_from=null")
    if m.blip2_checkpoint and not _local(m.blip2_checkpoint):
        out.append("model.blip2_checkpoint=null")
    for key, name, hub_standin in (("qformer", m.qformer.tokenizer, lambda: synthetic_bert_vocab(workdir / "bert-vocab")),
                                   ("lm", m.lm.tokenizer, None)):
        if not _local(name):  # a hub name: a stand-in of its size (BERT) or the demo's; a missing pkg:// file: the demo's
            standin = hub_standin() if hub_standin and not name.startswith("pkg://") else demo_tokenizers()[key]
            out.append(f"model.{key}.tokenizer={standin}")
    if m.lm.name_or_path and not _local(m.lm.name_or_path):
        size = OPT_2_7B if "opt-2.7b" in m.lm.name_or_path else None
        if size is None:
            raise ValueError(f"model.lm.name_or_path={m.lm.name_or_path} is not local and its size is unknown "
                             "here: give a local directory or model.lm.config")
        out += ["model.lm.name_or_path=null", "model.lm.config=" + ",".join(
            f"{k}: {v}" for k, v in OPT_2_7B.items()).join("{}")]
    return out


def demo_tokenizers() -> dict:
    """The demo preset's shipped tokenizers (stand-ins for a preset whose tokenizers are not local)."""
    from msmedcap.config import load_config

    demo = load_config("demo", check_files=False).model
    if not (_local(demo.qformer.tokenizer) and _local(demo.lm.tokenizer)):
        raise FileNotFoundError(f"the demo preset's tokenizers are missing from this install ({demo.qformer.tokenizer}, "
                                f"{demo.lm.tokenizer}): reinstall msmedcap, or rebuild them with msmedcap demo shards "
                                "--tokenizers DIR")
    return {"qformer": demo.qformer.tokenizer, "lm": demo.lm.tokenizer}


def bench_config(preset: str, overrides: list, workdir: Path):
    """The preset with overrides; non-local weights and tokenizers become random-init stand-ins."""
    from msmedcap.config import load_config

    cfg = load_config(preset, ["model.allow_random_weights=true", *overrides], check_files=False)
    extra = random_weight_overrides(cfg, workdir)
    return load_config(preset, extra + list(overrides), check_files=False), extra


# --------------------------------------------------------------------------- batches
CAPTIONS = [
    "axial ct of the abdomen showing two small lesions in the left kidney with irregular margins.",
    "two red circles and a blue square on a white background.",
    "chest x-ray showing one large lesion in the right lung with smooth margins.",
    "three green triangles on a black background.",
    "axial mr of the brain showing no lesions.",
    "one yellow square and two purple circles on a grey background.",
]


def captions_from_shards(cfg, n: int) -> list:
    """Real captions (their token lengths matter for step time) from the eval shards, when present."""
    from msmedcap.eval.baseline import shard_captions

    return shard_captions(cfg.data.eval, n, missing_ok=True)


def synthetic_batch(cfg, size: int, captions: Optional[list] = None, seed: int = 0) -> dict:
    """A batch in the msmedcap.batch format: random pixels, real tokenization of real-length captions,
    alternating domains, and ``image_sha256`` keys (distinct per sample and seed)."""
    from msmedcap.models.lm_families import caption_end
    from msmedcap.tokenization import (encode_lm_captions, encode_qformer_text, load_lm_tokenizer,
                                       load_qformer_tokenizer)

    m = cfg.model
    pool = captions or CAPTIONS
    caps = [pool[(seed * size + i) % len(pool)] for i in range(size)]
    g = torch.Generator().manual_seed(seed)
    # both texts as the loader builds them: padded to the batch's longest (the LM's end token always kept)
    q = encode_qformer_text(load_qformer_tokenizer(m.qformer.tokenizer), caps, m.qformer.max_text_len)
    lm_tok = load_lm_tokenizer(m.lm.tokenizer)
    lm = encode_lm_captions(lm_tok, caps, m.lm.max_caption_len, caption_end(m, lm_tok))
    batch = {"key": [f"bench-{seed}-{i}" for i in range(size)], "source": ["bench"] * size, "caption": caps,
             "domain": torch.tensor([i % 2 for i in range(size)]),
             "text_input_ids": q["input_ids"], "text_attention_mask": q["attention_mask"],
             "lm_input_ids": lm["input_ids"], "lm_attention_mask": lm["attention_mask"],
             "image_sha256": [hashlib.sha256(f"bench-{seed}-{i}".encode()).hexdigest() for i in range(size)]}
    for branch in m.branches:
        s = getattr(m, branch).image_size
        batch[f"{branch}_image"] = torch.randn(size, 3, s, s, generator=g)
    return batch


# --------------------------------------------------------------------------- timing and engines
def timed(fn: Callable, dev: torch.device, iters: int, warmup: int) -> float:
    """Seconds of the fastest of ``iters`` runs of ``fn()`` after ``warmup`` runs: on a shared machine
    the fastest run is the one least disturbed by other processes."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, iters)):
        sync(dev)
        start = now()
        fn()
        sync(dev)
        best = min(best, now() - start)
    return best


def packaged_ds_config(cfg, stage: int, world_size: int) -> dict:
    """The packaged copy of ds_configs/zero2.json (an installed wheel has no checkout) filled from
    ``cfg``'s stage for this machine's accelerator."""
    from msmedcap.paths import resolve_asset
    from msmedcap.train.ds_config import read_ds_json
    from msmedcap.train.engine import stage_ds_config

    return stage_ds_config(read_ds_json(Path(resolve_asset("pkg://ds_configs/zero2.json"))), cfg, stage, world_size)


def ds_engine(module: torch.nn.Module, model, cfg, stage: int, zero_stage: int, micro_batch: int):
    """The trainer's engine (msmedcap.train.engine.build_engine: trainable parameters only, its LR
    schedule, frozen parts back in their dtype) on the packaged ds_configs/zero2.json filled from ``cfg``, with ZeRO
    ``zero_stage``, micro batch ``micro_batch`` and no accumulation; a world of one unless a launcher
    set one up."""
    import copy

    from msmedcap.train.engine import build_engine
    from msmedcap.train.world import init_world, single_process_env

    single_process_env()
    world = init_world(cpu_threads=False)  # the bench sets its own thread count
    cfg = copy.deepcopy(cfg)
    st = getattr(cfg.train, f"stage{stage}")
    st.micro_batch_size, st.grad_accum = micro_batch, 1
    ds = packaged_ds_config(cfg, stage, world.size)
    ds["zero_optimization"]["stage"] = zero_stage
    engine, _ = build_engine(model, cfg, stage, ds, module=module)
    return engine, ds


def frozen_dtype_of(cfg) -> torch.dtype:
    from msmedcap.models.encoders import frozen_dtype

    return frozen_dtype(cfg.model.frozen_dtype)
