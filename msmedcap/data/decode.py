"""Our own sample decoder: only ``jpg``/``png``/``webp``, ``txt`` and ``json`` are ever decoded (never
webdataset's default ``decode()``, which unpickles ``.pkl``/``.pyd``/``.pth`` members). Other members
(img2dataset's, anyone's) are ignored, not counted.

The domain and source of a sample: the spec's (``PATTERN::WEIGHT::DOMAIN::SOURCE``, attached by the
loader as ``__domain__``/``__source__``) when it gives them, else the sample's json. With a spec
domain, the json may lack one (or be absent); without it, a sample whose json has no valid domain is
skipped as ``no_domain``.

A bad sample raises :class:`SkipSample` with a reason; :class:`SkipCounter` is the webdataset
handler that counts reasons instead of failing, and hands the counts to the next batch.
"""
from __future__ import annotations

import collections
import io
import json
import sys
import warnings

from PIL import Image

from msmedcap.batch import DOMAINS

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
REASONS = ("bad_image", "missing_caption", "bad_json", "no_domain", "too_large", "bad_tar")


class SkipSample(Exception):
    """A sample that is skipped and counted under ``reason`` (one of REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkipCounter:
    """Counts skipped samples per reason; ``tar_handler`` and ``sample_handler`` are webdataset
    exception handlers (return True = skip and go on)."""

    def __init__(self, name: str = "msmedcap.data", max_in_a_row: int | None = None):
        self.counts = collections.Counter()
        self.name = name
        self._warned = set()
        # an endless stream whose samples all fail would otherwise loop forever without a batch
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0

    def tar_handler(self, exn: Exception) -> bool:
        self._count("bad_tar", exn)
        return True

    def sample_handler(self, exn: Exception) -> bool:
        self._count(exn.reason if isinstance(exn, SkipSample) else "bad_sample", exn)
        self.in_a_row += 1
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(f"{self.in_a_row} samples in a row were unusable ({dict(self.counts)}); "
                               f"last: {type(exn).__name__}: {exn}") from exn
        return True

    def attempt(self, fn, *args):
        """``fn(*args)``, or None (counted) when it raises SkipSample."""
        try:
            return fn(*args)
        except SkipSample as e:
            self.sample_handler(e)
            return None

    def _count(self, reason: str, exn: Exception) -> None:
        self.counts[reason] += 1
        if reason not in self._warned:  # say it once per reason and process, then count silently
            self._warned.add(reason)
            print(f"# {self.name}: skipping {reason} ({type(exn).__name__}: {str(exn)[:300]})", file=sys.stderr)

    def pop(self) -> dict:
        """The counts since the last pop (called once per batch)."""
        out, self.counts, self.in_a_row = dict(self.counts), collections.Counter(), 0
        return out


def _where(raw: dict) -> str:
    return f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"


def parse_meta(raw: dict) -> dict:
    """The sample's json with ``domain`` and ``source`` settled: a spec's ``__domain__``/``__source__``
    win over the json's (which is then optional). SkipSample("bad_json" | "no_domain") otherwise."""
    domain, source = raw.get("__domain__"), raw.get("__source__")
    data = raw.get("json")
    if data is None:
        if domain is None:
            raise SkipSample("bad_json", f"{_where(raw)} has no json member")
        meta = {}
    else:
        try:
            meta = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise SkipSample("bad_json", f"{_where(raw)}: {e}") from None
        if not isinstance(meta, dict):
            raise SkipSample("bad_json", f"{_where(raw)}: json is not an object")
    if domain is not None:
        meta["domain"] = domain
    elif meta.get("domain") not in DOMAINS:
        raise SkipSample("no_domain", f"{_where(raw)}: json needs a domain in {DOMAINS} "
                                      f"(or give it in the spec: PATTERN::WEIGHT::DOMAIN)")
    if source is not None:
        meta["source"] = source
    meta.setdefault("source", "unknown")
    return meta


def parse_caption(raw: dict) -> str:
    try:
        caption = raw.get("txt", b"").decode("utf-8").strip()
    except UnicodeDecodeError:
        caption = ""
    if not caption:
        raise SkipSample("missing_caption", f"{_where(raw)} has no (UTF-8) caption")
    return caption


def open_image(data: bytes, max_pixels: int, where: str = "", draft=None) -> tuple:
    """Bytes -> (decoded PIL image in RGB or L, (w, h) as stored). Greyscale stays one channel; any
    other mode becomes RGB. Images over ``max_pixels`` are refused from the header, before decoding
    the pixels. ``draft``: a function of the stored (w, h) giving the smallest (w, h) a JPEG may be
    decoded at (PIL's ``draft``: DCT scaling by 1/2..1/8), or None; the pixels are decoded once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in IMAGE_FORMATS:
                raise SkipSample("bad_image", f"{where}: format {img.format} is not jpg/png/webp")
            if img.width * img.height > max_pixels:
                raise SkipSample("too_large", f"{where}: {img.width}x{img.height} over {max_pixels} pixels")
            source = img.size
            if draft is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
                size = draft(img.size)
                if size is not None:
                    img.draft(img.mode, size)
            img.load()  # truncated data raises here (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_large", f"{where}: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt data
        raise SkipSample("bad_image", f"{where}: {type(e).__name__}: {e}") from None
    return img, source


def decode_image(data: bytes, max_pixels: int, where: str = "") -> Image.Image:
    """Bytes -> RGB PIL image, refusing images over ``max_pixels`` before decoding the pixels."""
    img = open_image(data, max_pixels, where)[0]
    return img if img.mode == "RGB" else img.convert("RGB")


def image_member(raw: dict) -> str:
    ext = next((k for k in IMAGE_KEYS if k in raw), None)
    if ext is None:
        raise SkipSample("bad_image", f"{_where(raw)} has no jpg/png/webp member")
    return ext


def decode_sample(raw: dict, max_pixels: int, draft=None) -> dict:
    """Raw tar sample -> {key, image (PIL RGB or L, see ``open_image``), source_size (w, h before any
    JPEG draft), caption, domain, source, meta}; SkipSample if bad."""
    meta = parse_meta(raw)
    caption = parse_caption(raw)
    data = raw[image_member(raw)]
    image, size = open_image(data, max_pixels, _where(raw), draft)
    return {"key": raw["__key__"], "image": image, "source_size": size, "caption": caption,
            "domain": meta["domain"], "source": str(meta["source"]), "meta": meta}

