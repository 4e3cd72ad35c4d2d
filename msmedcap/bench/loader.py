"""Loader benchmark (``msmedcap bench --parts loader``, launch/bench_loader.py): samples/s of msmedcap's train loader vs a plain loop over the same tars.

    python launch/bench_loader.py [--preset demo] [--workers 2] [--batches 100] [key=value ...]
    python launch/bench_loader.py --paper-sizes [--samples 240] [--data-dir DIR] [--repeats 3]

- ``msmedcap``: make_train_loader (resampling, mixing, shuffle buffer, decode, per-encoder resize to
  uint8, tokenisation, batching), the configured preset's batch size and image sizes.
- ``msmedcap device resize``: the same with ``data.resize_on_device=true`` (workers only decode; the
  encoders' resize then runs in the model's input path: ``device_resize_s_per_batch`` times it here).
- ``plain decode``: a DataLoader over the same shard files with the same number of workers; each
  worker reads its share of the tars with ``tarfile`` and decodes every image with PIL to RGB. No
  transforms or tokens: the floor of what any loader must do.
- ``plain + transforms``: the same loop plus the same per-encoder images (same transform objects),
  so the difference to ``msmedcap`` is the pipeline's own overhead.

``--paper-sizes``: the paper's encoder sizes (CLIP 224, SAM 1024; overrides after it still apply) on
generated shards of ~700 x 500 and ~2000 x 1500 RGB/grey JPEG/PNG figures (msmedcap.bench.loader_images;
written once to ``--data-dir`` and reused). Reported: samples/s (and per worker), bytes per sample
that cross the worker boundary (the batch's tensors), and the ratios. ``--repeats N`` runs every
loader N times (interleaved) and reports the medians: the machine may be shared.

The first batch (worker start, shuffle-buffer fill) is excluded from every timing.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msmedcap.config import load_config
from msmedcap.data.loader import make_train_loader, parse_specs
from msmedcap.data.transforms import encoder_transforms

PAPER_SIZES = ["model.clip.image_size=224", "model.sam.image_size=1024"]
DATA_DIR = "runs/bench/loader-paper-images"


def _apply(transform, image):
    """The transform's worker-side output: uint8 pixels where it has them (``pixels``), else its tensor."""
    return getattr(transform, "pixels", transform)(image)


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
                            yield {k: _apply(t, image) for k, t in self.transforms.items()}
                        else:
                            yield image.size


def _array(x):
    return x.numpy() if torch.is_tensor(x) else np.asarray(x)


def _collate(samples):
    if isinstance(samples[0], dict):  # stacked as msmedcap's collate does (numpy, no torch thread pool)
        try:
            from msmedcap.data.transforms import stack_pixels
        except ImportError:  # a checkout before uint8 batches (issue 11): float tensors, one size
            stack_pixels = None
        out = {}
        for k in samples[0]:
            arrays = [_array(s[k]) for s in samples]
            if stack_pixels is not None:
                out[k], out[f"{k}_size"] = stack_pixels(arrays)
                continue
            shape = np.max([a.shape for a in arrays], axis=0)
            batch = np.zeros((len(arrays), *shape), arrays[0].dtype)
            for i, a in enumerate(arrays):
                batch[(i, *map(slice, a.shape))] = a
            out[k] = torch.from_numpy(batch)
        return out
    return samples


def batch_bytes(batch) -> int:
    """Bytes of the tensors in a batch: what crosses the worker boundary (shared memory)."""
    if isinstance(batch, dict):
        return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
    return 0


def measure(loader, batches: int, batch_size: int) -> dict:
    it = iter(loader)
    next(it)  # warm-up: worker start, buffers
    nbytes = 0
    start = time.perf_counter()
    for _ in range(batches):
        nbytes += batch_bytes(next(it))
    elapsed = time.perf_counter() - start
    return {"samples_per_s": batches * batch_size / elapsed, "bytes_per_sample": nbytes / (batches * batch_size)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=None, help="timed batches per loader (default 100; 15 with "
                                                            "--paper-sizes)")
    ap.add_argument("--paper-sizes", action="store_true", help="CLIP 224 / SAM 1024 on generated paper-size images")
    ap.add_argument("--samples", type=int, default=240, help="--paper-sizes: samples generated")
    ap.add_argument("--figures-only", action="store_true",
                    help="--paper-sizes: ~700 x 500 PNG figures alone (ROCO/MedICaT), not mixed with photo sizes")
    ap.add_argument("--data-dir", default=DATA_DIR, help="--paper-sizes: where they go")
    ap.add_argument("--repeats", type=int, default=1, help="runs per loader; medians reported")
    ap.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return ap


