"""uint8 across the worker boundary (issue 11): workers hand over resized uint8 pixels; the frozen
encoders' input path normalises and pads them on the device, equal to open_clip's and
segment-anything's own preprocessing; optional JPEG draft and GPU-decode paths."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.data import tiny_config
from helpers.images import IMAGES, encoded, one_batch, shard  # noqa: F401 - the fixture
from msmedcap.batch import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD
from msmedcap.data.loader import make_eval_loader
from msmedcap.data.shards import write_shards
from msmedcap.models.encoders import encoder_input


def originals():
    return [Image.open(io.BytesIO(encoded(i, *spec))).convert("RGB") for i, spec in enumerate(IMAGES)]


def test_workers_hand_over_uint8_at_the_resized_size(shard):
    cfg = tiny_config(model__clip__image_size=16, model__sam__image_size=32)
    b = one_batch(cfg, shard)
    assert b["clip_image"].dtype == torch.uint8 and b["clip_image"].shape == (5, 16, 16, 3)
    assert b["sam_image"].dtype == torch.uint8
    sizes = b["sam_image_size"].tolist()
    assert sizes == [[24, 32], [32, 14], [24, 32], [32, 32], [21, 32]]  # ResizeLongestSide(32) of each
    assert b["sam_image"].shape == (5, 32, 32, 3)  # the batch's largest h and w: no padding to 1024 in workers
    for i, (h, w) in enumerate(sizes):  # zeros beyond each image
        assert not b["sam_image"][i, h:].any() and not b["sam_image"][i, :, w:].any()
    grey = b["sam_image"][2, :24, :32]
    assert torch.equal(grey[..., 0], grey[..., 1]) and torch.equal(grey[..., 0], grey[..., 2])


@pytest.mark.parametrize("sizes", [(16, 32), (224, 1024)])
def test_encoder_inputs_equal_open_clip_and_segment_anything_preprocessing(shard, sizes):
    """The frozen encoders' inputs from a loader batch (mixed sizes, grey, JPEG/PNG) against the
    libraries' own preprocessing of the original images, within 1e-5."""
    from open_clip.transform import image_transform
    from segment_anything.utils.transforms import ResizeLongestSide

    clip_size, sam_size = sizes
    cfg = tiny_config(model__clip__image_size=clip_size, model__sam__image_size=sam_size)
    b = one_batch(cfg, shard)
    clip_in = encoder_input(b["clip_image"], CLIP_MEAN, CLIP_STD, torch.float32, 0, b["clip_image_size"])
    sam_in = encoder_input(b["sam_image"], SAM_MEAN, SAM_STD, torch.float32, sam_size, b["sam_image_size"])
    assert clip_in.shape == (5, 3, clip_size, clip_size) and sam_in.shape == (5, 3, sam_size, sam_size)
    assert clip_in.is_contiguous() and sam_in.is_contiguous()
    ref_clip = image_transform(clip_size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    mean, std = torch.tensor(SAM_MEAN).view(3, 1, 1) * 255, torch.tensor(SAM_STD).view(3, 1, 1) * 255
    for i, img in enumerate(originals()):
        assert (clip_in[i] - ref_clip(img)).abs().max() < 1e-5
        resized = torch.from_numpy(ResizeLongestSide(sam_size).apply_image(np.asarray(img))).permute(2, 0, 1).float()
        h, w = resized.shape[1:]
        ref = torch.nn.functional.pad((resized - mean) / std, (0, sam_size - w, 0, sam_size - h))  # Sam.preprocess
        assert (sam_in[i] - ref).abs().max() < 1e-5


def test_the_model_input_path_normalises_in_the_encoder_dtype(shard):
    from msmedcap.models import build_model

    cfg = tiny_config(model__sam__image_size=128, model__clip__image_size=32)
    b = one_batch(cfg, shard)
    model = build_model(cfg.model).eval()
    for branch, encoder in model.encoders.items():
        key = f"{branch}_image"
        x = encoder.prepare(b[key], b[f"{key}_size"])
        assert x.dtype == encoder.dtype
        t = encoder.transform
        floats = torch.stack([t(img) for img in originals()])  # the former worker-side float tensors
        assert torch.equal(x, floats.to(encoder.dtype))
        assert torch.equal(model.encode(b, branch), encoder(floats))  # a float batch: taken as normalised
    index = torch.tensor([1, 3])
    assert torch.equal(model.encode(b, "sam", index), model.encode(b, "sam")[index])


def test_jpeg_draft_is_opt_in_keeps_geometry_and_is_close(tmp_path):
    big = encoded(7, 1600, 1200, "RGB", "JPEG")
    write_shards([{"__key__": "big", "jpg": big, "txt": "x", "json": {"domain": "general", "source": "t"}}],
                 tmp_path, "d", shard_size=10)
    shard = str(tmp_path / "d-000.tar")
    exact = one_batch_of(tiny_config(model__variant="blip2", model__clip__image_size=64), shard)
    drafted = one_batch_of(tiny_config(model__variant="blip2", model__clip__image_size=64, data__jpeg_draft=2), shard)
    assert exact["clip_image"].shape == drafted["clip_image"].shape
    diff = (exact["clip_image"].int() - drafted["clip_image"].int()).abs().float()
    assert 0 < diff.mean() < 3 and diff.max() < 40  # decoded at 1/8 scale: close, not equal
    from msmedcap.data.transforms import ClipTransform, SamTransform, draft_size

    assert draft_size([ClipTransform(64)], (1600, 1200), 2) == (171, 128)  # PIL picks the 1/8 DCT scale
    assert draft_size([ClipTransform(64), SamTransform(1024)], (1600, 1200), 1) is None  # SAM needs the pixels
    # the pixel cap still applies before anything is decoded
    from msmedcap.data.decode import SkipSample, open_image

    with pytest.raises(SkipSample, match="too_large"):
        open_image(big, 1000, draft=lambda size: (10, 10))


def one_batch_of(cfg, shard):
    return next(iter(make_eval_loader(cfg, [shard], 0, 1, batch_size=8)))


def test_gpu_decode_path_runs_on_cpu_and_matches_within_tolerance(shard, monkeypatch):
    """data.gpu_decode's code, with torchvision's CPU decoder (no GPU here): JPEG rows are left to the
    model's input path and come out within a few grey levels of PIL's."""
    from msmedcap.data import loader as loader_mod
    from msmedcap.eval.evaluate import batch_thumbnails
    from msmedcap.models import build_model

    cfg = tiny_config(model__sam__image_size=128, model__clip__image_size=32)
    cpu = one_batch(cfg, shard)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        assert one_batch(tiny_config(model__sam__image_size=128, data__gpu_decode=True), shard).get("jpeg_bytes") is None
    monkeypatch.setattr(loader_mod, "gpu_decode_available", lambda: True)
    gpu_cfg = tiny_config(model__sam__image_size=128, model__clip__image_size=32, data__gpu_decode=True)
    pending = one_batch(gpu_cfg, shard)
    is_jpeg = [fmt == "JPEG" for *_, fmt in IMAGES]
    assert [d is not None for d in pending["jpeg_bytes"]] == is_jpeg
    assert torch.equal(pending["sam_image_size"], cpu["sam_image_size"])
    assert not pending["sam_image"][1].any()  # a placeholder until the model's input path decodes it
    model = build_model(gpu_cfg.model).eval()
    for branch in model.branches:
        model.encode(pending, branch)
    assert pending["jpeg_bytes"] == [None] * 5  # decoded once for both branches
    for key in ("clip_image", "sam_image"):
        diff = (pending[key].int() - cpu[key].int()).abs()
        for i, jpeg in enumerate(is_jpeg):
            if jpeg:
                assert diff[i].float().mean() < 3 and diff[i].max() <= 64  # other IDCT/upsampling, resize rounding
            else:
                assert not diff[i].any()  # PNGs decoded in the workers as before
    assert all(batch_thumbnails(pending))


def test_thumbnails_from_uint8_batches(shard):
    from msmedcap.eval.evaluate import batch_thumbnails, sample_batch
    import base64

    b = one_batch(tiny_config(model__sam__image_size=64), shard)
    thumbs = batch_thumbnails(b)
    sizes = [Image.open(io.BytesIO(base64.b64decode(t))).size for t in thumbs]
    assert sizes == [(w, h) for h, w in b["sam_image_size"].tolist()]  # the batch padding cropped
    one = sample_batch(b, 1)
    assert one["sam_image_size"].tolist() == [b["sam_image_size"][1].tolist()] and len(batch_thumbnails(one)) == 1
