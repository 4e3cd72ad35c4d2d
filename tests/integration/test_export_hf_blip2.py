"""`msmedcap export --hf`: a blip2 export as transformers' Blip2ForConditionalGeneration (transformers
5.x, loaded with its own from_pretrained and Blip2Processor, no msmedcap code), captioning as `msmedcap
caption` does, and imported back (model.blip2_checkpoint) bit for bit. The CLIP tower is a tiny timm EVA
inside open_clip, as open_clip builds EVA01-g-14 (BLIP-2's tower; tests/unit/test_model_blip2_import.py)."""
import json

import numpy as np
import pytest
import torch
from helpers.model_kit import demo_config, one_thread, tiny_eva_clip_json
from PIL import Image

from msmedcap.cli import main
from msmedcap.eval.caption import caption_files
from msmedcap.models import build_model, load_from_export, save_trainable
from msmedcap.models.loading import blip2_expected

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def tiny_eva_json(tmp_path_factory):
    return tiny_eva_clip_json(tmp_path_factory.mktemp("eva"))


def blip2_export(tmp_path_factory, tokenizers, tiny_eva_json, *extra):
    """A blip2 model (fp32, random frozen parts of fixed seed, trained-looking random trainables) saved as
    the trainer saves its exports."""
    cfg = demo_config(tokenizers, "model.variant=blip2", "model.frozen_dtype=fp32", "model.lm.dtype=fp32",
                      f"model.clip.name={tiny_eva_json}", "model.clip.pretrained=null", "model.clip.image_size=28",
                      "model.lm.num_soft_prompts=0", "eval.num_beams=1", "eval.min_len=2", "eval.max_len=12", *extra)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # away from init: ln_vision and the queries as a trained model has them
        model.qformers["clip"].ln_vision.weight.normal_(1.0, 0.2)
        model.qformers["clip"].ln_vision.bias.normal_(std=0.2)
        model.qformers["clip"].query_tokens.normal_(std=0.5)
    out = tmp_path_factory.mktemp("export")
    save_trainable(model, out, cfg)
    return out, cfg


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNGs at the tower's input size (28 px) and others (resized and cropped, odd margins included)."""
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(28, 28), (40, 33), (33, 61), (100, 29)]):
        p = out / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def hf_captions(out_dir, paths, prompt) -> list:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(out_dir).eval()
    processor = Blip2Processor.from_pretrained(out_dir, backend="pil")  # PIL's resize, as msmedcap's
    inputs = processor(images=[Image.open(p).convert("RGB") for p in paths], text=[prompt] * len(paths),
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=model.generation_config)  # the run's eval settings
    return [t.strip() for t in processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)]


@pytest.mark.parametrize("vocab", ["spare", "grown"])
def test_hf_export_captions_as_msmedcap_and_imports_back_bit_for_bit(tmp_path_factory, tokenizers, tiny_eva_json, images,
                                                                      vocab):
    """``spare``: the LM's vocabulary has an unused row (OPT-2.7B has 7: 50272 for 50265 tokens), the image
    token takes it; ``grown``: none, the export adds a row whose token generation suppresses."""
    extra = ["model.lm.config.vocab_size=401"] if vocab == "spare" else []
    export, cfg = blip2_export(tmp_path_factory, tokenizers, tiny_eva_json, *extra)
    out = tmp_path_factory.mktemp("hf") / "blip2-hf"
    assert main(["export", str(export), "--hf", str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Blip2ForConditionalGeneration"]
    assert hf_cfg["text_config"]["vocab_size"] == 401  # 400 tokens + <image>

    ours = [c for _, c in caption_files([str(p) for p in images], str(export))]
    theirs = hf_captions(out, images, cfg.model.lm.prompt)
    assert theirs == ours
    assert any(ours)

    # export -> import: every tensor BLIP-2 holds comes back as it was
    original, _ = load_from_export(export)  # the export's model (frozen parts of fixed seed)
    before = original.state_dict()
    back_cfg = demo_config(tokenizers, "model.variant=blip2", "model.frozen_dtype=fp32",
                           "model.lm.dtype=fp32", f"model.clip.name={tiny_eva_json}", "model.clip.pretrained=null",
                           "model.clip.image_size=28", "model.lm.num_soft_prompts=0", f"model.blip2_checkpoint={out}")
    back_cfg.model.lm.config = {}  # OPT's architecture from the checkpoint's text_config
    back = build_model(back_cfg.model).state_dict()
    keys = blip2_expected(original) + [k for k in before if k.startswith("encoders.clip.")]
    assert len(keys) > 50
    for k in keys:
        rows = before[k].shape[0] if k.startswith("captioner.lm.") and "embed_tokens" in k else None
        assert torch.equal(back[k][:rows], before[k]), k
    if vocab == "spare":
        assert back["captioner.lm.model.decoder.embed_tokens.weight"].shape == before[
            "captioner.lm.model.decoder.embed_tokens.weight"].shape


@pytest.mark.parametrize("override,named", [("model.lm.num_soft_prompts=4", "num_soft_prompts=4"),
                                             ("model.clip.token_mlp=2", "model.clip.token_mlp")])
def test_hf_export_refuses_what_blip2_cannot_hold_before_any_work(tmp_path_factory, tokenizers, tiny_eva_json, capsys,
                                                                  override, named):
    export, _ = blip2_export(tmp_path_factory, tokenizers, tiny_eva_json, override)
    parent = tmp_path_factory.mktemp("refused")
    assert main(["export", str(export), "--hf", str(parent / "out")]) == 2
    assert named in capsys.readouterr().err
    assert list(parent.iterdir()) == []  # nothing half-written, no hidden leftovers


def test_hf_export_refuses_an_open_clip_vit_tower(tmp_path, capsys):
    """The demo's CLIP tower (open_clip's native ViT, packaged weights) has ln_pre: refused after the build,
    before anything is written."""
    from msmedcap.config import load_config

    cfg = load_config("demo", ["model.variant=blip2", "model.lm.num_soft_prompts=0"])
    save_trainable(build_model(cfg.model), tmp_path / "export", cfg)
    parent = tmp_path / "outs"
    parent.mkdir()
    assert main(["export", str(tmp_path / "export"), "--hf", str(parent / "out")]) == 2
    assert "ln_pre" in capsys.readouterr().err
    assert list(parent.iterdir()) == []
