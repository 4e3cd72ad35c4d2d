"""Seeded generator of the embedded demo set: learnable, small, and where fine detail matters.

- general: 128x128 scenes of coloured shapes on a plain background; caption names counts, colours
  and shapes ("two red circles and a blue square on a white background."). Large objects: visible
  at CLIP's 32 px as well as SAM's 128 px.
- medical: 128x128 grey CT-, X-ray- and MR-like scans (sources demo-ct, demo-xray, demo-mr) with
  0-3 lesions on one side; the caption gives the lesion count, size, side and margin
  ("axial ct of the abdomen showing two small lesions in the left kidney with irregular margins.").
  Small lesions are 2-3 px: at 32 px (CLIP in the demo preset) count, margin and side blur away;
  at 128 px (SAM) they are plain, so the dual-encoder model has something to win.

Every image and caption is a function of (seed, split, domain, index): the same call writes the
same bytes (fixed tar mtime/owner), so `msmedcap demo shards` reproduces ``shards/demo`` exactly.

``demo_sample(..., with_masks=True)`` also returns the masks of what was drawn (each object and
object group; each lesion, the lesion group, the organ regions and the body), for pre-training the
demo's SAM stand-in (msmedcap.demo.encoders). The masks are painted alongside the image and
draw no random numbers, so the images and captions stay byte for byte the same; encoder
pre-training uses its own split name (``pretrain``), never the eval images.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
NOISE = 2.0  # grey-level noise sd of the medical scans
NUMBERS = ("no", "one", "two", "three", "four")
COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# modality -> (source, caption prefix, organ name, body drawer)
MODALITIES = {
    "ct": ("demo-ct", "axial ct of the abdomen", "kidney"),
    "xray": ("demo-xray", "chest x-ray", "lung"),
    "mr": ("demo-mr", "axial mr of the brain", "hemisphere"),
}
TRAIN_PER_DOMAIN = 1200
EVAL_PER_DOMAIN = 150
TRAIN_SHARDS = 4
TAR_MTIME = 1_700_000_000  # fixed so that regenerated tars are byte-identical


def _rng(seed: int, split: str, domain: str, index: int) -> random.Random:
    # string seeds go through sha512 in random.seed, independent of PYTHONHASHSEED
    return random.Random(f"msmedcap-demo/{seed}/{split}/{domain}/{index}")


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


# --------------------------------------------------------------------------- general
def _new_mask() -> tuple:
    mask = Image.new("1", (SIZE, SIZE), 0)
    return mask, ImageDraw.Draw(mask)


def _as_array(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask, dtype=bool).copy()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def general_sample(rng: random.Random, masks: dict | None = None) -> tuple:
    """-> (PIL image, caption, extra metadata). A ``masks`` dict receives ``object/G/K`` (the K-th
    object of group G) and ``group/G`` (all objects of group G) as bool [SIZE, SIZE] arrays."""
    bg_name = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[bg_name])
    draw = ImageDraw.Draw(img)
    groups = []  # (count, colour, shape), distinct (colour, shape) pairs
    for _ in range(rng.choice((1, 1, 2))):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if any(g[1:] == (colour, shape) for g in groups):
            continue
        groups.append((rng.randint(1, 3), colour, shape))
    # place objects on a 3x3 grid of cells so that they never overlap
    cells = rng.sample(range(9), sum(g[0] for g in groups))
    for g, (count, colour, shape) in enumerate(groups):
        for k in range(count):
            cell = cells.pop()
            cx = 21 + 43 * (cell % 3) + rng.randint(-4, 4)
            cy = 21 + 43 * (cell // 3) + rng.randint(-4, 4)
            r = rng.randint(11, 16)
            _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
            if masks is not None:  # objects never overlap (one grid cell each): each is whole
                mask, mdraw = _new_mask()
                _draw_shape(mdraw, shape, cx, cy, r, 1)
                masks[f"object/{g}/{k}"] = _as_array(mask)
        if masks is not None:
            masks[f"group/{g}"] = np.logical_or.reduce([masks[f"object/{g}/{k}"] for k in range(count)])
    parts = [f"{NUMBERS[n]} {colour} {_plural(shape, n)}" for n, colour, shape in groups]
    caption = " and ".join(parts) + f" on a {bg_name} background."
    return img, caption, {"objects": [list(g) for g in groups]}


# --------------------------------------------------------------------------- medical
# label-map values of the drawn anatomy (0 = outside the body); an organ is its side's region
BODY, ORGAN_LEFT, ORGAN_RIGHT, OTHER = 1, 2, 3, 4


class _Painter:
    """Draws on the image and, when given one, the same shape with a label on a label map."""

    def __init__(self, draw: ImageDraw.ImageDraw, labels: ImageDraw.ImageDraw | None):
        self.draw, self.labels = draw, labels

    def ellipse(self, box, fill, label) -> None:
        self.draw.ellipse(box, fill=fill)
        if self.labels is not None:
            self.labels.ellipse(box, fill=label)

    def rectangle(self, box, fill, label) -> None:
        self.draw.rectangle(box, fill=fill)
        if self.labels is not None:
            self.labels.rectangle(box, fill=label)


def _body(draw: ImageDraw.ImageDraw, modality: str, labels: ImageDraw.ImageDraw | None = None) -> list:
    """Draw the anatomy; return the two lesion regions (left, right) as (cx, cy, rx, ry) ellipses.
    ``labels`` (a label map's draw) receives BODY, ORGAN_LEFT/RIGHT and OTHER where they are visible."""
    paint = _Painter(draw, labels)
    organs = (ORGAN_LEFT, ORGAN_RIGHT)
    if modality == "ct":
        paint.ellipse([8, 22, 120, 110], 95, BODY)                     # abdomen
        paint.ellipse([56, 76, 72, 92], 210, OTHER)                    # spine
        regions = [(38, 64, 15, 21), (90, 64, 15, 21)]                 # kidneys
        for (cx, cy, rx, ry), organ in zip(regions, organs):
            paint.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], 135, organ)
    elif modality == "xray":
        paint.rectangle([0, 0, SIZE, SIZE], 60, 0)
        paint.ellipse([6, 6, 122, 124], 150, BODY)                     # thorax
        regions = [(40, 60, 20, 38), (88, 60, 20, 38)]                 # lungs
        for (cx, cy, rx, ry), organ in zip(regions, organs):
            paint.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], 45, organ)
        paint.ellipse([52, 62, 84, 100], 165, OTHER)                   # heart
    else:
        paint.ellipse([14, 8, 114, 120], 190, BODY)                    # skull
        paint.ellipse([20, 14, 108, 114], 105, ORGAN_LEFT)             # brain (medical_sample splits it)
        paint.ellipse([58, 48, 70, 80], 40, OTHER)                     # ventricles
        regions = [(40, 64, 14, 30), (88, 64, 14, 30)]                 # hemispheres
    return regions


