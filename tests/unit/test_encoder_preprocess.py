"""Encoders with their own preprocessing (issue 23, item 4).

CLIP branch: the transform is open_clip's eval transform for the model's own preprocess config, resolved
as open_clip 3.3's ``create_model`` resolves it (open_clip/factory.py: ``PreprocessCfg()`` defaults, then the
``preprocess_cfg`` of a ``local-dir:`` folder's / ``hf-hub:`` repository's ``open_clip_config.json``, or the
pretrained tag's entry in open_clip/pretrained.py; size = the built tower's). The references are open_clip's
own ``image_transform_v2`` and ``create_model_and_transforms`` on the same names. The towers here are timm's
own tiny ``test_vit`` (timm 1.x registry) in the layouts BiomedCLIP (``hf-hub:microsoft/BiomedCLIP-...``:
timm ``vit_base_patch16_224``, ``timm_pool ""``, ``timm_proj "linear"``, OpenAI mean/std; the shape of
open_clip's own docstring example in factory.py) and SigLIP (open_clip's ``_slpcfg``: mean/std 0.5,
bicubic, ``squash``; timm_pool ``map``) use; nothing is downloaded: ``hf-hub:`` reads a huggingface_hub
cache the test writes, with ``HF_HUB_OFFLINE``.

SAM branch, ``model.sam.preprocess=medsam``: MedSAM's inference preprocessing as its script does it,
bowang-lab/MedSAM ``MedSAM_Inference.py`` lines 112-131 ("image preprocessing"), at commit
d71e8a1a99ad751840a22a7fa3ecfb4166fb1488 (the file last changed in 3ead5b7c613715e831a849aaa54925c9969415fe):
``io.imread``; a 2-D image ``np.repeat``-ed to 3 channels; ``transform.resize(img_3c, (1024, 1024), order=3,
preserve_range=True, anti_aliasing=True).astype(np.uint8)``; ``(img - img.min()) / np.clip(img.max() -
img.min(), a_min=1e-8, a_max=None)``; ``torch.tensor(...).float().permute(2, 0, 1)``; then straight into
``image_encoder`` (no ``Sam.preprocess``). :func:`medsam_reference` is that code, with scikit-image (which
MedSAM's setup.py requires). The workers' path equals it bit for bit: no tolerance.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from msmedcap.config import ConfigError, ConfigWarning, load_config

OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
BIOMEDCLIP_LIKE = {  # BiomedCLIP's open_clip_config.json shape, at toy size (timm test_vit: 6 blocks, width 64)
    "model_cfg": {"embed_dim": 32,
                  "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                                 "timm_proj": "linear", "image_size": 32},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
SIGLIP_LIKE = {
    "model_cfg": {"embed_dim": 64, "custom_text": True,
                  "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "map",
                                 "timm_proj": "none", "image_size": 32},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                       "resize_mode": "squash"}}


def make_images() -> list:
    """Landscape, portrait, greyscale, a flat background with one bright square (medical-like), a large one."""
    rng = np.random.default_rng(0)
    out = []
    for w, h, mode in [(71, 53, "RGB"), (40, 90, "RGB"), (64, 48, "L"), (300, 200, "L"), (150, 110, "RGB")]:
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.clip((xx * 200 / w + yy * 50 / h + 20)[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255)
        arr = arr.astype(np.uint8)
        if (w, h) == (300, 200):
            arr[:] = 0
            arr[60:120, 100:180] = 200
        out.append(Image.fromarray(arr if mode == "RGB" else arr[..., 0], mode))
    return out


def demo_config(*overrides, check_files=False):
    return load_config("demo", ["model.frozen_dtype=fp32", "data.num_workers=0", *overrides], check_files=check_files)


def clip_folder(path, config: dict, seed: int = 0) -> dict:
    """An open_clip ``local-dir:`` folder (open_clip_config.json + open_clip_model.safetensors, the names open_clip's
    hf-hub and local-dir loaders look for) holding a random tower of ``config``; returns its state dict."""
    import open_clip
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in open_clip.create_model(f"local-dir:{path}").state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    return state


def hf_cache(cache, repo_id: str, folder) -> None:
    """``folder``'s files as huggingface_hub's cache holds a downloaded repository (refs/main -> snapshots/<commit>)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# --------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("pre", [
    {},  # open_clip's defaults: today's transform
    {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "squash"},  # SigLIP
    {"interpolation": "bilinear", "resize_mode": "shortest", "mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1)},
    {"interpolation": "random", "resize_mode": "longest", "fill_color": 128},
])
def test_clip_transform_equals_open_clips_eval_transform(pre):
    """Every resize mode and interpolation against ``image_transform_v2(PreprocessCfg, is_train=False)``; the
    uint8 path (workers' pixels, the device's normalisation) gives the same floats as the transform itself."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from msmedcap.data.transforms import ClipTransform, stack_pixels
    from msmedcap.models.encoders import encoder_input

    ours = ClipTransform(32, **pre)
    ref = image_transform_v2(PreprocessCfg(size=32, **pre), is_train=False)
    for img in make_images():
        x = ours(img)
        assert x.shape == (3, 32, 32)
        assert (x - ref(img)).abs().max() < 1e-5
        px, sizes = stack_pixels([ours.pixels(img)])
        assert torch.equal(encoder_input(px, ours.mean, ours.std, torch.float32, 0, sizes)[0], x)
        device = ours.tensor_pixels(torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1))
        assert device.shape == px[0].shape and (device.int() - px[0].int()).abs().max() <= 3  # PIL vs torchvision


@pytest.mark.parametrize("where, layout", [("local-dir", SIGLIP_LIKE), ("hf-hub", BIOMEDCLIP_LIKE)])
def test_schema_names_take_the_models_own_preprocessing_offline(tmp_path, offline_hub, where, layout):
    """A timm tower given as ``local-dir:`` or (from a local huggingface_hub cache, offline) ``hf-hub:``: the
    loader's transform is open_clip's own val transform for that name, the encoder holds the folder's weights."""
    import open_clip

    from msmedcap.data.transforms import encoder_transforms
    from msmedcap.models.encoders import ClipEncoder

    state = clip_folder(tmp_path / "tower", layout)
    if where == "hf-hub":
        hf_cache(offline_hub, f"msmedcap-test/tiny-{where}", tmp_path / "tower")
        name = f"hf-hub:msmedcap-test/tiny-{where}"
    else:
        name = f"local-dir:{tmp_path / 'tower'}"
    cfg = demo_config(f"model.clip.name={name}", "model.clip.pretrained=null", "model.clip.image_size=null",
                      "model.variant=blip2", check_files=True)
    assert cfg.model.clip.image_size == 32  # null: the model's own, from its open_clip config
    t = encoder_transforms(cfg)["clip_image"]
    pre = layout["preprocess_cfg"]
    assert (list(t.mean), list(t.std)) == (pre["mean"], pre["std"])
    assert t.resize_mode == pre.get("resize_mode", "shortest") and t.size == 32
    _, _, val = open_clip.create_model_and_transforms(name)  # open_clip itself, on the same name
    for img in make_images():
        assert (t(img) - val(img)).abs().max() < 1e-5
    enc = ClipEncoder(cfg.model.clip)
    assert vars(enc.transform) == vars(t)
    trunk = {k: v for k, v in enc.visual.trunk.state_dict().items()}
    assert torch.equal(trunk["patch_embed.proj.weight"], state["visual.trunk.patch_embed.proj.weight"])
    assert enc(torch.stack([t(img) for img in make_images()])).shape == (5, 5, 64)  # 1 + (32 / 16)^2 tokens


