"""Optional JPEG decoding on the GPU (``data.gpu_decode=true``; off by default, the CPU path is the
tested default).

Workers then only parse a JPEG's header (format, mode, size: the pixel cap still applies before any
decoding) and hand over its encoded bytes (``batch["jpeg_bytes"]``: one uint8 tensor per sample, None
for samples they decoded themselves: PNG, WebP, CMYK JPEGs), with all-zero placeholder rows of the
right sizes in each encoder's image (``clip_image``/``sam_image``). The model's input path
(``MSMedCap.encode``) calls :func:`decode_pending` once per batch: ``torchvision.io.decode_jpeg(...,
device=<the model's device>)`` (nvJPEG on CUDA), then each encoder's resize on that device (its
transform's ``tensor_pixels``: torchvision's antialiased bicubic/bilinear, the filters PIL uses)
written into the placeholder rows; normalisation follows as for every batch. Outputs differ from PIL's by a few grey levels (another IDCT and chroma upsampling,
resize rounding); docs/benchmarks.md gives the measured difference. A JPEG that fails to decode on the
device is decoded with PIL on the host instead; one that fails there too stays black, with a warning
(workers no longer see its pixels, so it cannot be skipped and counted like a bad CPU-path sample).

Without CUDA the option is ignored with a warning (``gpu_decode_available``); the tests run the same
code with torchvision's CPU decoder.
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image

from msmedcap.data.decode import SkipSample, _where, image_member, open_image, parse_caption, parse_meta

log = logging.getLogger(__name__)
_WARNED = set()


def gpu_decode_available() -> bool:
    """CUDA is present (the option is ignored otherwise, said once)."""
    if torch.cuda.is_available():
        return True
    if "cuda" not in _WARNED:
        _WARNED.add("cuda")
        warnings.warn("data.gpu_decode=true but CUDA is not available: JPEGs are decoded on the CPU", RuntimeWarning)
    return False


def prepare_jpeg(raw: dict, max_pixels: int, transforms: dict) -> dict | None:
    """A JPEG sample's header-only preparation (worker side); None when the sample is not a JPEG in
    RGB or greyscale (the CPU path decodes it). SkipSample as ``decode_sample`` for bad metadata,
    unreadable headers and images over ``max_pixels``."""
    meta = parse_meta(raw)
    caption = parse_caption(raw)
    data = raw[image_member(raw)]
    try:
        with Image.open(io.BytesIO(data)) as header:
            fmt, mode, size = header.format, header.mode, header.size
    except Exception as e:  # noqa: BLE001 - PIL raises several types on corrupt data
        raise SkipSample("bad_image", f"{_where(raw)}: {type(e).__name__}: {e}") from None
    if fmt != "JPEG" or mode not in ("RGB", "L"):
        return None
    if size[0] * size[1] > max_pixels:
        raise SkipSample("too_large", f"{_where(raw)}: {size[0]}x{size[1]} over {max_pixels} pixels")
    sample = {"key": raw["__key__"], "caption": caption, "domain": meta["domain"], "source": str(meta["source"]),
              "meta": meta, "jpeg_bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    zero = np.zeros((), np.uint8)
    for name, t in transforms.items():  # placeholders: zero strides, no memory
        sample[name] = np.broadcast_to(zero, (*t.out_shape(size), 3))
    return sample


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        try:
            image = open_image(data.numpy().tobytes(), 1 << 62)[0].convert("RGB")
        except SkipSample:
            log.warning("data.gpu_decode: a JPEG decodes neither on %s (%s) nor with PIL: left black", device, e)
            return None
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(device)


def decode_pending(batch: dict, transforms: dict, device) -> None:
    """Decode the batch's ``jpeg_bytes`` on ``device`` and write each encoder's resized pixels into
    its rows of ``batch[name]`` (moved to ``device``) for ``transforms`` = {name: transform}; then
    ``jpeg_bytes`` is cleared, so a second call (the other branch) does nothing."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = batch.get("jpeg_bytes") or []
    rows = [i for i, d in enumerate(data) if d is not None]
    if not rows:
        return
    device = torch.device(device)
    try:
        decoded = decode_jpeg([data[i] for i in rows], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad image fails the batched call: one by one, with a host fallback
        decoded = [_decode_one(data[i], device) for i in rows]
    for name, t in transforms.items():
        if name not in batch:
            continue
        out = batch[name].to(device)
        for i, image in zip(rows, decoded):
            if image is not None:
                px = t.tensor_pixels(image)
                out[i, :px.shape[0], :px.shape[1]] = px
        batch[name] = out
    batch["jpeg_bytes"] = [None] * len(data)