def _lesion(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, irregular: bool, fill: int,
            rng: random.Random, mask: ImageDraw.ImageDraw | None = None) -> None:
    """One lesion on ``draw`` (and, the same shape, on ``mask``)."""
    targets = [(draw, fill)] + ([(mask, 1)] if mask is not None else [])
    if not irregular:
        for target, value in targets:
            target.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value)
        return
    points = []  # a spiculated star: alternating long and short rays
    n = 10
    phase = rng.random() * math.pi
    for i in range(n):
        rad = r * (1.7 if i % 2 == 0 else 0.6)
        a = phase + 2 * math.pi * i / n
        points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    for target, value in targets:
        target.polygon(points, fill=value)


def medical_sample(rng: random.Random, masks: dict | None = None) -> tuple:
    """-> (PIL image, caption, extra metadata). A ``masks`` dict receives ``lesion/K`` (each lesion),
    ``lesions`` (all of them), ``organ/left``, ``organ/right`` (kidney, lung or brain hemisphere, with
    its lesions) and ``body`` (abdomen, thorax or skull with all inside) as bool [SIZE, SIZE] arrays."""
    modality = rng.choice(list(MODALITIES))
    source, prefix, organ = MODALITIES[modality]
    img = Image.new("L", (SIZE, SIZE), 10)
    draw = ImageDraw.Draw(img)
    label_map = Image.new("L", (SIZE, SIZE), 0) if masks is not None else None
    regions = _body(draw, modality, None if label_map is None else ImageDraw.Draw(label_map))
    lesion_masks = []
    count = rng.choice((0, 1, 1, 2, 2, 3))
    size = rng.choice(("small", "small", "large")) if count < 3 else "small"  # 3 large ones do not fit
    meta = {"modality": modality, "lesions": count}
    if count == 0:
        caption = f"{prefix} with no focal lesion."
    else:
        side = rng.choice(("left", "right"))
        margin = rng.choice(("smooth", "irregular"))
        cx0, cy0, rx, ry = regions[0 if side == "left" else 1]
        r = rng.uniform(1.6, 2.2) if size == "small" else rng.uniform(5.0, 6.5)
        fill = 235 if modality != "mr" else 240
        spots, tries = [], 0
        while len(spots) < count:  # separate lesions inside the organ's ellipse; restart when stuck
            tries += 1
            if tries % 200 == 0:
                spots = []
            x = cx0 + rng.uniform(-1, 1) * (rx - r - 2)
            y = cy0 + rng.uniform(-1, 1) * (ry - r - 2)
            if ((x - cx0) / rx) ** 2 + ((y - cy0) / ry) ** 2 > 0.6:
                continue
            if all(math.hypot(x - a, y - b) > 2 * r + 6 for a, b in spots):
                spots.append((x, y))
        for x, y in spots:
            mdraw = None
            if masks is not None:
                mask, mdraw = _new_mask()
                lesion_masks.append(mask)
            _lesion(draw, x, y, r, margin == "irregular", fill, rng, mdraw)
        noun = "nodule" if modality == "xray" else "lesion"
        caption = (f"{prefix} showing {NUMBERS[count]} {size} {_plural(noun, count)} "
                   f"in the {side} {organ} with {margin} margins.")
        meta.update(side=side, size=size, margin=margin)
    if masks is not None:
        labels = np.array(label_map)
        if modality == "mr":  # the hemispheres: the brain either side of the midline
            labels[:, SIZE // 2:][labels[:, SIZE // 2:] == ORGAN_LEFT] = ORGAN_RIGHT
        lesions = [_as_array(m) for m in lesion_masks]
        union = np.logical_or.reduce(lesions) if lesions else np.zeros((SIZE, SIZE), bool)
        for k, m in enumerate(lesions):
            masks[f"lesion/{k}"] = m
        if lesions:
            masks["lesions"] = union
        for name, value in (("left", ORGAN_LEFT), ("right", ORGAN_RIGHT)):
            organ_mask = labels == value
            if lesions and meta["side"] == name:
                organ_mask |= union
            masks[f"organ/{name}"] = organ_mask
        masks["body"] = (labels > 0) | union
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, NOISE, (SIZE, SIZE))
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8), "L")
    return img, caption, {**meta, "source": source}


