"""Per-encoder image geometry, each from the ORIGINAL decoded image (never one resized from the
other), with the encoders' own preprocessing:

- CLIP: open_clip's eval transform for the model's own preprocess config (msmedcap.data.clip_preprocess:
  by default bicubic resize of the shorter side, center crop, then OpenAI CLIP mean/std).
- SAM (``model.sam.preprocess``): ``sam``: segment-anything's ResizeLongestSide (bilinear), then
  ``Sam.preprocess``'s normalisation (SAM mean/std) and zero padding to a square at the bottom/right;
  ``medsam``: MedSAM's squash to size x size and per-image [0, 1] min-max scaling.

The loader's workers do only the PIL part (:meth:`ClipTransform.pixels`, :meth:`SamTransform.pixels`:
uint8 RGB at the resized size; a greyscale image is resized as one channel and made RGB after),
and :func:`stack_pixels` builds the batch's uint8 tensors. Normalisation and SAM's padding run on the
device, in the frozen encoder's input path (``msmedcap.models.encoders.encoder_input``). Calling a
transform (``ClipTransform(s)(image)``) still gives the normalised float tensor of the same numbers,
for code that trains on it directly (the demo encoders) and for the tests that compare it with
open_clip's and segment-anything's own preprocessing.

Another encoder's transform (registered with it in msmedcap.registry) has the same interface:
``mean``/``std`` (and ``minmax``: per-image min-max scaling instead), ``target``, ``pixels``, ``out_shape``,
``tensor_pixels`` (data.gpu_decode), ``__call__``; ``from_config(section)`` when the section holds more than
``image_size``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from msmedcap.batch import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD


@lru_cache(maxsize=4)
def _lookup(mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: ((v / 255) - mean[c]) / std[c] for every uint8 value v (the same float32
    operations, in the same order, as ``encoder_input`` on the device: bit-identical)."""
    values = np.arange(256, dtype=np.float32)[None, :] / np.float32(255)
    return (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def _rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


def _normalised(pixels: np.ndarray, mean: tuple, std: tuple, pad_to: int = 0) -> torch.Tensor:
    """uint8 HxWx3 (or HxW) -> float CxHxW, ((x / 255) - mean) / std, zero-padded bottom/right to ``pad_to``."""
    pixels = _rgb(pixels)
    h, w = pixels.shape[:2]
    table = _lookup(mean, std)
    out = np.zeros((3, max(h, pad_to), max(w, pad_to)), np.float32)
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=out[c, :h, :w])
    return torch.from_numpy(out)


