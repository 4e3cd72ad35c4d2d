"""Readers for real caption datasets, turned into shard samples (see msmedcap.data.shards).

Each reader yields records ``{"id", "image" (path), "caption", "meta" (extra metadata)}``;
:func:`to_samples` loads each image (DICOM converted to an 8-bit PNG with its window) and skips
missing or unreadable images, counting and reporting them, so that a run goes on.

- ``jsonl``: lines ``{"image": path, "caption": text, ...}`` (paths relative to the file or --images)
- ``folder``: image files with a same-name ``.txt`` caption
- ``csv``: a CSV/TSV list with a header row; named image and caption columns (ROCOv2's
  ``train_captions.csv``: ``ID,Caption``, images ``train/{ID}.jpg``)
- ``coco``: a COCO captions annotation JSON (``images[].{id,file_name}``, ``annotations[].{image_id,id,
  caption}``, as in ``captions_train2017.json``) + image dir; one sample per caption or per image
- ``roco``: ROCO's ``captions.txt`` (``ROCO_ID<TAB> caption``) + image dir: ``ROCO_ID.jpg`` (its
  ``scripts/fetch.py`` since 2022-01), else the older fetch's ``{PMCID}_{image name}`` found through
  ``dlinks.txt`` next to ``captions.txt``
- ``medicat``: MedICaT's JSONL (``pdf_hash``, ``fig_uri``, ``s2_caption``, ...) + the release's
  ``figures/`` dir, where each figure is ``{pdf_hash}_{fig_uri}`` (allenai/medicat README and sample/)
"""
from __future__ import annotations

import collections
import csv
import io
import json
import sys
from pathlib import Path
from typing import Iterator

from PIL import Image

from msmedcap.data.shards import safe_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm")


class SourceError(RuntimeError):
    """Unreadable dataset layout (not one bad sample): names the file."""


def _read_json_lines(path: Path) -> Iterator[tuple]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as e:
                raise SourceError(f"{path}:{lineno}: invalid JSON: {e}") from None


def read_jsonl(path: str, images: str | None = None) -> Iterator[dict]:
    path = Path(path)
    root = Path(images) if images else path.parent
    for lineno, row in _read_json_lines(path):
        if not isinstance(row, dict) or "image" not in row:
            raise SourceError(f"{path}:{lineno}: expected an object with 'image' and 'caption'")
        extra = {k: v for k, v in row.items() if k not in ("image", "caption", "domain", "source")}
        yield {"id": str(row.get("id", f"{path.stem}-{lineno}")), "image": root / row["image"],
               "caption": row.get("caption"), "meta": extra}


def read_folder(path: str, images: str | None = None) -> Iterator[dict]:
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = image.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        yield {"id": str(image.relative_to(root).with_suffix("")), "image": image, "caption": caption, "meta": {}}


