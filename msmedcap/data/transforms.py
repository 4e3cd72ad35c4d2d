"""Per-encoder image transforms, each from the ORIGINAL decoded image (never one re-normalised
from the other), with the encoders' own preprocessing:

- CLIP: open_clip's eval transform (bicubic resize of the shorter side, center crop, CLIP mean/std).
- SAM: segment-anything's ResizeLongestSide, then ``Sam.preprocess``'s normalisation (SAM mean/std)
  and zero padding to a square at the bottom/right.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from msmedcap.batch import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD


class ClipTransform:
    def __init__(self, size: int):
        from open_clip.transform import image_transform

        self.transform = image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


class SamTransform:
    def __init__(self, size: int):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.size = size
        self.resize = ResizeLongestSide(size)
        self.mean = torch.tensor(SAM_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(SAM_STD).view(3, 1, 1) * 255

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = self.resize.apply_image(np.asarray(image.convert("RGB")))
        x = torch.from_numpy(pixels).permute(2, 0, 1).float()
        x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.size - w, 0, self.size - h))


def encoder_transforms(cfg) -> dict:
    """{"clip_image": ClipTransform, "sam_image": SamTransform} for the branches of ``cfg.model``."""
    out = {}
    if "clip" in cfg.model.branches:
        out["clip_image"] = ClipTransform(cfg.model.clip.image_size)
    if "sam" in cfg.model.branches:
        out["sam_image"] = SamTransform(cfg.model.sam.image_size)
    return out
