"""Shared pieces of the tests/unit/test_model_*.py files: tiny demo configs with tokenizers trained in a
temporary directory, and batches in the msmedcap.batch format. (No tests here.)"""
from __future__ import annotations

import torch

from msmedcap.config import load_config
from msmedcap.demo.tokenizers import train_demo_tokenizers
from msmedcap.tokenization import load_lm_tokenizer, load_qformer_tokenizer

CAPTIONS = [
    "a chest x-ray showing a small nodule in the left lung",
    "a dog running on the beach at sunset",
    "axial ct scan of the abdomen with contrast",
    "two cats sleeping on a red sofa",
    "mri of the brain showing a lesion in the right frontal lobe",
    "a man riding a bicycle down a city street",
    "ultrasound of the liver with a hypoechoic mass",
    "a bowl of fruit on a wooden table",
]


def tokenizer_dirs(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("tokenizers")
    q, lm = train_demo_tokenizers(CAPTIONS * 10, out, vocab_size=400)
    return str(q), str(lm)


def demo_config(tokenizers: tuple, *overrides: str):
    q, lm = tokenizers
    # the demo's pre-trained LM speaks the shipped tokenizer, not these: a random LM of the same shape
    return load_config("demo", [f"model.qformer.tokenizer={q}", f"model.lm.tokenizer={lm}",
                                "model.lm.name_or_path=null", "model.allow_random_weights=true", *overrides],
                       check_files=False)


def make_batch(cfg, captions=CAPTIONS, domains=None, seed: int = 0) -> dict:
    """A batch as msmedcap.data yields it (random pixels; real tokenization)."""
    g = torch.Generator().manual_seed(seed)
    n = len(captions)
    m = cfg.model
    q = load_qformer_tokenizer(m.qformer.tokenizer)(list(captions), padding="max_length", truncation=True,
                                                      max_length=m.qformer.max_text_len, return_tensors="pt")
    lm = load_lm_tokenizer(m.lm.tokenizer)([c + "\n" for c in captions], add_special_tokens=False,
                                           padding="longest", truncation=True,
                                           max_length=m.lm.max_caption_len, return_tensors="pt")
    domains = torch.tensor(domains if domains is not None else [i % 2 for i in range(n)])
    return {
        "key": [f"s{i}" for i in range(n)], "source": ["test"] * n, "caption": list(captions), "domain": domains,
        "clip_image": torch.randn(n, 3, m.clip.image_size, m.clip.image_size, generator=g),
        "sam_image": torch.randn(n, 3, m.sam.image_size, m.sam.image_size, generator=g),
        "text_input_ids": q.input_ids, "text_attention_mask": q.attention_mask,
        "lm_input_ids": lm.input_ids, "lm_attention_mask": lm.attention_mask,
    }


def one_thread():
    """Fixture body: on 2 shared cores, torch's 2 threads spin against other processes (a 64x64
    linear took 10 ms instead of 0.1 ms); one thread is far faster for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def msmedcap_tiny_eva(pretrained=False, **kwargs):
    """EVA as timm builds EVA01-g-14 (eva_giant_patch14_224), at toy size."""
    from timm.models.eva import Eva

    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory extras
        kwargs.pop(key, None)
    return Eva(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, **kwargs)


def tiny_eva_clip_json(directory):
    """An open_clip model config on :func:`msmedcap_tiny_eva` (registered with timm), as EVA01-g-14's
    is on timm's EVA; written into ``directory`` -> its path (``model.clip.name``, image size 28)."""
    import json
    from pathlib import Path

    import timm

    if not timm.list_models("msmedcap_tiny_eva"):
        timm.models.register_model(msmedcap_tiny_eva)
    path = Path(directory) / "tiny-eva.json"
    path.write_text(json.dumps({
        "embed_dim": 16, "custom_text": True,
        "vision_cfg": {"image_size": 28, "timm_model_name": "msmedcap_tiny_eva", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1}}))
    return path
