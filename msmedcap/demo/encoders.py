"""The demo's frozen image encoders, pre-trained on the demo's data the way their real counterparts were.

MSMedCap keeps a pre-trained CLIP and a pre-trained SAM frozen and learns only to read them. The
demo's stand-ins are the same classes, tiny, and trained here on generator images of their own
split (``pretrain``: never the train or eval shards' images), each image decoded and transformed
by msmedcap.data's own code (``decode_image``, ``ClipTransform``/``SamTransform``) so that
train-time and use-time inputs match:

- CLIP (open_clip, ``msmedcap/assets/open_clip/tiny-vit.json``, 32 px): contrastive image-caption
  training with open_clip's own text tower (the config's ``text_cfg``: the demo Q-Former's
  WordPiece ids, pooled at [SEP]) and ``open_clip.loss.ClipLoss``. The demo's captions repeat
  (63 medical ones), so no batch holds a caption twice: a duplicate would be a false negative.
  Written as the full open_clip state dict (text tower too: open_clip loads strictly) in
  safetensors, read by ``open_clip.create_model(name, pretrained=file)``.
- SAM (segment-anything, :func:`msmedcap.models.encoders.build_sam_tiny`: ImageEncoderViT,
  PromptEncoder, MaskDecoder + TwoWayTransformer as ``_build_sam`` builds them, tiny, 128 px):
  promptable segmentation of the generator's masks (each lesion, each lesion group, the organs, the
  body, each general object and object group). Per image either one foreground point per target
  (SAM's ambiguity-aware multimask output, the best of 3 masks trained) or a noisy box per target
  (one mask); loss as SAM's: 20 x focal + 1 x dice on the masks, MSE of the IoU head. No iterative
  mask-prompt rounds. Written as a full-model ``.pth`` (``image_encoder.*``, ``prompt_encoder.*``,
  ``mask_decoder.*``, like SAM's released files), loaded through ``model.sam.checkpoint``.

    msmedcap demo encoders clip    # msmedcap/assets/open_clip/tiny-vit-demo.safetensors
    msmedcap demo encoders sam     # msmedcap/assets/sam/tiny-demo.pth
    msmedcap demo encoders probe   # the probe table of docs/demo_encoders.md (msmedcap.demo.encoder_probes)

Seeded: the same ``--seed`` writes the same bytes (same thread count; one by default). Measured on
this project's 2-core machine, one thread, other jobs running (load 1-2.5): clip 2 min 10 s, sam
9 min 4 s (2400 steps; 800 took 2 min 56 s but counted small lesions worse), probe 2 min. Results and probe table: docs/demo_encoders.md.
"""
from __future__ import annotations

import functools
import io
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msmedcap.atomic_files import atomic_write
from msmedcap.config import load_config
from msmedcap.data.decode import decode_image
from msmedcap.demo.world import SIZE, demo_sample
from msmedcap.data.transforms import ClipTransform, SamTransform

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP_OUT = ASSETS / "open_clip" / "tiny-vit-demo.safetensors"
SAM_OUT = ASSETS / "sam" / "tiny-demo.pth"
SPLIT = "pretrain"
DOMAINS = ("general", "medical")
# The encoder settings of the demo preset that the shipped weights are for (its clip/sam sections;
# applied on top of the preset by the rebuild, the probes and the tests, no-ops where it holds them).
SHIPPED_ENCODERS = ("model.clip.pretrained=pkg://assets/open_clip/tiny-vit-demo.safetensors",
                    "model.sam.checkpoint=pkg://assets/sam/tiny-demo.pth",
                    "model.sam.encoder.patch_size=8", "model.sam.encoder.window_size=8")


def demo_model_config(*overrides: str):
    """The demo preset's model section (the encoders' names, sizes and the Q-Former tokenizer)."""
    return load_config("demo", list(overrides), check_files=False).model


def pretrain_image(seed: int, domain: str, index: int, with_masks: bool = False, split: str = SPLIT) -> tuple:
    """(RGB PIL image as msmedcap.data decodes it from the sample's png/jpg bytes, the sample)."""
    sample = demo_sample(seed, split, domain, index, with_masks=with_masks)
    return decode_image(sample.get("png") or sample["jpg"], SIZE * SIZE), sample


def _seeded(train):
    """``train(..., seed=...)`` runs with torch seeded by ``seed``, the caller's RNG state left as it was."""
    @functools.wraps(train)
    def wrapper(*args, seed: int = 0, **kwargs):
        from msmedcap.models.encoders import fixed_seed

        with fixed_seed(seed):
            return train(*args, seed=seed, **kwargs)
    return wrapper