def loader_bench(preset: str = "demo", overrides=(), workers: int = 2, batches=None, paper_sizes: bool = False,
                 samples: int = 240, data_dir: str = DATA_DIR, repeats: int = 1, figures_only: bool = False) -> dict:
    """The three loaders' rates (medians over ``repeats``), bytes per sample and ratios."""
    overrides = list(overrides)
    if paper_sizes:
        overrides = PAPER_SIZES + overrides
    # only the data section is used: a preset's frozen parts need no weights here
    cfg = load_config(preset, overrides + [f"data.num_workers={workers}", "model.allow_random_weights=true"],
                      check_files=not paper_sizes)
    if paper_sizes:
        from msmedcap.bench.loader_images import FIGURE_KINDS, KINDS, paper_size_shards

        where = str(Path(data_dir) / "figures") if figures_only else data_dir
        cfg.data.train = [paper_size_shards(where, samples, kinds=FIGURE_KINDS if figures_only else KINDS)]
    batches = batches or (15 if paper_sizes else 100)
    batch_size = cfg.train.stage1.micro_batch_size
    urls = [u for shard_set in parse_specs(cfg.data.train) for u in shard_set.urls]

    import copy

    dev_cfg = copy.deepcopy(cfg)
    dev_cfg.data.resize_on_device, dev_cfg.data.jpeg_draft = True, 0.0
    loaders = {
        "msmedcap": lambda: make_train_loader(cfg, 1, 0, 1),
        "msmedcap device resize": lambda: make_train_loader(dev_cfg, 1, 0, 1),
        "plain decode": lambda: DataLoader(PlainTars(urls, None), batch_size=batch_size, num_workers=workers,
                                           collate_fn=_collate),
        "plain + transforms": lambda: DataLoader(PlainTars(urls, encoder_transforms(cfg)), batch_size=batch_size,
                                                 num_workers=workers, collate_fn=_collate),
    }
    runs = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, make in loaders.items():
            runs[name].append(measure(make(), batches, batch_size))
    rate = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in runs.items()}
    return {
        "workers": workers, "batch_size": batch_size, "batches": batches, "repeats": repeats,
        "paper_sizes": paper_sizes, "figures_only": figures_only, "overrides": overrides,
        "samples_per_s": {k: round(v, 1) for k, v in rate.items()},
        "samples_per_s_per_worker": {k: round(v / max(workers, 1), 1) for k, v in rate.items()},
        "samples_per_s_runs": {k: [round(r["samples_per_s"], 1) for r in v] for k, v in runs.items()},
        "bytes_per_sample": {k: int(statistics.median(r["bytes_per_sample"] for r in v))
                             for k, v in runs.items() if k != "plain decode"},
        "ratio_vs_plain_decode": round(rate["msmedcap"] / rate["plain decode"], 3),
        # each repeat's loaders ran back to back, under the same load: their ratio per repeat, and its median
        "ratio_vs_plain_decode_runs": [round(a["samples_per_s"] / b["samples_per_s"], 3)
                                       for a, b in zip(runs["msmedcap"], runs["plain decode"])],
        "ratio_vs_plain_transforms": round(rate["msmedcap"] / rate["plain + transforms"], 3),
        "device_resize_ratio_vs_plain_decode": round(rate["msmedcap device resize"] / rate["plain decode"], 3),
        "device_resize_ratio_vs_plain_decode_runs": [round(a["samples_per_s"] / b["samples_per_s"], 3) for a, b in
                                                     zip(runs["msmedcap device resize"], runs["plain decode"])],
        "device_resize_s_per_batch": device_resize_cost(dev_cfg),
    }


def device_resize_cost(cfg, batches: int = 3) -> dict:
    """The model-side half of data.resize_on_device: seconds per batch of every encoder's resize
    (``resize_pending``) on this machine's CPU (one thread, as a rank's main process runs it here)
    and on CUDA when present; median over ``batches`` batches."""
    from msmedcap.data.transforms import resize_pending

    transforms = encoder_transforms(cfg)
    it = iter(make_train_loader(cfg, 1, 0, 1))
    samples = [next(it) for _ in range(batches)]
    out = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        times = []
        for batch in samples:
            b = {k: v for k, v in batch.items() if k not in transforms}
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            resize_pending(b, transforms, dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[dev] = round(statistics.median(times), 4)
    out["threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = loader_bench(args.preset, args.overrides, args.workers, args.batches, args.paper_sizes, args.samples,
                          args.data_dir, args.repeats, args.figures_only)
    print(json.dumps(report, indent=1))
    return 0