def test_pretrained_tags_and_the_demo_keep_their_preprocessing():
    """A built-in name's tag gives its preprocessing (SigLIP's squash and 0.5s, no download); the paper's
    EVA01-g-14 tag and the demo keep open_clip's defaults, so their transforms and feature caches are unchanged."""
    from msmedcap.config import ClipConfig
    from msmedcap.data.clip_preprocess import clip_preprocess
    from msmedcap.data.transforms import SamTransform, encoder_transforms
    from msmedcap.registry import encoder_spec

    siglip = clip_preprocess(ClipConfig(name="ViT-B-16-SigLIP", pretrained="webli", image_size=224))
    assert siglip["mean"] == (0.5, 0.5, 0.5) and siglip["resize_mode"] == "squash"
    paper = ClipConfig(name="EVA01-g-14", pretrained="laion400m_s11b_b41k", image_size=224)
    assert "preprocess" not in encoder_spec("clip").identity(paper)
    t = encoder_transforms(demo_config())
    clip, sam = t["clip_image"], t["sam_image"]
    assert (clip.mean, clip.std) == (tuple(OPENAI_MEAN), tuple(OPENAI_STD))
    assert (clip.size, clip.bicubic, clip.resize_mode, clip.fill_color) == (32, True, "shortest", 0)
    assert type(sam) is SamTransform and sam.preprocess == "sam" and not sam.minmax
    assert demo_config("model.clip.image_size=null").model.clip.image_size == 32  # tiny-vit.json's own