def _pil(image: Image.Image) -> Image.Image:
    """RGB and greyscale stay as they are (a grey image is resized once, not three times); any other
    mode becomes RGB first, as ``decode_image`` does."""
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def _resize(image: torch.Tensor, hw: list, bicubic: bool) -> torch.Tensor:
    """torchvision's antialiased resize of a uint8 ``[3, h, w]`` tensor (PIL's filters) to ``hw``."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    return resize(image, hw, interpolation=mode, antialias=True)


class ClipTransform:
    """open_clip's eval transform (``image_transform_v2(PreprocessCfg, is_train=False)``) for the model's
    own preprocess config (msmedcap.data.clip_preprocess): ``resize_mode`` ``shortest`` (Resize of the
    shorter side, CenterCrop: the default), ``squash`` (Resize to size x size) or ``longest``
    (ResizeKeepRatio of the longer side, CenterCropOrPad with ``fill_color``); bicubic or bilinear;
    then ToTensor and Normalize with the model's mean/std. Equal to open_clip's to float rounding (tested)."""

    mean, std = CLIP_MEAN, CLIP_STD
    minmax = False  # normalised with mean/std (encoder_input)

    def __init__(self, size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD, interpolation: str = "bicubic",
                 resize_mode: str = "shortest", fill_color: int = 0):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.bicubic = interpolation != "bilinear"  # open_clip: "random" is bicubic at eval
        self.resize_mode, self.fill_color = resize_mode, fill_color

    @classmethod
    def from_config(cls, section) -> "ClipTransform":
        """The transform of ``model.clip`` (open_clip's preprocess config of its name and weights)."""
        from msmedcap.data.clip_preprocess import clip_preprocess

        p = clip_preprocess(section)
        return cls(p["size"], p["mean"], p["std"], p["interpolation"], p["resize_mode"], p["fill_color"])

    def target(self, source: tuple) -> tuple:
        """(w, h) of the resize for a source of ``source`` = (w, h) (before any JPEG draft)."""
        w, h = source
        s = self.size
        if self.resize_mode == "squash":
            return (s, s)
        if self.resize_mode == "longest":
            from types import SimpleNamespace

            from open_clip.transform import ResizeKeepRatio

            nh, nw = ResizeKeepRatio.get_params(SimpleNamespace(size=(w, h)), (s, s), 1.0)
            return (nw, nh)
        # torchvision's Resize(int): the shorter side becomes s, the longer int(s * long / short)
        return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)

    def _place(self, new: tuple) -> tuple:
        """(left, top) of the s x s output in the resized image (a crop), or of the resized image in the
        output (``longest``: padding, as open_clip's center_crop_or_pad splits it)."""
        s = self.size
        if self.resize_mode == "longest":
            return (s - new[0]) // 2, (s - new[1]) // 2
        return int(round((new[0] - s) / 2.0)), int(round((new[1] - s) / 2.0))

    def pixels(self, image: Image.Image, source: tuple | None = None) -> np.ndarray:
        """uint8 s x s x 3 (a greyscale image is resized as one channel, then made RGB). ``source``: the (w, h) the geometry follows
        when ``image`` was decoded at a reduced JPEG scale (``draft``)."""
        image = _pil(image)
        new = self.target(source or image.size)
        if new != image.size:
            image = image.resize(new, Image.BICUBIC if self.bicubic else Image.BILINEAR)
        s = self.size
        left, top = self._place(new)
        if self.resize_mode == "longest":
            out = np.full((s, s, 3), self.fill_color, np.uint8)
            out[top:top + new[1], left:left + new[0]] = _rgb(np.asarray(image))
            return out
        return np.asarray(image.crop((left, top, left + s, top + s)).convert("RGB"))

    def out_shape(self, source: tuple) -> tuple:
        return (self.size, self.size)

    def tensor_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """The same geometry on a decoded uint8 ``[3, h, w]`` tensor on any device (data.gpu_decode):
        torchvision's antialiased bicubic/bilinear resize (PIL's filters), the same crop or pad; ``[s, s, 3]``."""
        h, w = image.shape[-2:]
        new = self.target((w, h))
        if new != (w, h):
            image = _resize(image, [new[1], new[0]], self.bicubic)
        s = self.size
        left, top = self._place(new)
        if self.resize_mode == "longest":
            out = torch.full((3, s, s), self.fill_color, dtype=torch.uint8, device=image.device)
            out[:, top:top + new[1], left:left + new[0]] = image
            return out.permute(1, 2, 0)
        return image[:, top:top + s, left:left + s].permute(1, 2, 0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return _normalised(self.pixels(image), self.mean, self.std)


SAM_PREPROCESS = ("sam", "medsam")  # model.sam.preprocess


class SamTransform:
    """``preprocess="sam"``: segment-anything's ResizeLongestSide (bilinear PIL resize of the longer side to
    ``size``) and ``Sam.preprocess`` (normalise with SAM mean/std, zero-pad bottom/right to size x size).

    ``preprocess="medsam"``: MedSAM's own inference preprocessing (bowang-lab/MedSAM, MedSAM_Inference.py):
    a greyscale image made 3-channel, ``skimage.transform.resize`` to size x size (a squash; order=3,
    anti_aliasing=True, preserve_range=True), truncated to uint8; then, per image, ``(x - min) / max(max -
    min, 1e-8)`` over all its pixels and channels: [0, 1], no mean/std (``minmax``, in encoder_input).
    The workers' path equals MedSAM's bit for bit (tested); the device resize (``tensor_pixels``:
    data.resize_on_device, data.gpu_decode) is torchvision's antialiased bicubic, close but not equal
    (docs/encoders.md)."""

    mean, std = SAM_MEAN, SAM_STD

    def __init__(self, size: int, preprocess: str = "sam"):
        from segment_anything.utils.transforms import ResizeLongestSide

        if preprocess not in SAM_PREPROCESS:
            raise ValueError(f"SamTransform: preprocess {preprocess!r} is not one of {SAM_PREPROCESS}")
        self.size, self.preprocess = size, preprocess
        self.minmax = preprocess == "medsam"
        self.shape = ResizeLongestSide.get_preprocess_shape

    @classmethod
    def from_config(cls, section) -> "SamTransform":
        return cls(section.image_size, section.preprocess)

    def target(self, source: tuple) -> tuple:
        if self.minmax:
            return (self.size, self.size)
        h, w = self.shape(source[1], source[0], self.size)
        return (w, h)

    def pixels(self, image: Image.Image, source: tuple | None = None) -> np.ndarray:
        """uint8 h x w x 3 at the resized size, no padding."""
        image = _pil(image)
        if self.minmax:
            from skimage.transform import resize  # MedSAM's resize (its setup.py requires scikit-image)

            rgb = _rgb(np.asarray(image))  # MedSAM: np.repeat of a grey image to 3 channels, then resize
            return resize(rgb, (self.size, self.size), order=3, preserve_range=True,
                          anti_aliasing=True).astype(np.uint8)
        new = self.target(source or image.size)
        if new != image.size:
            image = image.resize(new, Image.BILINEAR)
        return np.asarray(image.convert("RGB"))  # grey: resized as one channel, RGB here (a contiguous stack)

    def out_shape(self, source: tuple) -> tuple:
        w, h = self.target(source)
        return (h, w)

    def tensor_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """The same geometry on a decoded uint8 ``[3, h, w]`` tensor (data.gpu_decode): antialiased
        bilinear resize (``medsam``: bicubic, to size x size); ``[h', w', 3]``."""
        h, w = image.shape[-2:]
        new = self.target((w, h))
        if new != (w, h):
            image = _resize(image, [new[1], new[0]], self.minmax)
        return image.permute(1, 2, 0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.minmax:
            return torch.from_numpy(_min_max(self.pixels(image))).permute(2, 0, 1)
        return _normalised(self.pixels(image), self.mean, self.std, pad_to=self.size)


def _min_max(pixels: np.ndarray) -> np.ndarray:
    """MedSAM's [0, 1] scaling of a uint8 image, in its operations (uint8 subtraction, float64 division)
    and then float32 as its ``torch.tensor(...).float()``."""
    low = pixels.min()
    return ((pixels - low) / np.clip(pixels.max() - low, a_min=1e-8, a_max=None)).astype(np.float32)


def encoder_transforms(cfg) -> dict:
    """{batch image key: transform} for the branches of ``cfg.model``, from the encoder registry
    (msmedcap.registry): e.g. {"clip_image": ClipTransform, "sam_image": SamTransform}."""
    from msmedcap.registry import encoder_specs

    return {s.image_key: s.make_transform(s.section(cfg.model)) for s in encoder_specs(cfg.model.branches)}


def draft_size(transforms, source: tuple, margin: float) -> tuple | None:
    """The smallest (w, h) a JPEG may be decoded at (PIL ``draft``: DCT scaling by 1/2, 1/4, 1/8) so
    that every transform still resizes down from at least ``margin`` x its own size; None when no
    reduction is possible."""
    w, h = source
    scale = 0.0  # the decoded image may shrink until the most demanding transform would upscale from it
    for t in transforms:
        tw, th = t.target(source)
        scale = max(scale, margin * tw / w, margin * th / h)
    if scale > 0.5:  # the first DCT step halves: nothing to gain
        return None
    return (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale))))


