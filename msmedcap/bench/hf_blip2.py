"""Part 3: the ``blip2`` variant's stage-2 step vs transformers' ``Blip2ForConditionalGeneration`` of the
same sizes with the same frozen parts, on the same batch, through the same DeepSpeed engine config.

Same sizes: the vision tower's width/depth (blocks up to the feature layer; HF applies its
post_layernorm where we apply ``ln_vision``), heads, MLP width, image and patch size; the same Q-Former
and OPT configs and query count; no soft prompts on our side (HF has none). HF's OPT vocabulary has one
extra row for its image token. Frozen: the vision tower and OPT; trainable: Q-Former, queries,
projection. Our Q-Former also carries its stage-1 heads and text embeddings (trainable, zero gradient in
stage 2): that difference in optimizer work is part of what the ratio measures.
"""
from __future__ import annotations

import torch
from torch import nn

from msmedcap.bench.step import bench_step


def vision_sizes(encoder) -> dict:
    """Blip2VisionConfig kwargs from our open_clip tower (open_clip's own ViT or timm's EVA)."""
    visual = encoder.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        block = trunk.blocks[0]
        heads, mlp = block.attn.num_heads, block.mlp.fc1.out_features
        size, patch = trunk.patch_embed.img_size[0], trunk.patch_embed.patch_size[0]
    else:
        block = visual.transformer.resblocks[0]
        heads, mlp = block.attn.num_heads, block.mlp.c_fc.out_features
        size, patch = visual.image_size[0], visual.patch_size[0]
    return dict(hidden_size=encoder.width, intermediate_size=mlp, num_hidden_layers=encoder.layer + 1,
                num_attention_heads=heads, image_size=size, patch_size=patch)


class HFStage2(nn.Module):
    """Blip2ForConditionalGeneration's captioning loss on a batch in the msmedcap format (image tokens,
    then BLIP-2's prompt, then the caption; loss on the caption only, as ours)."""

    def __init__(self, model, prompt_ids: torch.Tensor):
        super().__init__()
        self.hf = model
        self.register_buffer("prompt_ids", prompt_ids.clone(), persistent=False)

    def trainable_named_parameters(self) -> list:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def forward(self, batch: dict) -> dict:
        caption, caption_mask = batch["lm_input_ids"], batch["lm_attention_mask"]
        b = caption.shape[0]
        image = torch.full((b, self.hf.config.num_query_tokens), self.hf.config.image_token_index,
                           device=caption.device)
        prompt = self.prompt_ids.expand(b, -1)
        ids = torch.cat([image, prompt, caption], dim=1)
        mask = torch.cat([torch.ones_like(image), torch.ones_like(prompt), caption_mask], dim=1)
        labels = torch.cat([torch.full_like(image, -100), torch.full_like(prompt, -100),
                            caption.masked_fill(caption_mask == 0, -100)], dim=1)
        pixels = batch["clip_image"]
        if pixels.dtype == torch.uint8:  # a loader batch: normalised as our CLIP encoder's input path does
            from msmedcap.batch import CLIP_MEAN, CLIP_STD
            from msmedcap.models.encoders import encoder_input

            pixels = encoder_input(pixels, CLIP_MEAN, CLIP_STD, self.hf.vision_model.dtype)
        pixels = pixels.to(self.hf.vision_model.dtype)
        return {"loss": self.hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss}


def build_hf_like(model) -> HFStage2:
    """transformers' BLIP-2 with ``model``'s (a blip2-variant MSMedCap) sizes and frozen parts."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from msmedcap.models.qformer import qformer_hf_config

    q = model.cfg.qformer
    lm_cfg = model.captioner.lm.config.to_dict()
    vocab = lm_cfg["vocab_size"]
    lm_cfg.update(vocab_size=vocab + 1)
    qf = qformer_hf_config(q, model.encoders["clip"].width, 2, 0).to_dict()
    qf.update(use_qformer_text_input=False)
    hf_cfg = Blip2Config(vision_config=vision_sizes(model.encoders["clip"]), qformer_config=qf, text_config=lm_cfg,
                         num_query_tokens=q.num_query_tokens, image_token_index=vocab)
    dev, dtype = model.device, model.encoders["clip"].dtype
    with torch.device(dev):
        hf = Blip2ForConditionalGeneration(hf_cfg)
    hf.vision_model.requires_grad_(False).to(dtype).eval()
    hf.language_model.requires_grad_(False).to(dtype).eval()
    return HFStage2(hf, model.captioner.prompt_ids).to(dev)


def bench_vs_transformers(cfg, batch: dict, dev, iters: int, warmup: int, peak: dict) -> dict:
    """Both stage-2 rows and ``ratio`` = our samples/s over transformers'."""
    import copy

    from msmedcap.models import build_model

    cfg = copy.deepcopy(cfg)
    cfg.model.variant, cfg.model.lm.num_soft_prompts = "blip2", 0
    ours_model = build_model(cfg.model).to(dev)
    ours = bench_step(ours_model, cfg, 2, batch, dev, iters, warmup, peak, label="blip2 (msmedcap)")
    hf = build_hf_like(ours_model)
    del ours_model
    theirs = _bench_hf(hf, cfg, batch, dev, iters, warmup, peak)
    return {"ours": ours, "transformers": theirs, "ratio": ours["samples_per_s"] / theirs["samples_per_s"],
            "note": "same sizes, frozen vision+OPT, same batch and DeepSpeed config; ours has no soft prompts "
                    "here; ratio > 1: ours is faster"}


def _bench_hf(module: HFStage2, cfg, batch, dev, iters, warmup, peak) -> dict:
    from msmedcap.bench.common import ds_engine, timed, to_device
    from msmedcap.train.metrics import count_flops

    n = len(batch["key"])
    engine, _ = ds_engine(module, module, cfg, 2, 2, n)
    inputs = to_device(batch, dev)

    def fwd_bwd():
        engine.backward(engine(inputs)["loss"])

    def step():
        fwd_bwd()
        engine.step()

    _, flops = count_flops(fwd_bwd)
    engine.zero_grad()
    seconds = timed(step, dev, iters, warmup)
    trainable = sum(p.numel() for _, p in module.trainable_named_parameters())
    frozen = sum(p.numel() for p in module.parameters()) - trainable
    engine.destroy()
    return {"variant": "blip2 (transformers)", "stage": 2, "micro_batch": n, "step_s": seconds,
            "samples_per_s": n / seconds, "flops_per_sample": flops / n, "achieved_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / (peak["tflops"] * 1e12) if peak.get("tflops") else None,
            "params": {"trainable": trainable, "frozen": frozen, "in_optimizer": trainable}}
