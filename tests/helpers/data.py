"""Small real shards and configs for the data tests (not a test module)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from msmedcap.config import load_config
from msmedcap.data.shards import write_shards


def png_bytes(index: int, size=(12, 10), mode="RGB") -> bytes:
    """A small image whose pixels encode ``index`` (so identity is checkable)."""
    rng = np.random.default_rng(index)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def sample(key: str, index: int, domain: str = "general", source: str = "src", **meta) -> dict:
    return {"__key__": key, "png": png_bytes(index), "txt": f"caption number {index} of {key}",
            "json": {"domain": domain, "source": source, "id": key, **meta}}


def make_shards(out_dir, prefix: str, n: int, shard_size: int, domain: str = "general", source: str | None = None,
                start: int = 0) -> str:
    """Write ``n`` samples keyed PREFIX-i; return the brace pattern of the shards written."""
    names = write_shards((sample(f"{prefix}-{i:05d}", start + i, domain, source or prefix) for i in range(n)),
                         out_dir, prefix, shard_size=shard_size)
    return f"{out_dir}/{prefix}-{{000..{len(names) - 1:03d}}}.tar"


def tiny_config(train: list | None = None, eval: list | None = None, **overrides):
    """The demo preset (demo tokenizers) with tiny image sizes; ``overrides`` as section__key=value."""
    ov = ["model.clip.image_size=16", "model.sam.image_size=24", "data.num_workers=0", "data.shuffle_buffer=20",
          "data.segment_batches=4", "train.stage1.micro_batch_size=4", "train.stage2.micro_batch_size=4"]
    ov += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    cfg = load_config("demo", ov, check_files=False)
    cfg.data.train = train or []
    cfg.data.eval = eval or []
    return cfg