def _shared_uint8(shape: tuple) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a DataLoader worker, allocated in shared memory right away
    (as torch's default_collate does), so handing it to the trainer copies nothing."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def stack_pixels(arrays: list) -> tuple:
    """uint8 images (h x w x 3 or h x w) -> (ByteTensor [B, H, W, 3], each image top-left and zeros
    to the largest H and W of the batch; LongTensor [B, 2] of each (h, w))."""
    sizes = [a.shape[:2] for a in arrays]
    H, W = max(s[0] for s in sizes), max(s[1] for s in sizes)
    out = _shared_uint8((len(arrays), H, W, 3))
    buf = out.numpy()
    for i, (a, (h, w)) in enumerate(zip(arrays, sizes)):
        buf[i, :h, :w] = a[:, :, None] if a.ndim == 2 else a
        if h < H:
            buf[i, h:] = 0
        if w < W:
            buf[i, :h, w:] = 0
    return out, torch.tensor(sizes, dtype=torch.long).reshape(len(arrays), 2)


def images_batch(images: list, transforms: dict, sources: list | None = None) -> dict:
    """The batch's image entries for PIL ``images``: ``name`` (uint8 [B, H, W, 3]) and ``name + "_size"``
    per transform."""
    out = {}
    for name, t in transforms.items():
        arrays = [t.pixels(im, sources[i] if sources else None) for i, im in enumerate(images)]
        out[name], out[f"{name}_size"] = stack_pixels(arrays)
    return out


# --------------------------------------------------------------------------- data.resize_on_device
NATIVE_KEY = "native_image"  # batch key: uint8 [B, H, W, 3] at each image's decoded size (``NATIVE_KEY + "_size"``)


def resize_pending(batch: dict, transforms: dict, device) -> None:
    """``data.resize_on_device``: the workers handed over ``batch[NATIVE_KEY]`` (decoded, not resized,
    with each image's (h, w); a row of size (0, 0) was not decoded: a feature-cache hit). For each
    ``{name: transform}`` whose ``batch[name]`` is not there yet, resize every decoded row on ``device``
    with the transform's ``tensor_pixels`` (torchvision's antialiased bicubic/bilinear: PIL's filters,
    within 3 grey levels of the workers' PIL resize, mostly equal: tests/unit/test_data_device_resize.py) and put
    ``batch[name]`` (uint8 ``[B, H', W', 3]``, zeros beyond each image as ``stack_pixels`` gives them) and
    ``batch[name + "_size"]``: the same entries the workers would have made. Normalisation and padding
    then follow as for every batch (``FrozenEncoder.prepare``)."""
    todo = {n: t for n, t in transforms.items() if n not in batch}
    if not todo or NATIVE_KEY not in batch:
        return
    native = batch[NATIVE_KEY].to(device, non_blocking=True)
    batch[NATIVE_KEY] = native  # moved once for every branch
    sizes = batch[f"{NATIVE_KEY}_size"].tolist()
    for name, t in todo.items():
        rows = [t.tensor_pixels(native[i, :h, :w].contiguous().permute(2, 0, 1)) if h and w else None
                for i, (h, w) in enumerate(sizes)]
        shapes = [tuple(r.shape[:2]) if r is not None else (0, 0) for r in rows]
        out = torch.zeros((len(rows), max(s[0] for s in shapes), max(s[1] for s in shapes), 3),
                          dtype=torch.uint8, device=native.device)
        for i, r in enumerate(rows):
            if r is not None:
                out[i, :r.shape[0], :r.shape[1]] = r
        batch[name], batch[f"{name}_size"] = out, torch.tensor(shapes, dtype=torch.long).reshape(len(rows), 2)
