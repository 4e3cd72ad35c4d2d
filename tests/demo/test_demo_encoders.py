"""The demo's frozen encoders are pre-trained stand-ins (issue 15): CLIP contrastive at 32 px, SAM
promptable segmentation at 128 px, rebuilt by ``msmedcap demo encoders clip|sam``,
loaded through the loaders real weights use, and the generator's masks they learn from."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from helpers.model_kit import one_thread

from msmedcap.demo import world as demo
from msmedcap.data.transforms import ClipTransform, SamTransform
from msmedcap.demo import encoder_probes as probes
from msmedcap.demo import encoders as de

pytestmark = pytest.mark.slow

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def cfg():
    """The demo preset's model section with the encoders the shipped weights are for."""
    return de.demo_model_config(*de.SHIPPED_ENCODERS)


# --------------------------------------------------------------------------- the generator's masks
def test_generator_masks_are_what_was_drawn_and_leave_the_samples_unchanged():
    for i in range(12):
        plain = demo.demo_sample(0, "eval", "medical", i)
        s = demo.demo_sample(0, "eval", "medical", i, with_masks=True)
        assert {k: v for k, v in s.items() if k != "masks"} == plain  # same bytes, same caption
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"), np.float32)
        masks, meta = s["masks"], s["json"]
        lesions = [masks[f"lesion/{k}"] for k in range(meta["lesions"])]
        assert len([n for n in masks if n.startswith("lesion/")]) == meta["lesions"]
        organ = masks[f"organ/{meta.get('side', 'left')}"]
        assert masks["body"].sum() > organ.sum() > 100 and not (masks["organ/left"] & masks["organ/right"]).any()
        if lesions:
            union = np.logical_or.reduce(lesions)
            assert (masks["lesions"] == union).all() and (organ | ~union).all()  # inside their side's organ
            other = masks["organ/right" if meta["side"] == "left" else "organ/left"]
            assert not (other & union).any()
            for m in lesions:  # lesions are bright, far above the organ around them (blur, noise, JPEG)
                assert img[m].mean() > img[organ & ~union].mean() + 50, (i, s["txt"])
    for i in range(12):
        plain = demo.demo_sample(0, "eval", "general", i)
        s = demo.demo_sample(0, "eval", "general", i, with_masks=True)
        assert {k: v for k, v in s.items() if k != "masks"} == plain
        img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))  # PNG: exact colours
        background = demo.BACKGROUNDS[s["txt"].rsplit(" on a ", 1)[1].split()[0]]
        drawn = np.zeros(img.shape[:2], bool)
        for g, (count, colour, _) in enumerate(s["json"]["objects"]):
            objects = [s["masks"][f"object/{g}/{k}"] for k in range(count)]
            assert (s["masks"][f"group/{g}"] == np.logical_or.reduce(objects)).all()
            for m in objects:
                assert m.sum() > 150 and (img[m] == demo.COLOURS[colour]).all()
                drawn |= m
        assert (img[~drawn] == background).all()


# --------------------------------------------------------------------------- rebuild
def test_rebuild_is_seeded(cfg):
    """The same seed gives the same weights (a few steps of each builder, twice); another seed does not."""
    def clip(seed):
        return de.train_clip(steps=3, batch_size=16, n_per_domain=24, seed=seed, log_every=0, model_cfg=cfg).state_dict()

    def sam(seed):
        return de.train_sam(steps=2, batch_size=3, targets_per_image=2, seed=seed, log_every=0, model_cfg=cfg).state_dict()

    state = torch.get_rng_state()
    for build in (clip, sam):
        a, b, c = build(0), build(0), build(1)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_caption_batches_hold_no_caption_twice():
    captions = ["a", "b", "a", "c", "a", "b", "d", "e"] * 5
    batches = de.unique_caption_batches(captions, 4, random.Random(0))
    for _ in range(10):
        batch = next(batches)
        assert len(batch) == 4 and len({captions[i] for i in batch}) == 4


