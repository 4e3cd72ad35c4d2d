#!/usr/bin/env python
"""Loader benchmark: samples/s of msmedcap's train loader vs a plain loop over the same tars.

    python launch/bench_loader.py [--preset demo] [--workers 2] [--batches 100] [key=value ...]

- ``msmedcap``: make_train_loader (resampling, mixing, shuffle buffer, decode, per-encoder transforms,
  tokenisation, batching), the configured preset's batch size and image sizes.
- ``plain decode``: a DataLoader over the same shard files with the same number of workers; each
  worker reads its share of the tars with ``tarfile`` and decodes every image with PIL to RGB. No
  transforms or tokens: the floor of what any loader must do.
- ``plain + transforms``: the same loop plus the same CLIP/SAM tensors (same transform objects), so the
  difference to ``msmedcap`` is the pipeline's own overhead.

The first batch (worker start, shuffle-buffer fill) is excluded from every timing.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import tarfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msmedcap.config import load_config
from msmedcap.data.loader import make_train_loader, parse_specs
from msmedcap.data.transforms import encoder_transforms


class PlainTars(IterableDataset):
    def __init__(self, urls: list, transforms: dict | None):
        super().__init__()
        self.urls, self.transforms = urls, transforms

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in itertools.cycle(self.urls[worker::workers] or self.urls):
            with tarfile.open(url) as tar:
                for member in tar:
                    if member.name.endswith((".jpg", ".png")):
                        image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                        if self.transforms:
                            yield {k: t(image) for k, t in self.transforms.items()}
                        else:
                            yield image.size


def _collate(samples):
    if isinstance(samples[0], dict):  # stacked as msmedcap's collate does (numpy, no torch thread pool)
        return {k: torch.from_numpy(np.stack([s[k].numpy() for s in samples])) for k in samples[0]}
    return samples


def measure(loader, batches: int, batch_size: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: worker start, buffers
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = ap.parse_args()
    cfg = load_config(args.preset, args.overrides + [f"data.num_workers={args.workers}"])
    batch_size = cfg.train.stage1.micro_batch_size
    urls = [u for shard_set in parse_specs(cfg.data.train) for u in shard_set.urls]

    results = {"msmedcap": measure(make_train_loader(cfg, 1, 0, 1), args.batches, batch_size)}
    for name, transforms in (("plain decode", None), ("plain + transforms", encoder_transforms(cfg))):
        plain = DataLoader(PlainTars(urls, transforms), batch_size=batch_size, num_workers=args.workers,
                           collate_fn=_collate)
        results[name] = measure(plain, args.batches, batch_size)
    report = {
        "workers": args.workers, "batch_size": batch_size, "batches": args.batches,
        "samples_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_vs_plain_decode": round(results["msmedcap"] / results["plain decode"], 3),
        "ratio_vs_plain_transforms": round(results["msmedcap"] / results["plain + transforms"], 3),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
