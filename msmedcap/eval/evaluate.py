"""The fused evaluation job: each rank captions its disjoint part of the eval shards (batched beam
search), rank 0 gathers every record, scores them once with pycocoevalcap and writes
predictions.jsonl, scores.json and gallery.html, and prints the table."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from msmedcap.batch import DOMAINS
from msmedcap.train.world import to_device  # noqa: F401  (one copy: the trainer's, the bench's)


def generation_kwargs(cfg) -> dict:
    """model.generate settings from cfg.eval (the prompt is the model's, cfg.model.lm.prompt)."""
    e = cfg.eval
    return dict(num_beams=e.num_beams, min_len=e.min_len, max_len=e.max_len,
                repetition_penalty=e.repetition_penalty, length_penalty=e.length_penalty)


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def sample_batch(batch: dict, i: int) -> dict:
    """Sample ``i`` of a batch as a batch of one (tensors and lists sliced; other entries, such as
    the skip counts, dropped)."""
    return {k: v[i:i + 1] for k, v in batch.items() if torch.is_tensor(v) or isinstance(v, list)}


# --------------------------------------------------------------------------- thumbnails
def batch_thumbnails(batch: dict) -> list:
    """Base64 JPEG thumbnails from the batch's own images (no second read of the shards): the
    highest-resolution one of the registered encoders' images (msmedcap.registry; at equal size a
    ``padded`` one, which holds the whole image: SAM's); uint8 pixels ``[B, H, W, 3]`` cropped to each
    image's size (the batch padding), or normalised float ``[B, 3, H, W]`` un-normalised with the
    encoder's mean/std, a ``padded`` encoder's zero padding cropped."""
    from PIL import Image

    from msmedcap.eval.gallery import thumbnail_b64
    from msmedcap.registry import ENCODERS

    candidates = [s for s in ENCODERS.values() if torch.is_tensor(batch.get(s.image_key))]
    if not candidates:
        return [None] * len(batch["key"])

    def side(spec):
        t = batch[spec.image_key]
        return max(t.shape[1:3]) if t.dtype == torch.uint8 else max(t.shape[-2:]), spec.padded

    spec = max(candidates, key=side)
    if batch[spec.image_key].dtype == torch.uint8:
        images, sizes = batch[spec.image_key].detach().cpu(), batch.get(spec.size_key)
        out = []
        for i, img in enumerate(images):
            if sizes is not None:
                h, w = (int(v) for v in sizes[i])
                img = img[:h, :w]
            out.append(thumbnail_b64(Image.fromarray(img.numpy(), "RGB")))
        return out
    mean, std = spec.transform_class.mean, spec.transform_class.std
    images = batch[spec.image_key].detach().float().cpu()
    out = []
    for img in images:
        if spec.padded:  # padding is exactly 0 after normalisation: keep the used box
            used = img.abs().sum(0) > 0
            rows, cols = used.any(1).nonzero(), used.any(0).nonzero()
            if len(rows) and len(cols):
                img = img[:, : int(rows[-1]) + 1, : int(cols[-1]) + 1]
        rgb = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        arr = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        out.append(thumbnail_b64(Image.fromarray(arr, "RGB")))
    return out


# --------------------------------------------------------------------------- generation
def rank_quota(max_samples: int, rank: int, world_size: int) -> int:
    """This rank's share of eval.max_samples (0 = no limit); the shares add up to max_samples."""
    if max_samples <= 0:
        return 0
    return max_samples // world_size + (1 if rank < max_samples % world_size else 0)


def manifest_total(specs: Sequence[str]) -> Optional[int]:
    """Samples in ``specs`` according to the shards' manifest.json files; None when any shard is not
    local or has no manifest entry (then only duplicates can be checked, not losses)."""
    from msmedcap.data.shard_spec import expand_braces, is_local_shard, split_weighted_spec
    from msmedcap.data.shards import read_manifest

    total, manifests = 0, {}
    for spec in specs:
        for url in expand_braces(split_weighted_spec(spec)[0]):
            path = Path(url)
            if not is_local_shard(url) or not path.is_file():
                return None
            entry = manifests.setdefault(path.parent, read_manifest(path.parent))["shards"].get(path.name)
            if entry is None:
                return None
            total += entry["samples"]
    return total


@torch.no_grad()
def generate_records(model, batches, gen_kwargs: dict, limit: int = 0, thumbnails: bool = True,
                     skipped: Optional[dict] = None) -> list:
    """Caption every batch -> records (key, source, domain, references, prediction[, thumbnail]).
    ``limit`` > 0 stops after that many samples; ``skipped`` accumulates the loader's skip counts."""
    from msmedcap.train.signals import fault_point

    device = model_device(model)
    records = []
    rank = int(os.environ.get("RANK", 0))
    for n_batch, batch in enumerate(batches, 1):
        fault_point("eval.batch", None, n_batch, rank)
        if limit and len(records) >= limit:
            break
        for reason, n in (batch.get("skipped") or {}).items():
            if skipped is not None:
                skipped[reason] = skipped.get(reason, 0) + int(n)
        if not batch["key"]:  # skip counts only (make_eval_loader's count_batches)
            continue
        inputs = to_device(batch, device)
        captions = model.generate(inputs, **gen_kwargs)
        if len(captions) != len(batch["key"]):
            raise RuntimeError(f"model.generate returned {len(captions)} captions for {len(batch['key'])} samples")
        thumbs = batch_thumbnails(inputs) if thumbnails else None  # inputs: decoded on the device (data.gpu_decode)
        records += batch_records(batch, captions, thumbs)
    return records[:limit] if limit else records


def batch_records(batch: dict, captions: list, thumbs: Optional[list] = None) -> list:
    """A batch's records: key, source, domain, references, prediction[, thumbnail]."""
    domains = batch["domain"].tolist() if torch.is_tensor(batch["domain"]) else list(batch["domain"])
    records = []
    for i, caption in enumerate(captions):
        rec = {"key": str(batch["key"][i]), "source": str(batch["source"][i]),
               "domain": DOMAINS[domains[i]] if isinstance(domains[i], int) else str(domains[i]),
               "references": [batch["caption"][i]], "prediction": caption.strip()}
        if thumbs and thumbs[i]:
            rec["thumbnail"] = thumbs[i]
        records.append(rec)
    return records


def merge_parts(parts: list, specs: Sequence[str], max_samples: int) -> tuple:
    """Every rank's ``{"records", "skipped"}`` (as gathered on rank 0) -> (records, skipped counts,
    expected total or None), checked exact-once: with manifests, the records and the samples skipped and
    counted must add up to the shards' total (a broken tar stream has no per-sample count, so then only
    duplicates are checked)."""
    from msmedcap.eval.gather import check_exact_once

    records = [r for part in parts for r in part["records"]]
    skipped: dict = {}
    for part in parts:
        for reason, n in part["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    total = manifest_total(specs) if max_samples <= 0 and "bad_tar" not in skipped else None
    check_exact_once(records, per_rank=[len(p["records"]) for p in parts],
                     expected=None if total is None else total - sum(skipped.values()))
    return records, skipped, total


# --------------------------------------------------------------------------- the job
# What one evaluation writes (rank 0); removed when a new evaluation starts in the same directory,
# so a failed one leaves none of them. scores.json is written after every other output.
OUTPUTS = ("scores.json", "predictions.jsonl", "gallery.html")


def evaluate(model, cfg, out_dir, rank: int = 0, world_size: int = 1, specs: Optional[Sequence[str]] = None,
             checkpoint: Optional[str] = None) -> Optional[dict]:
    """Caption the eval shards on every rank, gather on rank 0, score, write, print.

    Args:
        model: the captioning model (``model.generate(batch, num_beams, min_len, max_len,
            repetition_penalty, length_penalty) -> list[str]``); a DeepSpeed engine is unwrapped.
            Every rank calls this with its own replica; its train/eval mode is restored afterwards.
        cfg: the run's :class:`msmedcap.config.Config`; generation settings come from ``cfg.eval``,
            the prompt from ``cfg.model.lm.prompt``, the shards from ``cfg.data.eval``.
        out_dir: where rank 0 writes ``predictions.jsonl``, ``scores.json`` and ``gallery.html``.
        rank, world_size: this process's place in the initialised torch.distributed group (all
            ranks must call; 1 = no process group needed).
        specs: shard specs to evaluate instead of ``cfg.data.eval``.
        checkpoint: recorded in scores.json (the export or checkpoint the weights came from).

    Returns:
        On rank 0 the scores (as written to scores.json: overall, per domain, per source, counts,
        times); ``None`` on the other ranks.
    """
    from msmedcap.data.loader import make_eval_loader
    from msmedcap.eval.gather import gather_to_rank0
    from msmedcap.eval.gallery import write_gallery
    from msmedcap.eval.io import write_json, write_jsonl
    from msmedcap.eval.report import print_scores
    from msmedcap.eval.scoring import score_records

    model = getattr(model, "module", model)  # DeepSpeed engine -> the model
    specs = list(specs or cfg.data.eval)
    out = Path(out_dir)
    if rank == 0:  # an earlier evaluation's results must not pass for this one's if this one fails
        for name in OUTPUTS:
            if (out / name).exists():
                (out / name).unlink()
    was_training = model.training
    model.eval()
    start = time.time()
    skipped: dict = {}
    try:
        loader = make_eval_loader(cfg, specs, rank, world_size, cfg.eval.batch_size, count_batches=True)
        records = generate_records(model, loader, generation_kwargs(cfg),
                                   limit=rank_quota(cfg.eval.max_samples, rank, world_size),
                                   thumbnails=cfg.eval.gallery, skipped=skipped)
    finally:
        model.train(was_training)
    generate_s = time.time() - start
    parts = gather_to_rank0({"records": records, "skipped": skipped}, rank, world_size)
    if rank != 0:
        return None
    everything, skipped, total = merge_parts(parts, specs, cfg.eval.max_samples)  # none lost, none twice

    start = time.time()
    scores = score_records(everything)
    for rec in everything:
        rec["scores"] = scores["per_sample"][rec["key"]]
        rec["findings"] = scores["per_sample_findings"][rec["key"]]
    del scores["per_sample"], scores["per_sample_findings"]
    if cfg.eval.protocol == "imageclef":
        from msmedcap.eval.imageclef import score_imageclef

        scores["imageclef"] = score_imageclef(everything, cfg.eval.imageclef, device=model_device(model).type)
        for rec in everything:
            rec["imageclef"] = scores["imageclef"]["per_sample"][rec["key"]]
        del scores["imageclef"]["per_sample"]
    score_s = time.time() - start
    scores.update(
        checkpoint=None if checkpoint is None else str(checkpoint),
        data=specs,
        samples={"total": len(everything), "per_rank": [len(p["records"]) for p in parts], "skipped": skipped,
                 "expected": total, "max_samples": cfg.eval.max_samples},
        generation={**generation_kwargs(cfg), "prompt": cfg.model.lm.prompt, "batch_size": cfg.eval.batch_size},
        time={"generate_s": round(generate_s, 2), "score_s": round(score_s, 2),
              "captions_per_s": round(len(everything) / max(generate_s, 1e-9), 2),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        world_size=world_size,
        config=cfg.to_dict(),
    )
    write_jsonl(out / "predictions.jsonl", ({k: v for k, v in r.items() if k != "thumbnail"} for r in everything))
    if cfg.eval.gallery:
        o = scores["overall"]
        write_gallery(out / "gallery.html", everything, title=f"msmedcap {cfg.model.variant}: {out}",
                      summary=f"{len(everything)} samples · checkpoint {checkpoint} · CIDEr {o['CIDEr']:.4f} · "
                              f"BLEU-4 {o['Bleu_4']:.4f}", scores=scores)
    write_json(out / "scores.json", scores)  # last: its presence means the evaluation finished
    print_scores(scores, title=f"{cfg.model.variant} · {len(everything)} samples · {out}")
    return scores