def test_clip_preprocess_changes_the_cache_key(tmp_path):
    from msmedcap.config import ClipConfig
    from msmedcap.registry import encoder_spec

    default = {**BIOMEDCLIP_LIKE, "preprocess_cfg": {}}
    clip_folder(tmp_path / "a", default)
    clip_folder(tmp_path / "b", SIGLIP_LIKE | {"model_cfg": default["model_cfg"]})
    ident = [encoder_spec("clip").identity(ClipConfig(name=f"local-dir:{tmp_path / d}", image_size=32)) for d in "ab"]
    assert "preprocess" not in ident[0]  # open_clip's defaults: the key as before issue 23
    assert ident[1]["preprocess"]["resize_mode"] == "squash" and ident[1]["preprocess"]["mean"] == [0.5] * 3


def test_bad_preprocessing_is_a_config_error_before_work(tmp_path, offline_hub):
    with pytest.raises(ConfigError, match=r"model\.sam\.preprocess: 'medsam2' is not one of 'sam', 'medsam'"):
        demo_config("model.sam.preprocess=medsam2")
    clip_folder(tmp_path / "crop", {**BIOMEDCLIP_LIKE, "preprocess_cfg": {"resize_mode": "crop"}})
    with pytest.raises(ConfigError, match=r"model\.clip\.name: .*resize_mode 'crop' is not one of"):
        demo_config(f"model.clip.name=local-dir:{tmp_path / 'crop'}", "model.clip.pretrained=null", check_files=True)
    with pytest.raises(ConfigError, match=r"model\.clip\.pretrained: not with model\.clip\.name=local-dir:"):
        demo_config(f"model.clip.name=local-dir:{tmp_path / 'crop'}")  # the demo's pretrained file beside it
    with pytest.raises(ConfigError, match=r"model\.clip\.name: cannot read the open_clip_config\.json of hf-hub:"):
        demo_config("model.clip.name=hf-hub:msmedcap-test/not-cached", "model.clip.pretrained=null", check_files=True)
    (tmp_path / "crop" / "open_clip_model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model\.clip\.name must be set, to a folder with open_clip weights"):
        demo_config(f"model.clip.name=local-dir:{tmp_path / 'crop'}", "model.clip.pretrained=null")


# --------------------------------------------------------------------------- SAM: MedSAM
def medsam_reference(path: str, size: int = 1024) -> torch.Tensor:
    """bowang-lab/MedSAM MedSAM_Inference.py (d71e8a1a), lines 112-131, with ``size`` for its 1024."""
    from skimage import io, transform

    img_np = io.imread(path)
    if len(img_np.shape) == 2:
        img_3c = np.repeat(img_np[:, :, None], 3, axis=-1)
    else:
        img_3c = img_np
    img_1024 = transform.resize(img_3c, (size, size), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    return torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)


