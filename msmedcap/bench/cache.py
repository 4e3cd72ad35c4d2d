"""Frozen-feature cache: its effect on the stage-2 step, its disk cost, and when it pays off.

Same model, batch and engine config twice: encoders computed every step, then every encoder output
served from a filled cache (``msmedcap.models.feature_cache``). Also measured alone: the encoders'
time per sample and the cache's read time per sample, which give the read bandwidth above which the
cache beats recomputing. The first pass over the data costs encoder time plus the write.
"""
from __future__ import annotations

import tempfile

import torch

from msmedcap.bench.common import now, sync, to_device
from msmedcap.bench.step import bench_step

MIB = 2 ** 20


def feature_bytes(model) -> dict:
    """Bytes one image's cached features take, per branch."""
    return {b: e.num_tokens * e.width * torch.tensor([], dtype=e.dtype).element_size()
            for b, e in model.encoders.items()}


def bench_feature_cache(cfg, batch: dict, dev, iters: int, warmup: int, peak: dict, cache_dir=None) -> dict:
    from msmedcap.models import build_model
    from msmedcap.models.feature_cache import attach_feature_cache

    model = build_model(cfg.model).to(dev)
    plain = bench_step(model, cfg, 2, batch, dev, iters, warmup, peak, label=f"{cfg.model.variant} encoders")
    inputs = to_device(batch, dev)
    n = len(batch["key"])

    def encoders():
        with torch.no_grad():
            for b in model.branches:
                model.encoders[b](inputs[f"{b}_image"], inputs.get(f"{b}_image_size"))

    sync(dev)
    t = now()
    encoders()
    sync(dev)
    encoder_s = (now() - t) / n

    with tempfile.TemporaryDirectory(dir=cache_dir) as root:
        cache = attach_feature_cache(model, root)
        t = now()
        for b in model.branches:  # the first epoch: every sample a miss, computed and written
            model.encode(inputs, b)
        sync(dev)
        fill_s = (now() - t) / n
        t = now()
        for b in model.branches:
            cache.stores[b].get(batch["image_sha256"])
        read_s = (now() - t) / n
        hits_before = sum(cache.hits.values())
        cached = bench_step(model, cfg, 2, batch, dev, iters, warmup, peak, label=f"{cfg.model.variant} cached")
        served = sum(cache.hits.values()) - hits_before
        misses = sum(cache.misses.values())
        model.feature_cache = None
    per_image = feature_bytes(model)
    total = sum(per_image.values())
    return {
        "variant": cfg.model.variant, "micro_batch": n, "encoders": plain, "cached": cached,
        "speedup": cached["samples_per_s"] / plain["samples_per_s"],
        "hits_during_cached_steps": served, "misses_total": misses,
        "bytes_per_image": per_image, "mib_per_image": total / MIB, "tib_per_million_images": total * 1e6 / 2 ** 40,
        "encoder_s_per_image": encoder_s, "fill_s_per_image": fill_s, "read_s_per_image": read_s,
        # the cache wins when reading an image's features is faster than computing them
        "break_even_read_mb_s": total / encoder_s / 1e6,
    }


def paper_feature_sizes() -> dict:
    """Per-image cache size at the paper's settings, from the encoders' shapes (fp16)."""
    sam = 256 * 64 * 64 * 2      # SAM vit_b neck: 256 channels x 64 x 64 at 1024 px
    clip = 257 * 1408 * 2        # EVA01-g-14 penultimate block at 224 px: 257 tokens x 1408
    return {"sam_vit_b_1024_mib": sam / MIB, "eva01_g14_224_mib": clip / MIB, "msmedcap_mib": (sam + clip) / MIB}
