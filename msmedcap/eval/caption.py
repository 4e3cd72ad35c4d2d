"""`msmedcap caption IMAGE...`: caption image files with a trained export, batched, with the same
per-encoder transforms as the data pipeline (msmedcap.data.transforms) and cfg.eval's generation
settings."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from msmedcap.batch import DOMAIN_INDEX


class CaptionError(ValueError):
    """Bad input to `msmedcap caption`: names the file or checkpoint."""


def read_image(path, max_pixels: int):
    """PNG/JPEG (anything PIL reads) or DICOM (``.dcm``, converted exactly as `msmedcap shards write`
    converts it for training: modality LUT, the file's window, 8-bit grey) -> RGB PIL image."""
    import io

    from PIL import Image

    from msmedcap.data.sources import SourceError, load_image_file

    try:
        data, _ = load_image_file(path, max_pixels)
        return Image.open(io.BytesIO(data)).convert("RGB")
    except FileNotFoundError:
        raise CaptionError(f"{path}: no such file") from None
    except (ValueError, SourceError) as e:
        raise CaptionError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def images_to_batch(images: Sequence, keys: Sequence[str], transforms: dict) -> dict:
    """PIL images -> a batch (msmedcap.batch) with the image tensors the model's branches need.
    Files carry no domain; "medical" only matters for stage-1 routing, not for generation."""
    batch = {"key": list(keys), "source": ["user"] * len(keys), "caption": [""] * len(keys),
             "domain": torch.full((len(keys),), DOMAIN_INDEX["medical"], dtype=torch.long)}
    from msmedcap.data.transforms import images_batch

    batch.update(images_batch(images, transforms))  # uint8, as the loader's; normalised in the encoders
    return batch


def caption_files(paths: Sequence[str], checkpoint: str, overrides: Sequence[str] = (),
                  batch_size: Optional[int] = None, device: Optional[str] = None) -> list:
    """-> [(path, caption)] in the order given. Every file is read (and checked) before the model
    loads, so a bad file fails in a second, not after the model build."""
    from msmedcap.config import ConfigError, DataConfig
    from msmedcap.data.transforms import encoder_transforms
    from msmedcap.eval.checkpoints import CheckpointError, find_export, load_for_eval
    from msmedcap.eval.evaluate import generation_kwargs, to_device

    if batch_size is not None and batch_size < 1:
        raise CaptionError(f"--batch-size must be >= 1, got {batch_size}")
    images = [read_image(p, DataConfig().max_image_pixels) for p in paths]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, cfg = load_for_eval(find_export(checkpoint), overrides, dev, check_shards=False)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        raise CaptionError(f"checkpoint {checkpoint}: {e}") from None
    transforms = encoder_transforms(cfg)
    bs = batch_size or cfg.eval.batch_size
    captions = []
    with torch.no_grad():
        for i in range(0, len(images), bs):
            batch = images_to_batch(images[i:i + bs], [str(p) for p in paths[i:i + bs]], transforms)
            captions += model.generate(to_device(batch, dev), **generation_kwargs(cfg))
    return list(zip(map(str, paths), captions))