@pytest.fixture(scope="module")
def medsam_shard(tmp_path_factory):
    """PNG (RGB, grey, flat background) and JPEG samples, and the same files on disk for MedSAM's io.imread."""
    from msmedcap.data.shards import write_shards

    out = tmp_path_factory.mktemp("medsam")
    samples, files = [], []
    for i, img in enumerate(make_images()[:4]):
        fmt = "JPEG" if i == 1 else "PNG"
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        ext = "jpg" if fmt == "JPEG" else "png"
        (out / f"m{i}.{ext}").write_bytes(buf.getvalue())
        files.append(str(out / f"m{i}.{ext}"))
        samples.append({"__key__": f"m-{i}", ext: buf.getvalue(), "txt": f"image {i}",
                        "json": {"domain": "medical", "source": "t"}})
    write_shards(samples, out, "m", shard_size=10)
    return str(out / "m-000.tar"), files


def one_batch(cfg, shard):
    from msmedcap.data.loader import make_eval_loader

    (batch,) = list(make_eval_loader(cfg, [shard], 0, 1, batch_size=8))
    return batch


def test_medsam_input_equals_medsams_own_preprocessing(medsam_shard):
    """The loader's uint8 batch through the SAM encoder's input path is MedSAM's tensor, bit for bit: every sample
    at 256 px (MedSAM's code with 256 for its 1024: skimage costs ~4 s per 1024 px image here), and at MedSAM's
    own 1024 px the flat-background greyscale image."""
    from msmedcap.data.transforms import SamTransform, stack_pixels
    from msmedcap.models.encoders import SamEncoder, encoder_input

    shard, files = medsam_shard
    cfg = demo_config("model.sam.preprocess=medsam", "model.sam.image_size=256", "model.variant=sam-blip2",
                      "model.sam.checkpoint=null", "model.allow_random_weights=true")  # the demo's weights are 128 px
    batch = one_batch(cfg, shard)
    assert batch["sam_image"].shape == (4, 256, 256, 3) and batch["sam_image_size"].tolist() == [[256, 256]] * 4
    x = SamEncoder(cfg.model.sam).prepare(batch["sam_image"], batch["sam_image_size"])
    for i, path in enumerate(files):
        assert torch.equal(x[i:i + 1], medsam_reference(path, 256)), path
        assert x[i].min() == 0 and x[i].max() == 1
    t = SamTransform(1024, "medsam")
    for path in files[3:]:
        px, sizes = stack_pixels([t.pixels(Image.open(path))])
        ref = medsam_reference(path)
        assert torch.equal(encoder_input(px, t.mean, t.std, torch.float32, 1024, sizes, minmax=True), ref), path
        assert torch.equal(_min_max_floats(px), ref)  # the float transform's own scaling (``t(image)``)


def _min_max_floats(px: torch.Tensor) -> torch.Tensor:
    from msmedcap.data.transforms import _min_max

    return torch.from_numpy(_min_max(px[0].numpy())).permute(2, 0, 1)[None]


