"""A shard of five small images of every kind the loader meets (landscape, portrait, grey; JPEG and
PNG), and the loader's batch of it (tests/unit/test_data_uint8.py, test_data_device_resize.py,
tests/integration/test_feature_cache_workers.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from msmedcap.data.loader import make_eval_loader
from msmedcap.data.shards import write_shards


# (w, h, mode, format): landscape, portrait, grey, JPEG and PNG in one batch
IMAGES = [(71, 53, "RGB", "PNG"), (40, 90, "RGB", "JPEG"), (64, 48, "L", "PNG"), (50, 50, "L", "JPEG"),
          (120, 80, "RGB", "JPEG")]


def encoded(i: int, w: int, h: int, mode: str, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 / w + yy * 100 / h)[..., None] + rng.normal(0, 20, (h, w, 3))
    arr = np.clip(base, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr if mode == "RGB" else arr[..., 0], mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("uint8")
    samples = []
    for i, (w, h, mode, fmt) in enumerate(IMAGES):
        ext = "jpg" if fmt == "JPEG" else "png"
        samples.append({"__key__": f"u-{i}", ext: encoded(i, w, h, mode, fmt), "txt": f"image {i}",
                        "json": {"domain": "medical", "source": "t"}})
    write_shards(samples, out, "u", shard_size=10)
    return str(out / "u-000.tar")


def one_batch(cfg, shard):
    (batch,) = list(make_eval_loader(cfg, [shard], 0, 1, batch_size=len(IMAGES)))
    return batch
