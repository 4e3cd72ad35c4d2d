"""`msmedcap caption IMAGE...`: caption image files with a trained export, batched, with the same
per-encoder transforms as the data pipeline (msmedcap.data.transforms) and cfg.eval's generation
settings."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from msmedcap.batch import DOMAIN_INDEX


class CaptionError(ValueError):
    """Bad input to `msmedcap caption`: names the file or checkpoint."""


def images_to_batch(images: Sequence, keys: Sequence[str], transforms: dict) -> dict:
    """PIL images -> a batch (msmedcap.batch) with the image tensors the model's branches need.
    Files carry no domain; "medical" only matters for stage-1 routing, not for generation."""
    batch = {"key": list(keys), "source": ["user"] * len(keys), "caption": [""] * len(keys),
             "domain": torch.full((len(keys),), DOMAIN_INDEX["medical"], dtype=torch.long)}
    for name, transform in transforms.items():
        batch[name] = torch.stack([transform(im) for im in images])
    return batch


def caption_files(paths: Sequence[str], checkpoint: str, overrides: Sequence[str] = (),
                  batch_size: Optional[int] = None, device: Optional[str] = None) -> list:
    """-> [(path, caption)] in the order given. Every file is read (and checked) before the model
    loads, so a bad file fails in a second, not after the model build."""
    from msmedcap.config import ConfigError
    from msmedcap.data.transforms import encoder_transforms
    from msmedcap.eval.checkpoints import CheckpointError, apply_overrides, find_export
    from msmedcap.eval.evaluate import generation_kwargs, to_device
    from msmedcap.eval.images import ImageReadError, load_image

    if batch_size is not None and batch_size < 1:
        raise CaptionError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        images = [load_image(p) for p in paths]
    except ImageReadError as e:
        raise CaptionError(str(e)) from None
    try:
        export = find_export(checkpoint)
        from msmedcap.models import load_from_export

        model, cfg = load_from_export(export)
        cfg = apply_overrides(cfg, overrides)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        raise CaptionError(f"checkpoint {checkpoint}: {e}") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    transforms = encoder_transforms(cfg)
    bs = batch_size or cfg.eval.batch_size
    captions = []
    with torch.no_grad():
        for i in range(0, len(images), bs):
            batch = images_to_batch(images[i:i + bs], [str(p) for p in paths[i:i + bs]], transforms)
            captions += model.generate(to_device(batch, dev), **generation_kwargs(cfg))
    return list(zip(map(str, paths), captions))