def test_medsam_through_the_device_resize_and_the_cache_key(medsam_shard, tmp_path):
    """``data.resize_on_device`` resizes to the same squash and scales the same way (torchvision's bicubic, not
    skimage's spline: close, said by a warning); the choice changes the SAM feature store, not the CLIP one."""
    from msmedcap.data.transforms import NATIVE_KEY, SamTransform
    from msmedcap.models import build_model
    from msmedcap.models.feature_cache import attach_feature_cache

    shard, _ = medsam_shard
    base = ["model.sam.preprocess=medsam", "model.sam.image_size=128"]
    with pytest.warns(ConfigWarning, match="not resized as MedSAM's script does"):
        dev_cfg = demo_config(*base, "data.resize_on_device=true")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cpu_cfg = demo_config(*base)
    model = build_model(dev_cfg.model).eval()
    assert isinstance(model.encoders["sam"].transform, SamTransform) and model.encoders["sam"].transform.minmax
    dev, cpu = one_batch(dev_cfg, shard), one_batch(cpu_cfg, shard)
    assert NATIVE_KEY in dev and "sam_image" not in dev
    out, ref = model.encode(dev, "sam"), model.encode(cpu, "sam")
    assert dev["sam_image"].shape == cpu["sam_image"].shape == (4, 128, 128, 3)
    diff = (dev["sam_image"].int() - cpu["sam_image"].int()).abs().float()
    assert diff.mean() < 4  # measured: 0.3 to 2.0 per image, max 16 to 45 (noise pixels, sharp edges)
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()

    stores = {}
    for name, c in (("sam", demo_config("model.sam.image_size=128")), ("medsam", cpu_cfg)):
        cache = attach_feature_cache(build_model(c.model), tmp_path / name)
        stores[name] = {b: s.dir.name for b, s in cache.stores.items()}
    assert stores["sam"]["clip"] == stores["medsam"]["clip"]
    assert stores["sam"]["sam"] != stores["medsam"]["sam"]
    ident = json.loads((tmp_path / "medsam" / stores["medsam"]["sam"] / "identity.json").read_text())
    assert ident["config"]["preprocess"] == "medsam"
    assert dataclasses.asdict(cpu_cfg.model.sam)["preprocess"] == "medsam"


def test_medsam_through_gpu_decode(medsam_shard, monkeypatch):
    """``data.gpu_decode``'s code with torchvision's CPU decoder: the JPEG's placeholder is MedSAM's square, filled
    by the model's input path with the squash; PNGs keep the workers' exact MedSAM pixels."""
    from msmedcap.data import loader as loader_mod
    from msmedcap.models import build_model

    shard, _ = medsam_shard
    base = ["model.sam.preprocess=medsam", "model.sam.image_size=128"]
    cpu = one_batch(demo_config(*base), shard)
    monkeypatch.setattr(loader_mod, "gpu_decode_available", lambda: True)
    with pytest.warns(ConfigWarning, match="not resized as MedSAM's script does"):
        cfg = demo_config(*base, "data.gpu_decode=true")
    pending = one_batch(cfg, shard)
    assert [d is not None for d in pending["jpeg_bytes"]] == [False, True, False, False]
    assert pending["sam_image_size"].tolist() == [[128, 128]] * 4 and not pending["sam_image"][1].any()
    build_model(cfg.model).eval().encode(pending, "sam")
    diff = (pending["sam_image"].int() - cpu["sam_image"].int()).abs()
    assert not diff[[0, 2, 3]].any()
    assert 0 < diff[1].float().mean() < 4  # torchvision's decoder and bicubic against PIL + skimage's spline


def test_a_weightless_local_dir_tower_builds_random_only_when_allowed(tmp_path, caplog):
    """A ``local-dir:`` folder without a weights file is a frozen part without weights: refused naming
    model.clip.name, and with model.allow_random_weights built random under the loud warning (the warning
    once looked its part up in a list beside random_frozen_parts' keys, and raised KeyError for this one)."""
    import logging

    from msmedcap.models import build_model

    folder = tmp_path / "tower"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(SIGLIP_LIKE))
    base = [f"model.clip.name=local-dir:{folder}", "model.clip.pretrained=null", "model.clip.image_size=null",
            "model.variant=blip2"]
    with pytest.raises(ConfigError, match=r"model\.clip\.name must be set"):
        demo_config(*base)
    cfg = demo_config(*base, "model.allow_random_weights=true")
    with caplog.at_level(logging.WARNING):
        build_model(cfg.model)
    assert "RANDOM WEIGHTS" in caplog.text and "model.clip.name" in caplog.text