# --------------------------------------------------------------------------- the shipped assets
def test_shipped_assets_load_through_the_real_loaders(cfg):
    import open_clip
    from safetensors.torch import load_file

    from msmedcap.config import load_config, resolve_asset
    from msmedcap.models import build_model

    # open_clip's own loader reads the file, both towers, strictly
    clip = de.clip_model(cfg, pretrained=cfg.clip.pretrained)
    shipped = load_file(resolve_asset(cfg.clip.pretrained))
    assert set(shipped) == set(clip.state_dict()) and any(k.startswith("transformer.") for k in shipped)
    assert isinstance(open_clip.create_model("tiny-vit", pretrained=resolve_asset(cfg.clip.pretrained)),
                      open_clip.CLIP)
    # a full-model SAM checkpoint, as SAM's released files, read with weights_only=True
    state = torch.load(resolve_asset(cfg.sam.checkpoint), map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    de.sam_model(cfg, checkpoint=cfg.sam.checkpoint)  # every key fits the tiny Sam (strict)
    # the demo preset's model, through model.clip.pretrained / model.sam.checkpoint
    model = build_model(load_config("demo", [*de.SHIPPED_ENCODERS, "model.frozen_dtype=fp32"], check_files=False).model)
    for k, v in model.encoders["clip"].visual.state_dict().items():
        assert torch.equal(v, shipped[f"visual.{k}"]), k
    for k, v in model.encoders["sam"].encoder.state_dict().items():
        assert torch.equal(v, state[f"image_encoder.{k}"]), k
    # the demo feeds SAM one token per position: 16 x 16 positions of its 32 channels
    assert model.encoders["sam"].num_tokens == 16 * 16 and model.encoders["sam"].width == 32


def _eval_images(domain, n, with_masks=False):
    return [de.pretrain_image(0, domain, i, with_masks=with_masks, split="eval") for i in range(n)]


def test_shipped_clip_retrieves_the_right_caption(cfg):
    """Top-1 caption retrieval on held-out eval images, among their distinct captions: far above chance
    and above random weights of the same model."""
    transform = ClipTransform(cfg.clip.image_size)
    shipped = de.clip_model(cfg, pretrained=cfg.clip.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = de.clip_model(cfg).eval()
    for domain, floor in (("general", 0.6), ("medical", 0.4)):
        samples = _eval_images(domain, 40)
        images = torch.stack([transform(image) for image, _ in samples])
        captions = [s["txt"] for _, s in samples]
        chance = 1 / len(set(captions))
        acc = de.clip_retrieval(shipped, cfg, images, captions)
        assert acc >= floor and acc > 5 * chance, (domain, acc, chance)
        assert de.clip_retrieval(random_init, cfg, images, captions) < 0.2


def test_shipped_sam_segments_prompted_lesions_and_objects(cfg):
    """Box prompts on each lesion (small ones too) and each object of held-out images: the shipped SAM's
    masks overlap them; random weights' do not."""
    transform = SamTransform(cfg.sam.image_size)
    shipped = de.sam_model(cfg, checkpoint=cfg.sam.checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = de.sam_model(cfg)
    ious = {}
    for domain, kinds in (("medical", ("lesion/",)), ("general", ("object/",))):
        samples = _eval_images(domain, 16, with_masks=True)
        images, prompts, targets = [], [], []
        for image, s in samples:
            names = [n for n in sorted(s["masks"]) if n.startswith(kinds)]
            if names:
                images.append(transform(image))
                prompts.append([de.box_prompt(s["masks"][n], None, noise=False) for n in names])
                targets.append(torch.from_numpy(np.stack([s["masks"][n] for n in names])).float())
        images = torch.stack(images)
        ious[domain] = [np.mean(de.sam_iou(m, images, prompts, targets, use_points=False))
                        for m in (shipped, random_init)]
    assert ious["medical"][0] > 0.3 and ious["general"][0] > 0.6, ious
    assert ious["medical"][1] < 0.05 and ious["general"][1] < 0.2, ious


# --------------------------------------------------------------------------- margin readers
def test_position_reader_with_max_finds_a_feature_at_one_position_that_the_mean_dilutes():
    """The readers of ``margin-probe``: a class written at one random position of 256, under noise,
    is read by a per-position linear map + max over positions; pooled by the mean it is 1/256 of
    the noise's size and the same reader stays near chance."""
    gen = torch.Generator().manual_seed(0)

    def data(n):
        x = torch.randn(n, 4, 16, 16, generator=gen)
        y = torch.randint(0, 2, (n,), generator=gen)
        pos = torch.randint(0, 256, (n,), generator=gen)
        x.view(n, 4, 256)[torch.arange(n), y, pos] += 6.0  # channel 0 or 1 lights up at one position
        return x, y.tolist()
    (xf, yf), (xt, yt) = data(600), data(200)
    _, right_max = probes.supervised_probe(xf, yf, xt, yt, reader="linear-max", steps=300)
    _, right_mean = probes.supervised_probe(xf, yf, xt, yt, reader="linear-mean", steps=300)
    assert right_max.float().mean() > 0.9
    assert right_mean.float().mean() < 0.7


def test_margin_probes_run_every_reader(cfg):
    result = probes.margin_probes(n_fit=24, n_test=12, model_cfg=cfg, steps=3)
    assert result["n"] == {"fit": 24, "test": 12}
    for row, weights, *_ in probes.MARGIN_READERS:
        r = result[row, weights]
        assert set(r) == {"fit", "all", "small", "large"} and 0 <= r["all"] <= 1, (row, weights)
