"""The floor a captioner's scores are read against: the most frequent training caption given as
every prediction, scored on the evaluation's own references."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from msmedcap.config import Config


def shard_captions(specs: Sequence[str], limit: int, missing_ok: bool = False) -> list:
    """Captions (``.txt`` members) of the shards of ``specs`` (weighted brace patterns), up to ``limit``;
    ``missing_ok``: shard files that are not there are passed over."""
    import tarfile

    from msmedcap.data.shard_spec import expand_braces, split_weighted_spec

    captions = []
    for spec in specs:
        for path in expand_braces(split_weighted_spec(spec)[0]):
            if missing_ok and not os.path.isfile(path):
                continue
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.name.endswith(".txt"):
                        captions.append(tar.extractfile(member).read().decode("utf-8").strip())
                        if len(captions) >= limit:
                            return captions
    return captions


def training_captions(cfg: Config, limit: int = 20000) -> list:
    """Captions of the training shards, up to ``limit``."""
    return shard_captions(cfg.data.train, limit)


def most_frequent_caption_baseline(cfg: Config, predictions_path: Path) -> dict:
    """The most frequent training caption as every prediction, on the evaluation's references:
    PTB tokenization, BLEU and CIDEr exactly as the evaluation computes them (overall and per domain;
    METEOR's Java run is skipped: a floor needs no more)."""
    from collections import Counter

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from msmedcap.eval.findings import score_findings
    from msmedcap.eval.io import read_predictions
    from msmedcap.eval.scoring import group_keys, tokenize

    caption = Counter(training_captions(cfg)).most_common(1)[0][0]
    records = read_predictions(predictions_path)
    gts, res = tokenize({r["key"]: r["references"] for r in records}, {r["key"]: caption for r in records})

    def score(keys) -> dict:
        g, r = {k: gts[k] for k in keys}, {k: res[k] for k in keys}
        return {"Bleu_4": float(Bleu(4).compute_score(g, r, verbose=0)[0][3]),
                "CIDEr": float(Cider().compute_score(g, r)[0]), "n": len(keys)}

    by_domain = group_keys(records, ("domain",)).get("domain", {})
    out = {"caption": caption, "overall": score(list(gts)),
           "domain": {d: score(keys) for d, keys in sorted(by_domain.items())}}
    # the same floor for findings accuracy: what a captioner that ignores the image gets per field
    findings = score_findings([{**r, "prediction": caption} for r in records], {"domain": by_domain})
    out["overall"]["findings"] = findings["overall"]
    for d, block in findings.get("domain", {}).items():
        out["domain"][d]["findings"] = block
    return out


def evaluate_with_baseline(model, cfg: Config, out: Path, rank: int, world_size: int, checkpoint: str) -> Optional[dict]:
    """The fused evaluation (msmedcap.eval.evaluate) of ``model`` into ``out``, then on rank 0 the
    baseline on the same references (``out/baseline_scores.json``); rank 0 returns both headline
    numbers (what training's summary.json holds), the other ranks None."""
    import json

    from msmedcap.eval.evaluate import evaluate

    scores = evaluate(model, cfg, out, rank, world_size, checkpoint=checkpoint)
    if rank != 0:
        return None
    baseline = most_frequent_caption_baseline(cfg, out / "predictions.jsonl")
    (out / "baseline_scores.json").write_text(json.dumps(baseline, indent=2))
    return {"scores": str(out / "scores.json"), "CIDEr": scores["overall"]["CIDEr"],
            "Bleu_4": scores["overall"]["Bleu_4"], "baseline_caption": baseline["caption"],
            "baseline_CIDEr": baseline["overall"]["CIDEr"], "baseline_Bleu_4": baseline["overall"]["Bleu_4"]}