# --------------------------------------------------------------------------- samples and shards
def demo_sample(seed: int, split: str, domain: str, index: int, with_masks: bool = False) -> dict:
    """One demo sample in the shard format (see msmedcap.data.shards). ``with_masks`` adds
    ``"masks"``: {name: bool [SIZE, SIZE] array} of what was drawn (see general_sample and
    medical_sample; not a shard member), the image and caption unchanged."""
    rng = _rng(seed, split, domain, index)
    buf = io.BytesIO()
    masks = {} if with_masks else None
    if domain == "general":
        img, caption, extra = general_sample(rng, masks)
        img.save(buf, format="PNG", optimize=True)  # flat colours: PNG is tiny and exercises the png path
        ext, source = "png", "demo-general"
    else:
        img, caption, extra = medical_sample(rng, masks)
        img.save(buf, format="JPEG", quality=80)
        ext, source = "jpg", extra.pop("source")
    key = f"{domain}-{split}-{index:06d}"
    meta = {"domain": domain, "source": source, "id": key, **extra}
    out = {"__key__": key, ext: buf.getvalue(), "txt": caption, "json": meta}
    if with_masks:
        out["masks"] = masks
    return out


def demo_captions(seed: int = 0, n_per_domain: int = TRAIN_PER_DOMAIN) -> list:
    """The train captions (what the demo tokenizers are trained on)."""
    return [demo_sample(seed, "train", d, i)["txt"] for d in ("general", "medical") for i in range(n_per_domain)]


def write_demo(out_dir: str | Path, seed: int = 0, n_train: int = TRAIN_PER_DOMAIN, n_eval: int = EVAL_PER_DOMAIN,
               train_shards: int = TRAIN_SHARDS) -> dict:
    """Write {general,medical}-train-{000..}.tar, {general,medical}-eval-000.tar and manifest.json."""
    from msmedcap.data.shards import write_shards

    out_dir = Path(out_dir)
    per_shard = math.ceil(n_train / train_shards)
    for domain in ("general", "medical"):
        for split, n, size in (("train", n_train, per_shard), ("eval", n_eval, n_eval)):
            samples = (demo_sample(seed, split, domain, i) for i in range(n))
            write_shards(samples, out_dir, f"{domain}-{split}", shard_size=size, mtime=TAR_MTIME)
    from msmedcap.data.shards import read_manifest

    return read_manifest(out_dir)