def read_coco(path: str, images: str | None = None, per: str = "caption") -> Iterator[dict]:
    path = Path(path)
    root = Path(images) if images else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = data["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    if per == "caption":
        for ann in annotations:
            image_id = ann.get("image_id")
            yield {"id": f"{image_id}-{ann.get('id')}", "image": root / files.get(image_id, f"<no image {image_id}>"),
                   "caption": ann.get("caption"), "meta": {"image_id": image_id}}
    elif per == "image":
        captions = collections.defaultdict(list)
        for ann in annotations:
            captions[ann.get("image_id")].append(ann.get("caption"))
        for image_id, name in files.items():
            caps = [c for c in captions.get(image_id, []) if c]
            yield {"id": str(image_id), "image": root / name, "caption": caps[0] if caps else None,
                   "meta": {"image_id": image_id, "captions": caps}}
    else:
        raise SourceError(f"coco: per must be 'caption' or 'image', got {per!r}")


_SUFFIX_CASES = tuple(x for suf in IMAGE_SUFFIXES for x in (suf, suf.upper()))


def _by_stem(root: Path) -> dict:
    return {p.stem: p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _roco_old_names(captions: Path) -> dict:
    """ROCO_ID -> the image name ROCO's fetch.py gave before 2022-01 (``{PMCID}_{name in the PMC
    archive}``), from ``dlinks.txt`` (``ROCO_ID<TAB>wget -r ftp://.../PMCxxxx.tar.gz -P ...<TAB>name``)."""
    dlinks = captions.parent / "dlinks.txt"
    if not dlinks.is_file():
        return {}
    names = {}
    with open(dlinks, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            archive = next((w for w in parts[1].split() if w.endswith(".tar.gz")), "")
            pmc_id = archive.rsplit("/", 1)[-1][: -len(".tar.gz")]
            if pmc_id:
                names[parts[0].strip()] = f"{pmc_id}_{parts[-1].strip()}"
    return names


def read_roco(path: str, images: str | None = None) -> Iterator[dict]:
    path = Path(path)
    root = Path(images) if images else path.parent / "images"
    if not root.is_dir():
        raise SourceError(f"roco: image directory not found: {root} (give --images)")
    files = _by_stem(root)
    old_names = None  # read only when an image is not under its ROCO_ID
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            roco_id, sep, caption = line.rstrip("\n").partition("\t")
            if not sep:
                raise SourceError(f"{path}:{lineno}: expected 'ROCO_ID<TAB> caption'")
            roco_id = roco_id.strip()
            image = files.get(roco_id)
            if image is None:
                if old_names is None:
                    old_names = _roco_old_names(path)
                image = root / old_names[roco_id] if roco_id in old_names else root / f"{roco_id}.jpg"
            yield {"id": roco_id, "image": image, "caption": caption, "meta": {}}


# Metadata of a MedICaT row kept in the sample's json (the references and OA details stay out).
MEDICAT_META = ("pdf_hash", "fig_uri", "fig_key", "radiology", "scope", "predicted_type")


def read_medicat(path: str, images: str | None = None) -> Iterator[dict]:
    """MedICaT as released: JSONL rows ``{"pdf_hash", "fig_key", "fig_uri", "s2_caption",
    "s2orc_caption", "s2orc_references", "radiology", "scope", "predicted_type", "oa_info"}``; the
    figure of a row is ``figures/{pdf_hash}_{fig_uri}`` (README of allenai/medicat; its sample/
    folder). The caption is ``s2_caption`` (``s2orc_caption`` where that is empty)."""
    path = Path(path)
    root = Path(images) if images else path.parent / "figures"
    if not root.is_dir():
        raise SourceError(f"medicat: figure directory not found: {root} (give --images: the release's figures/)")
    for lineno, row in _read_json_lines(path):
        try:
            pdf_hash, fig_uri = str(row["pdf_hash"]), str(row["fig_uri"])
        except (KeyError, TypeError):
            raise SourceError(f"{path}:{lineno}: MedICaT rows need pdf_hash and fig_uri") from None
        caption = row.get("s2_caption") or row.get("s2orc_caption")
        meta = {k: row[k] for k in MEDICAT_META if k in row}
        doi = (row.get("oa_info") or {}).get("doi") if isinstance(row.get("oa_info"), dict) else None
        if doi:
            meta["doi"] = doi
        yield {"id": f"{pdf_hash}-{Path(fig_uri).stem}", "image": root / f"{pdf_hash}_{fig_uri}",
               "caption": caption, "meta": meta}


def read_csv(path: str, images: str | None = None, image_col: str = "image", caption_col: str = "caption",
             id_col: str | None = None, delimiter: str | None = None) -> Iterator[dict]:
    """A CSV/TSV with a header row. ``image_col`` holds an image path relative to ``images`` (default:
    the file's folder), with or without its extension (ROCOv2: ``ID`` = ``ROCOv2_2023_train_000001``,
    image ``train/ROCOv2_2023_train_000001.jpg``); ``id_col`` (default: the image column) names the
    sample. Tab-separated when the file ends in .tsv/.tab (or ``delimiter``)."""
    path = Path(path)
    root = Path(images) if images else path.parent
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for role, col in (("--image-col", image_col), ("--caption-col", caption_col), ("--id-col", id_col)):
            if col is not None and col not in columns:
                raise SourceError(f"{path}: no column {col!r} ({role}); the header has {columns}")
        for row in reader:
            lineno = reader.line_num
            name = (row.get(image_col) or "").strip()
            if not name:
                raise SourceError(f"{path}:{lineno}: empty {image_col!r}")
            image = root / name
            if not image.is_file() and not Path(name).suffix:  # an ID without extension (ROCOv2)
                image = next((c for c in (root / f"{name}{suf}" for suf in _SUFFIX_CASES) if c.is_file()), image)
            extra = {k: v for k, v in row.items() if k not in (image_col, caption_col, id_col) and k is not None}
            yield {"id": str(row.get(id_col or image_col) or name), "image": image, "caption": row.get(caption_col),
                   "meta": extra}


READERS = {"jsonl": read_jsonl, "folder": read_folder, "csv": read_csv, "coco": read_coco, "roco": read_roco,
           "medicat": read_medicat}


# --------------------------------------------------------------------------- images
def dicom_to_png(path: Path) -> bytes:
    """A DICOM file -> 8-bit grey PNG: modality LUT (e.g. CT Hounsfield units), then the file's first
    window (centre/width) mapped to 0..255; without a window, the image's own min..max."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        raise SourceError("DICOM input needs pydicom: pip install 'msmedcap[dicom]'") from None
    import numpy as np

    ds = pydicom.dcmread(str(path))
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if values.ndim != 2:
        values = values[..., 0] if values.shape[-1] in (3, 4) else values[0]  # colour or multi-frame: first
    if "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)  # noqa: E731
        centre, width = first(ds.WindowCenter), max(first(ds.WindowWidth), 1.0)
        lo, hi = centre - width / 2, centre + width / 2
    else:
        lo, hi = float(values.min()), float(values.max())
    grey = (np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1 shows low values bright
    buf = io.BytesIO()
    Image.fromarray(grey, "L").save(buf, format="PNG")
    return buf.getvalue()


def load_image_file(path: Path, max_pixels: int) -> tuple:
    """-> (bytes, "jpg" | "png"); JPEG/PNG keep their bytes, other formats become PNG.
    Raises FileNotFoundError or ValueError (unreadable, too large)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        data = dicom_to_png(path) if path.suffix.lower() == ".dcm" else path.read_bytes()
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ValueError(f"{path}: {img.width}x{img.height} is over {max_pixels} pixels")
        img.load()
    except (ValueError, SourceError):
        raise
    except Exception as e:  # PIL / pydicom errors on corrupt files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if img.format in ("JPEG", "PNG"):
        return data, "jpg" if img.format == "JPEG" else "png"
    buf = io.BytesIO()
    img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, format="PNG")
    return buf.getvalue(), "png"


def to_samples(records, domain: str, source: str, counts: collections.Counter, max_pixels: int,
               log=None) -> Iterator[dict]:
    """Records -> shard samples; missing/unreadable images and empty captions are reported (to ``log``,
    default stderr) and counted."""
    log = log or sys.stderr
    for rec in records:
        caption = (rec["caption"] or "").strip() if isinstance(rec["caption"], (str, type(None))) else ""
        if not caption:
            counts["missing_caption"] += 1
            print(f"skip {rec['id']}: no caption", file=log)
            continue
        try:
            data, ext = load_image_file(rec["image"], max_pixels)
        except FileNotFoundError as e:
            counts["missing_image"] += 1
            print(f"skip {rec['id']}: {e}", file=log)
            continue
        except ValueError as e:
            counts["bad_image"] += 1
            print(f"skip {rec['id']}: {e}", file=log)
            continue
        counts["written"] += 1
        meta = {**rec["meta"], "domain": domain, "source": source, "id": rec["id"]}
        yield {"__key__": safe_key(f"{source}-{rec['id']}"), ext: data, "txt": caption, "json": meta}
