"""gallery.html parses, holds every sample with its embedded thumbnail, escapes captions; thumbnails
come from the batch tensors with SAM's padding cropped. No Java, no model: fast."""
import base64
import io

import numpy as np
import torch
from PIL import Image

from msmedcap.batch import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD
from msmedcap.eval.evaluate import batch_thumbnails, rank_quota
from helpers.html import Collect
from msmedcap.eval.gallery import render_gallery, thumbnail_b64


def test_gallery_parses_and_has_every_sample():
    thumb = thumbnail_b64(Image.new("RGB", (300, 200), (200, 10, 10)))
    recs = [{"key": f"k{i}", "source": ("roco", "demo-general")[i % 2], "domain": ("medical", "general")[i % 2],
             "references": [f"reference {i}", "second <b>ref</b>"], "prediction": f"prediction {i} & <script>x</script>",
             "scores": {"CIDEr": i / 10, "Bleu_4": 0.5, "METEOR": 0.2, "ROUGE_L": 0.3}, "thumbnail": thumb}
            for i in range(25)]
    recs[3].pop("thumbnail")
    page = render_gallery(recs, title="t", summary="25 samples")
    p = Collect()
    p.feed(page)
    p.close()
    assert not p.stack  # every element closed
    assert [r["data-key"] for r in p.rows] == [r["key"] for r in recs]
    assert p.rows[7]["data-cider"] == "0.700000" and p.rows[7]["data-source"] == "demo-general"
    assert len(p.imgs) == 24 and p.scripts == 1  # the inline sorter; no external resources
    assert "src=\"http" not in page and "<link" not in page
    im = Image.open(io.BytesIO(base64.b64decode(p.imgs[0].split(",", 1)[1])))
    assert im.format == "JPEG" and max(im.size) == 128
    text = "".join(p.text)
    assert "prediction 7 & <script>x</script>" in text and "second <b>ref</b>" in text  # escaped, shown as text
    assert "SPICE" not in page.split("<tbody>")[0].split("<thead>")[1]  # absent metric gets no column


def test_thumbnails_from_batch_tensors():
    # A 128x96 image, SAM-style: normalised then zero-padded to 128x128; CLIP: 32x32.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 128), indexing="ij")
    img = torch.stack([xx, yy, 1 - xx])  # smooth, so JPEG keeps it
    sam = torch.zeros(2, 3, 128, 128)
    sam[:, :, :96, :] = (img - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    clip = (torch.rand(2, 3, 32, 32) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    thumbs = batch_thumbnails({"key": ["a", "b"], "sam_image": sam, "clip_image": clip})
    im = Image.open(io.BytesIO(base64.b64decode(thumbs[0])))
    assert im.size == (128, 96)  # padding cropped, SAM's (larger) view used
    back = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    assert (back - img).abs().mean() < 0.02  # un-normalised colours (JPEG loss aside)
    only_clip = batch_thumbnails({"key": ["a", "b"], "clip_image": clip})
    assert Image.open(io.BytesIO(base64.b64decode(only_clip[1]))).size == (32, 32)


def test_rank_quota_adds_up():
    for total in (0, 1, 7, 100):
        for ws in (1, 2, 3, 4):
            shares = [rank_quota(total, r, ws) for r in range(ws)]
            assert sum(shares) == total and max(shares) - min(shares) <= 1
