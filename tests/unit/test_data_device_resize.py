"""data.resize_on_device (issue 21 item 3): workers only decode; each encoder's resize runs in the
model's input path (on the model's device: CPU here), within a few grey levels of the workers' PIL resize (torchvision's
antialiased uint8 filters are PIL's, with another rounding of the intermediate pass: not bit-exact)."""
from __future__ import annotations

import pytest
import torch

from helpers.data import tiny_config
from msmedcap.config import ConfigError
from msmedcap.data.transforms import NATIVE_KEY, encoder_transforms, resize_pending
from helpers.images import IMAGES, one_batch, shard  # noqa: F401 - the fixture

SIZES = dict(model__clip__image_size=32, model__sam__image_size=128)


@pytest.mark.parametrize("sizes", [(32, 128), (224, 1024)])
def test_device_resize_equals_the_worker_path_within_three_grey_levels(shard, sizes):  # noqa: F811
    clip, sam = sizes
    cpu_cfg = tiny_config(model__clip__image_size=clip, model__sam__image_size=sam)
    dev_cfg = tiny_config(model__clip__image_size=clip, model__sam__image_size=sam, data__resize_on_device=True)
    cpu, dev = one_batch(cpu_cfg, shard), one_batch(dev_cfg, shard)
    # workers hand over the decoded pixels only: native sizes, padded to the batch's largest h and w
    assert "clip_image" not in dev and "sam_image" not in dev
    assert dev[NATIVE_KEY].dtype == torch.uint8
    assert dev[f"{NATIVE_KEY}_size"].tolist() == [[h, w] for w, h, *_ in IMAGES]
    assert dev[NATIVE_KEY].shape == (5, max(h for _, h, *_ in IMAGES), max(w for w, *_ in IMAGES), 3)
    resize_pending(dev, encoder_transforms(dev_cfg), "cpu")
    from msmedcap.batch import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD
    from msmedcap.models.encoders import encoder_input

    for key, (mean, std, pad) in {"clip_image": (CLIP_MEAN, CLIP_STD, 0), "sam_image": (SAM_MEAN, SAM_STD, sam)}.items():
        assert torch.equal(dev[f"{key}_size"], cpu[f"{key}_size"]) and dev[key].shape == cpu[key].shape
        diff = (dev[key].int() - cpu[key].int()).abs()
        # measured: max 1-3, at most 0.3 % of the values differ (26 % for a 40 x 90 JPEG shrunk to 32 wide)
        assert diff.max() <= 3 and diff.float().mean() < 0.2
        a = encoder_input(dev[key], mean, std, torch.float32, pad, dev[f"{key}_size"])
        b = encoder_input(cpu[key], mean, std, torch.float32, pad, cpu[f"{key}_size"])
        assert (a - b).abs().max() <= 3 / 255 / min(std) + 1e-6  # the same after normalisation


def test_the_model_resizes_each_branch_once_and_encodes_as_the_worker_path(shard):  # noqa: F811
    from msmedcap.models import build_model

    cpu = one_batch(tiny_config(**SIZES), shard)
    dev_cfg = tiny_config(**SIZES, data__resize_on_device=True)
    dev = one_batch(dev_cfg, shard)
    model = build_model(dev_cfg.model).eval()
    for b in model.branches:
        out, ref = model.encode(dev, b), model.encode(cpu, b)
        assert (out.float() - ref.float()).abs().max() < 0.1 * ref.float().abs().max()
    assert torch.equal(dev["sam_image_size"], cpu["sam_image_size"])  # the batch now holds the resized rows
    index = torch.tensor([1, 3])
    assert torch.equal(model.encode(dev, "sam", index), model.encode(dev, "sam")[index])


def test_resize_on_device_refuses_draft_and_gpu_decode():
    for other in (dict(data__jpeg_draft=2), dict(data__gpu_decode=True)):
        with pytest.raises(ConfigError, match="resize_on_device"):
            tiny_config(data__resize_on_device=True, **other)
