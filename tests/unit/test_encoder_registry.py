"""The encoder registry (issue 12, item 3): the built-in branches resolve as before (batch keys,
transforms, encoder classes, cache identity), and a third encoder registered in-process, one module's
worth of code plus one ``register_encoder``, is picked up by the loader, the model, the feature cache,
the GPU-decode path and the gallery's thumbnails."""
from __future__ import annotations

import base64
import dataclasses
import io
import typing
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers.data import tiny_config
from msmedcap import config as config_mod
from msmedcap import registry
from msmedcap.config import BRANCHES, VARIANT_BRANCHES, ClipConfig, ModelConfig, SamConfig
from msmedcap.data.loader import make_eval_loader
from msmedcap.data.shards import write_shards
from msmedcap.data.transforms import ClipTransform, SamTransform, _normalised, encoder_transforms
from msmedcap.models.encoders import FrozenEncoder
from msmedcap.registry import EncoderSpec, encoder_spec, register_encoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the built-in branches
def test_builtin_branches_resolve_as_before():
    assert tuple(registry.ENCODERS) == BRANCHES == ("clip", "sam")
    hints = typing.get_type_hints(ModelConfig)
    for branch, cfg_type, transform, cls, padded in (("clip", ClipConfig, ClipTransform, "ClipEncoder", False),
                                                     ("sam", SamConfig, SamTransform, "SamEncoder", True)):
        spec = encoder_spec(branch)
        assert (spec.image_key, spec.size_key) == (f"{branch}_image", f"{branch}_image_size")
        assert spec.config is cfg_type is hints[branch]  # model.<branch> is the spec's config type
        assert spec.transform_class is transform and spec.padded is padded
        assert spec.encoder == f"msmedcap.models.encoders:{cls}"
    with pytest.raises(KeyError, match="no encoder registered for branch 'nope'"):
        encoder_spec("nope")


def test_every_variant_has_registered_branches_and_the_same_transforms():
    cfg = tiny_config()  # clip 16, sam 24
    for variant, branches in VARIANT_BRANCHES.items():
        cfg.model.variant = variant
        t = encoder_transforms(cfg)
        assert list(t) == [f"{b}_image" for b in branches]
        for b in branches:
            assert type(t[f"{b}_image"]) is encoder_spec(b).transform_class
            assert t[f"{b}_image"].size == {"clip": 16, "sam": 24}[b]


def model_config():
    """The demo's encoder sizes (its shipped encoder weights fit them), demo tokenizers."""
    return tiny_config(model__clip__image_size=32, model__sam__image_size=128, model__frozen_dtype="fp32")


def test_model_builds_and_encodes_through_the_registry_and_cache_identity_is_unchanged(tmp_path):
    from msmedcap.models import build_model
    from msmedcap.models.encoders import ClipEncoder, SamEncoder
    from msmedcap.models.feature_cache import attach_feature_cache, encoder_identity

    cfg = model_config()
    model = build_model(cfg.model)
    assert type(model.encoders["clip"]) is ClipEncoder and type(model.encoders["sam"]) is SamEncoder
    for b in model.branches:
        ident = encoder_identity(b, getattr(cfg.model, b), model.encoders[b])
        # the section as stores before issue 23 hold it: the default preprocessing adds nothing to the key
        before = {k: v for k, v in dataclasses.asdict(getattr(cfg.model, b)).items() if k != "preprocess"}
        assert ident["branch"] == b and ident["config"] == before
    cache = attach_feature_cache(model, tmp_path)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["clip", "sam"]
    assert set(cache.stores) == {"clip", "sam"}


def test_register_refuses_a_taken_branch(monkeypatch):
    monkeypatch.setattr(registry, "ENCODERS", dict(registry.ENCODERS))
    other = dataclasses.replace(encoder_spec("clip"), padded=True)
    with pytest.raises(ValueError, match="'clip' is already registered"):
        register_encoder(other)
    assert register_encoder(encoder_spec("clip")) is encoder_spec("clip")  # the same spec again: fine
    register_encoder(other, replace=True)
    assert encoder_spec("clip").padded


# --------------------------------------------------------------------------- a third encoder
# Everything a new encoder needs, as its own module would hold it: config, transform, encoder.
@dataclass
class ToyConfig:
    image_size: int = 160  # larger than SAM's 128: the thumbnails' source
    ln_vision: bool = True
    stage1_checkpoint: Optional[str] = None
    stage1_skip: list = field(default_factory=list)


