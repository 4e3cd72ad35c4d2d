"""Paper-size shards for the loader benchmark, generated here (nothing downloaded): figures of the
sizes ROCO/MedICaT hold (~700 x 500) and photo-sized ones (~2000 x 1500), RGB and greyscale, JPEG
and PNG, in equal shares. The pixels are a smooth field with a few bright/dark blobs and sensor-like
noise, so PNG compresses (and decodes) like a real scan or figure, not like white noise or a flat page.
"""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (width, height) x mode x format, cycled through in this order
SIZES = ((700, 500), (2000, 1500))
MODES = ("RGB", "L")
FORMATS = ("JPEG", "PNG")
KINDS = list(itertools.product(SIZES, MODES, FORMATS))
# ROCO / MedICaT figures alone: ~700 x 500 PNG, RGB and grey
FIGURE_KINDS = list(itertools.product(SIZES[:1], MODES, ("PNG",)))


def figure(index: int, size: tuple, mode: str) -> Image.Image:
    """One synthetic figure, reproducible from ``index``; ``size`` jittered by up to 5 %."""
    rng = np.random.default_rng(index)
    w, h = (int(s * rng.uniform(0.95, 1.05)) for s in size)
    chans = 3 if mode == "RGB" else 1
    # a low-frequency field: a coarse random grid upsampled bicubically
    coarse = rng.uniform(40, 200, (6, 8, chans)).astype(np.uint8)
    img = Image.fromarray(coarse.squeeze(-1) if chans == 1 else coarse).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):  # lesion-like blobs
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.15) * min(w, h)
        value = int(rng.integers(0, 256))
        draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r), fill=(value,) * chans if chans == 3 else value)
    img = img.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img).astype(np.int16)
    arr = arr + rng.normal(0, 4, arr.shape).astype(np.int16)  # sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode)


def encoded(index: int, kinds: list = KINDS) -> tuple:
    """(extension, bytes, kind) of sample ``index``, cycling through ``kinds``."""
    size, mode, fmt = kinds[index % len(kinds)]
    buf = io.BytesIO()
    image = figure(index, size, mode)
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG", compress_level=6)
    return ("jpg" if fmt == "JPEG" else "png"), buf.getvalue(), f"{size[0]}x{size[1]} {mode} {fmt}"


def paper_size_shards(out_dir, n: int = 240, shard_size: int = 40, kinds: list = KINDS) -> str:
    """Write (once; reused when ``out_dir`` already holds the same set) ``n`` samples of ``kinds``;
    returns the shard pattern with a domain spec, ready for ``data.train``."""
    from msmedcap.data.shards import write_shards

    out = Path(out_dir)
    stamp = out / "loader_images.json"
    want = {"n": n, "shard_size": shard_size, "kinds": [list(map(str, k)) for k in kinds], "version": 1}
    shards = (n + shard_size - 1) // shard_size
    pattern = f"{out}/paper-{{000..{shards - 1:03d}}}.tar::1::medical::bench"
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return pattern

    def samples():
        for i in range(n):
            ext, data, kind = encoded(i, kinds)
            yield {"__key__": f"paper-{i:05d}", ext: data, "txt": f"synthetic figure {i}: {kind}",
                   "json": {"domain": "medical", "source": "bench", "kind": kind}}

    write_shards(samples(), out, "paper", shard_size=shard_size)
    stamp.write_text(json.dumps(want))
    return pattern