def _cosine_schedule(opt, steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _adamw(model, lr: float, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


# --------------------------------------------------------------------------- CLIP
def clip_model(model_cfg=None, pretrained: str | None = None):
    """The full open_clip CLIP (both towers) of the preset's ``model.clip.name``."""
    import open_clip

    from msmedcap.paths import resolve_asset
    from msmedcap.data.clip_preprocess import open_clip_name

    m = model_cfg or demo_model_config()
    return open_clip.create_model(open_clip_name(m.clip.name), force_image_size=m.clip.image_size,
                                  pretrained=resolve_asset(pretrained) if pretrained else None)


def clip_tokenizer(model_cfg, model):
    """The demo Q-Former's WordPiece tokenizer as ``texts -> [B, context_length]`` ids, checked against
    the text tower's config (vocabulary, [SEP] = the pooled eos id)."""
    from msmedcap.tokenization import load_qformer_tokenizer

    tok = load_qformer_tokenizer(model_cfg.qformer.tokenizer)
    vocab, length = model.vocab_size, model.context_length  # open_clip's CLIP holds its text tower's
    if len(tok) > vocab or model.text_pool_type != "eos" or model.text_eos_id != tok.sep_token_id:
        raise ValueError(f"{model_cfg.clip.name}: text_cfg needs vocab_size >= {len(tok)}, pool_type 'eos' and "
                         f"eos_id {tok.sep_token_id} ([SEP] of {model_cfg.qformer.tokenizer})")

    def tokenize(texts):
        return tok(list(texts), padding="max_length", truncation=True, max_length=length,
                   return_tensors="pt").input_ids
    return tokenize


def clip_pool(seed: int, n_per_domain: int, image_size: int) -> tuple:
    """[N, 3, s, s] ClipTransform'd pretrain images of both domains and their captions."""
    transform = ClipTransform(image_size)
    images, captions = [], []
    for i in range(n_per_domain):
        for domain in DOMAINS:
            image, sample = pretrain_image(seed, domain, i)
            images.append(transform(image))
            captions.append(sample["txt"])
    return torch.stack(images), captions


def unique_caption_batches(captions: list, batch_size: int, rng: random.Random):
    """Endless index batches, epoch after epoch of a seeded shuffle, none holding a caption twice: a
    sample whose caption the batch already has is passed over until the next epoch."""
    while True:
        order = list(range(len(captions)))
        rng.shuffle(order)
        batch, seen = [], set()
        for i in order:
            if captions[i] in seen:
                continue
            batch.append(i)
            seen.add(captions[i])
            if len(batch) == batch_size:
                yield batch
                batch, seen = [], set()


@_seeded
def train_clip(steps: int = 1000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, n_per_domain: int = 4000,
               log_every: int = 100, model_cfg=None):
    """The CLIP stand-in trained contrastively; returns the open_clip model (train mode off)."""
    from open_clip.loss import ClipLoss

    m = model_cfg or demo_model_config()
    model = clip_model(m)
    tokenize = clip_tokenizer(m, model)
    images, captions = clip_pool(seed, n_per_domain, m.clip.image_size)
    texts = tokenize(captions)
    batches = unique_caption_batches(captions, batch_size, random.Random(seed))
    loss_fn = ClipLoss()
    opt = _adamw(model, lr, weight_decay=0.1)
    sched = _cosine_schedule(opt, steps, warmup=max(1, steps // 20))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.tensor(next(batches))
        image_features, text_features, logit_scale = model(images[idx], texts[idx])
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop
        if log_every and (step + 1) % log_every == 0:
            print(f"clip step {step + 1}/{steps}: loss {loss.item():.3f}, logit scale "
                  f"{logit_scale.item():.1f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def clip_retrieval(model, model_cfg, images, captions) -> float:
    """Top-1 image -> caption accuracy among the distinct ``captions`` (a hit = the same text)."""
    tokenize = clip_tokenizer(model_cfg, model)
    candidates = sorted(set(captions))
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokenize(candidates), normalize=True)
    best = (image_features @ text_features.T).argmax(dim=1)
    return sum(candidates[j] == c for j, c in zip(best.tolist(), captions)) / len(captions)


def save_clip(model, out: str | Path = CLIP_OUT) -> Path:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, tmp))
    return Path(out)


# --------------------------------------------------------------------------- SAM
# how often each kind of generator mask is a target (lesions are what the demo's SAM is for)
TARGET_WEIGHTS = {"lesion": 3.0, "lesions": 1.0, "organ": 1.0, "body": 0.5, "object": 2.0, "group": 1.0}
BOX_NOISE, BOX_NOISE_MAX = 0.1, 2.5  # SAM: sd 10 % of the side, at most 20 px at 1024 (2.5 at 128)


def sam_model(model_cfg=None, checkpoint: str | None = None):
    """The full tiny ``Sam`` of the preset's ``model.sam`` section."""
    from msmedcap.models.encoders import build_sam_tiny

    m = model_cfg or demo_model_config()
    return build_sam_tiny(m.sam.image_size, checkpoint=checkpoint, **m.sam.encoder)


def sample_targets(masks: dict, k: int, rng: random.Random) -> list:
    names = sorted(n for n, v in masks.items() if v.any())
    return rng.choices(names, [TARGET_WEIGHTS[n.split("/")[0]] for n in names], k=k)


def point_prompt(mask: np.ndarray, rng: random.Random) -> list:
    ys, xs = np.nonzero(mask)
    j = rng.randrange(len(xs))
    return [float(xs[j]), float(ys[j])]  # (x, y) pixels of the SAM input; the prompt encoder adds 0.5


def box_prompt(mask: np.ndarray, rng: random.Random, noise: bool = True) -> list:
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    if noise:
        w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
        box = [v + max(-BOX_NOISE_MAX, min(BOX_NOISE_MAX, rng.gauss(0, BOX_NOISE * side)))
               for v, side in zip(box, (w, h, w, h))]
    return [min(max(v, 0.0), SIZE - 1.0) for v in box]


def sam_predict(sam, embedding, points=None, boxes=None, multimask: bool = False) -> tuple:
    """One image's ``[1, C, g, g]`` embedding, P prompts (points ``[P, 2]`` or boxes ``[P, 4]`` in
    input pixels) -> the decoder's low-resolution mask logits ``[P, M, 4g, 4g]`` and its IoU
    predictions ``[P, M]``."""
    if points is not None:
        coords = torch.as_tensor(points, dtype=torch.float32)[:, None, :]
        prompt = dict(points=(coords, torch.ones(coords.shape[:2], dtype=torch.int)), boxes=None, masks=None)
    else:
        prompt = dict(points=None, boxes=torch.as_tensor(boxes, dtype=torch.float32), masks=None)
    sparse, dense = sam.prompt_encoder(**prompt)
    return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)


def mask_ious(low_res: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU ``[P, M]`` of each output, upsampled to the input size as ``Sam.postprocess_masks`` does and
    thresholded at 0, with ``target`` ``[P, S, S]`` in {0, 1}."""
    with torch.no_grad():
        hard = F.interpolate(low_res, target.shape[-2:], mode="bilinear", align_corners=False) > 0
        t = target[:, None].bool()
        return (hard & t).flatten(2).sum(-1) / (hard | t).flatten(2).sum(-1).clamp(min=1)


def mask_losses(low_res: torch.Tensor, target: torch.Tensor) -> tuple:
    """SAM's mask loss per output ``[P, M]``: 20 x focal (alpha 0.25, gamma 2) + dice, at the decoder's
    resolution (``target`` ``[P, S, S]`` area-averaged to it, as MedSAM and others train at 256 for
    1024); and each output's IoU there (thresholded at 0, against the averaged target: soft Jaccard),
    the IoU head's target."""
    t = F.adaptive_avg_pool2d(target[:, None], low_res.shape[-2:]).expand_as(low_res)
    p = low_res.sigmoid()
    ce = F.binary_cross_entropy_with_logits(low_res, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).flatten(2).mean(-1)
    t_sum = t.flatten(2).sum(-1)
    dice = 1 - (2 * (p * t).flatten(2).sum(-1) + 1) / (p.flatten(2).sum(-1) + t_sum + 1)
    with torch.no_grad():
        hard = (low_res > 0).float()
        inter = torch.minimum(hard, t).flatten(2).sum(-1)
        iou = inter / (hard.flatten(2).sum(-1) + t_sum - inter).clamp(min=1e-6)
    return 20 * focal + dice, iou


def sam_batch(seed: int, step: int, batch_size: int, targets_per_image: int, rng: random.Random, transform) -> list:
    """Images of step ``step`` (two thirds medical) with their prompts and target masks."""
    out = []
    for j in range(batch_size):
        domain = "general" if j % 3 == 0 else "medical"
        image, sample = pretrain_image(seed, domain, step * batch_size + j, with_masks=True)
        masks = sample["masks"]
        names = sample_targets(masks, targets_per_image, rng)
        use_points = rng.random() < 0.5
        prompts = [point_prompt(masks[n], rng) if use_points else box_prompt(masks[n], rng) for n in names]
        target = torch.from_numpy(np.stack([masks[n] for n in names])).float()
        out.append((transform(image), use_points, prompts, target))
    return out


def decode_batch(sam, embeddings: torch.Tensor, batch: list) -> tuple:
    """All images' prompts at once: the prompt encoder on every image's points (one each, padded as
    SAM pads a lone point) or boxes, then ``MaskDecoder.predict_masks`` per image under
    ``torch.func.vmap`` (the same numbers as one call per image, fewer, larger operations) ->
    low-resolution logits ``[B, P, 4, 4g, 4g]`` and IoU predictions ``[B, P, 4]`` (output 0: the
    single-mask one, 1-3: the multimask ones, as ``MaskDecoder.forward`` slices them)."""
    from torch.func import vmap

    enc = sam.prompt_encoder
    sparse = []
    for _, use_points, prompts, _ in batch:
        if use_points:
            coords = torch.as_tensor(prompts, dtype=torch.float32)[:, None, :]
            sparse.append(enc(points=(coords, torch.ones(coords.shape[:2], dtype=torch.int)), boxes=None,
                              masks=None)[0])
        else:
            sparse.append(enc(points=None, boxes=torch.as_tensor(prompts, dtype=torch.float32), masks=None)[0])
    dense = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *enc.image_embedding_size)
    image_pe = enc.get_dense_pe()

    def one_image(embedding, prompts):
        return sam.mask_decoder.predict_masks(embedding[None], image_pe, prompts, dense)
    return vmap(one_image)(embeddings, torch.stack(sparse))


@_seeded
def train_sam(steps: int = 2400, batch_size: int = 16, targets_per_image: int = 4, lr: float = 3e-3, seed: int = 0,
              log_every: int = 50, model_cfg=None):
    """The SAM stand-in trained for promptable segmentation; returns the ``Sam`` (eval mode)."""
    m = model_cfg or demo_model_config()
    rng = random.Random(seed)
    sam = sam_model(m)
    transform = SamTransform(m.sam.image_size)
    opt = _adamw(sam, lr, weight_decay=0.05)
    sched = _cosine_schedule(opt, steps, warmup=max(1, steps // 20))
    sam.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = sam_batch(seed, step, batch_size, targets_per_image, rng, transform)
        embeddings = sam.image_encoder(torch.stack([b[0] for b in batch]))
        low_res, iou_pred = decode_batch(sam, embeddings, batch)
        mask_loss, iou_loss, ious = [], [], []
        for multimask in (True, False):  # a lone point: the best of 3 masks learns (SAM); a box: one mask
            idx = [b for b, item in enumerate(batch) if item[1] == multimask]
            if not idx:
                continue
            outputs = slice(1, None) if multimask else slice(0, 1)
            low = low_res[idx][:, :, outputs].flatten(0, 1)
            target = torch.cat([batch[b][3] for b in idx])
            loss, iou = mask_losses(low, target)
            mask_loss.append(loss.min(dim=1).values)
            iou_loss.append(F.mse_loss(iou_pred[idx][:, :, outputs].flatten(0, 1), iou, reduction="none").mean(1))
            ious.append(iou.gather(1, loss.argmin(1, keepdim=True)))
        loss = torch.cat(mask_loss).mean() + torch.cat(iou_loss).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"sam step {step + 1}/{steps}: loss {loss.item():.3f}, IoU {torch.cat(ious).mean().item():.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return sam.eval()


@torch.no_grad()
def sam_iou(sam, images: torch.Tensor, prompts: list, targets: list, use_points: bool) -> list:
    """IoU of the predicted mask per prompt (a point: the output the IoU head ranks first, as SAM's
    predictor picks; a box: the single output) for ``images[i]`` with ``prompts[i]``/``targets[i]``."""
    embeddings = sam.image_encoder(images)
    out = []
    for i in range(len(images)):
        low_res, iou_pred = sam_predict(sam, embeddings[i:i + 1], points=prompts[i] if use_points else None,
                                        boxes=None if use_points else prompts[i], multimask=use_points)
        iou = mask_ious(low_res, targets[i])
        out += iou.gather(1, iou_pred.argmax(1, keepdim=True))[:, 0].tolist()
    return out


def save_sam(sam, out: str | Path = SAM_OUT) -> Path:
    buf = io.BytesIO()  # not torch.save(path): its zip names the archive after the (temporary) file
    torch.save({k: v.contiguous() for k, v in sam.state_dict().items()}, buf)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    return Path(out)