class ToyTransform:
    """Squash the whole image to size x size (nearest), with its own statistics."""

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, size: int):
        self.size = size

    def target(self, source: tuple) -> tuple:
        return (self.size, self.size)

    def pixels(self, image, source=None) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((self.size, self.size), Image.NEAREST))

    def out_shape(self, source: tuple) -> tuple:
        return (self.size, self.size)

    def tensor_pixels(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2.functional import resize

        return resize(image, [self.size, self.size], interpolation=InterpolationMode.NEAREST_EXACT).permute(1, 2, 0)

    def __call__(self, image) -> torch.Tensor:
        return _normalised(self.pixels(image), self.mean, self.std)


class ToyEncoder(FrozenEncoder):
    """4x4 patches -> 8 channels: (size/4)^2 tokens of width 8."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.transform = ToyTransform(cfg.image_size)
        self.width, self.num_tokens = 8, (cfg.image_size // 4) ** 2

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).flatten(2).transpose(1, 2)


TOY = EncoderSpec("toy", ToyConfig, ToyEncoder, f"{__name__}:ToyTransform")  # a class, and a lazy name


@pytest.fixture
def toy(monkeypatch):
    """The toy encoder registered, and a variant using it: the two config-side lines a new branch
    needs (a ModelConfig field, a variant's branches) stood in for on this config object."""
    monkeypatch.setattr(registry, "ENCODERS", dict(registry.ENCODERS))
    register_encoder(TOY)
    monkeypatch.setitem(config_mod.VARIANT_BRANCHES, "msmedcap", ("clip", "sam", "toy"))
    cfg = model_config()
    cfg.model.toy = ToyConfig()
    return cfg


def jpeg_and_png_shard(tmp_path) -> str:
    samples = []
    for i, fmt in enumerate(("JPEG", "PNG")):
        yy, xx = np.mgrid[0:30, 0:40]
        arr = np.stack([xx * 6, yy * 8, 255 - xx * 6], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        samples.append({"__key__": f"t-{i}", "jpg" if fmt == "JPEG" else "png": buf.getvalue(),
                        "txt": f"toy image {i}", "json": {"domain": "medical", "source": "t"}})
    write_shards(samples, tmp_path, "t", shard_size=10)
    return str(tmp_path / "t-000.tar")


def one_batch(cfg, shard):
    (batch,) = list(make_eval_loader(cfg, [shard], 0, 1, batch_size=2))
    return batch


def test_a_registered_encoder_is_picked_up_everywhere(toy, tmp_path, monkeypatch):
    from msmedcap.data import loader as loader_mod
    from msmedcap.eval.evaluate import batch_thumbnails
    from msmedcap.models import build_model
    from msmedcap.models.feature_cache import attach_feature_cache

    cfg, shard = toy, jpeg_and_png_shard(tmp_path)
    assert cfg.model.branches == ("clip", "sam", "toy")
    # the loader: the toy's own geometry, under its keys
    assert TOY.transform_class is ToyTransform and type(encoder_transforms(cfg)["toy_image"]) is ToyTransform
    batch = one_batch(cfg, shard)
    assert batch["toy_image"].dtype == torch.uint8 and batch["toy_image"].shape == (2, 160, 160, 3)
    assert batch["toy_image_size"].tolist() == [[160, 160]] * 2
    assert batch["sam_image"].shape[1:3] == (96, 128) and batch["clip_image"].shape[1:3] == (32, 32)
    # the model: built, a Q-Former and a projection for it, encoded from its key, in the losses
    model = build_model(cfg.model).eval()
    assert type(model.encoders["toy"]) is ToyEncoder and list(model.qformers) == ["clip", "sam", "toy"]
    assert list(model.captioner.projections) == ["clip", "sam", "toy"]
    tokens = model.encode(batch, "toy")
    assert tokens.shape == (2, 1600, 8)
    x = (batch["toy_image"].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25  # its mean/std, on the device
    assert torch.allclose(tokens, model.encoders["toy"].tokens(x), atol=1e-5)
    assert torch.isfinite(model.stage2_loss(batch)["loss"])
    # the feature cache: a store of its own, hit the second time
    cache = attach_feature_cache(model, tmp_path / "cache")
    assert cache.stores["toy"].dir.name.startswith("toy-")
    assert (cache.stores["toy"].dir / "identity.json").read_text().count('"image_size": 160') == 1
    batch["image_sha256"] = ["a" * 64, "b" * 64]
    first = model.encode(batch, "toy")
    assert torch.equal(model.encode(batch, "toy"), first) and cache.hits["toy"] == 2 and cache.misses["toy"] == 2
    # thumbnails: the largest image of the batch is the toy's (160 px > SAM's 128), made 128 px
    sizes = [Image.open(io.BytesIO(base64.b64decode(t))).size for t in batch_thumbnails(batch)]
    assert sizes == [(128, 128)] * 2
    floats = {"key": ["a"], "toy_image": (torch.full((1, 3, 160, 160), 0.75) - 0.5) / 0.25}
    im = Image.open(io.BytesIO(base64.b64decode(batch_thumbnails(floats)[0])))
    assert abs(np.asarray(im, np.float32).mean() - 0.75 * 255) < 2  # un-normalised with the toy's mean/std
    # GPU decode (torchvision's CPU decoder here): the toy's rows are decoded with its tensor_pixels
    monkeypatch.setattr(loader_mod, "gpu_decode_available", lambda: True)
    cfg.data.gpu_decode = True
    pending = one_batch(cfg, shard)
    assert pending["jpeg_bytes"][0] is not None and not pending["toy_image"][0].any()
    model.feature_cache = None
    model.encode(pending, "clip")  # any branch's encode decodes every branch's rows, once
    assert pending["jpeg_bytes"] == [None, None]
    diff = (pending["toy_image"].int() - batch["toy_image"].int()).abs()
    assert diff[0].float().mean() < 3 and not diff[1].any()  # JPEG: another IDCT; PNG: decoded in the worker
