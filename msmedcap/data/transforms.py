"""Per-encoder image transforms, each from the ORIGINAL decoded image (never one re-normalised
from the other), with the encoders' own preprocessing:

- CLIP: open_clip's eval transform (bicubic resize of the shorter side, center crop, CLIP mean/std).
- SAM: segment-anything's ResizeLongestSide, then ``Sam.preprocess``'s normalisation (SAM mean/std)
  and zero padding to a square at the bottom/right.

Both are computed with PIL + numpy rather than by calling the libraries' torchvision pipelines: the
same numbers (tests compare them with open_clip's and segment-anything's own), several times faster.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from msmedcap.batch import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD


@lru_cache(maxsize=4)
def _lookup(mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: ((v / 255) - mean[c]) / std[c] for every uint8 value v."""
    values = np.arange(256, dtype=np.float32)[None, :] / np.float32(255)
    return (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def _normalised(pixels: np.ndarray, mean: tuple, std: tuple, pad_to: int = 0) -> torch.Tensor:
    """uint8 HxWx3 -> float CxHxW, ((x / 255) - mean) / std, zero-padded bottom/right to ``pad_to``.
    One table lookup per channel in numpy: on small images torch's per-op and thread-pool overheads
    dominate (tens of ms per op on a busy machine), and a lookup beats the arithmetic."""
    h, w = pixels.shape[:2]
    table = _lookup(mean, std)
    out = np.zeros((3, max(h, pad_to), max(w, pad_to)), np.float32)
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=out[c, :h, :w])
    return torch.from_numpy(out)


class ClipTransform:
    """open_clip's eval transform (``image_transform(size, is_train=False)``: bicubic Resize of the
    shorter side, CenterCrop, ToTensor, Normalize), computed with PIL + numpy; equal to it to float
    rounding (tested)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        s = self.size
        # torchvision's Resize(int): the shorter side becomes s, the longer int(s * long / short)
        new = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if new != (w, h):
            image = image.resize(new, Image.BICUBIC)
        left, top = int(round((new[0] - s) / 2.0)), int(round((new[1] - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
        return _normalised(np.asarray(image.convert("RGB")), CLIP_MEAN, CLIP_STD)


class SamTransform:
    """segment-anything's ResizeLongestSide (bilinear PIL resize of the longer side to ``size``) and
    ``Sam.preprocess`` (normalise with SAM mean/std, zero-pad bottom/right to size x size)."""

    def __init__(self, size: int):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.size = size
        self.shape = ResizeLongestSide.get_preprocess_shape

    def __call__(self, image: Image.Image) -> torch.Tensor:
        h, w = self.shape(image.height, image.width, self.size)
        if (w, h) != image.size:
            image = image.resize((w, h), Image.BILINEAR)
        return _normalised(np.asarray(image.convert("RGB")), SAM_MEAN, SAM_STD, pad_to=self.size)


def encoder_transforms(cfg) -> dict:
    """{"clip_image": ClipTransform, "sam_image": SamTransform} for the branches of ``cfg.model``."""
    out = {}
    if "clip" in cfg.model.branches:
        out["clip_image"] = ClipTransform(cfg.model.clip.image_size)
    if "sam" in cfg.model.branches:
        out["sam_image"] = SamTransform(cfg.model.sam.image_size)
    return out
