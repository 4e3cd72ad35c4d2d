"""Reading user image files for `msmedcap caption`: PNG, JPEG (anything PIL opens) and DICOM (with
pydicom). Every failure names the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class ImageReadError(ValueError):
    """An image file that cannot be read: says which and why."""


def is_dicom(path: Path) -> bool:
    # DICOM part 10 files carry "DICM" after a 128-byte preamble, whatever their extension.
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def dicom_to_pil(path: Path) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import apply_voi_lut
    except ImportError:
        raise ImageReadError(f"{path}: DICOM file, but pydicom is not installed "
                             "(pip install 'msmedcap[dicom]')") from None
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for unreadable or compressed pixel data
        raise ImageReadError(f"{path}: cannot read DICOM pixel data ({type(e).__name__}: {e})") from None
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[pixels.shape[0] // 2]  # multi-frame: the middle frame
    if getattr(ds, "SamplesPerPixel", 1) == 3:
        return Image.fromarray(pixels.astype(np.uint8), "RGB")
    # Windowing as the file says (VOI LUT / window centre+width), then stretch to 8 bits.
    arr = apply_voi_lut(pixels, ds).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = 255.0 - arr  # MONOCHROME1: low values are white
    return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")


def load_image(path) -> Image.Image:
    """Any file PIL opens, or DICOM -> RGB PIL image. Raises ImageReadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if is_dicom(path):
        return dicom_to_pil(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e})") from None
