"""Evaluation outputs as `msmedcap evaluate` writes them, made without a model: demo-grammar captions
scored by msmedcap.eval.scoring.score_records (pycocoevalcap, findings) into predictions.jsonl records
and a scores.json, in a run directory."""
from __future__ import annotations

import json
import random
from pathlib import Path

from msmedcap.eval.scoring import score_records


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def scored_records(refs, preds, source: str = "demo-general") -> tuple:
    """(records with per-sample "scores" and "findings", the scores without the per-sample parts)."""
    recs = [{"key": f"k{i:03d}", "source": source, "domain": "general", "references": [r], "prediction": p}
            for i, (r, p) in enumerate(zip(refs, preds))]
    scores = score_records(recs, spice="off")
    for r in recs:
        r["scores"], r["findings"] = scores["per_sample"][r["key"]], scores["per_sample_findings"][r["key"]]
    del scores["per_sample"], scores["per_sample_findings"]
    return recs, scores


def demo_records(seed: int, copy_ref_every: int = 0, n: int = 24) -> tuple:
    """The same n demo-grammar references for every seed; predictions drawn with ``seed``, or (with
    ``copy_ref_every`` = k) the reference itself except on every k-th sample."""
    words = "one two three red blue yellow circle square triangle".split()

    def cap(r):
        return f"{r.choice(words[:3])} {r.choice(words[3:6])} {r.choice(words[6:])} on a white background."

    ref_rng, rng = random.Random(0), random.Random(seed)
    refs = [cap(ref_rng) for _ in range(n)]
    preds = [r if copy_ref_every and i % copy_ref_every else cap(rng) for i, r in enumerate(refs)]
    return scored_records(refs, preds)


def write_run(run: Path, variant: str, recs, scores) -> None:
    """RUN/eval/predictions.jsonl and RUN/eval/scores.json (naming the variant, as evaluate's config does)."""
    (run / "eval").mkdir(parents=True)
    write_jsonl(run / "eval" / "predictions.jsonl", recs)
    (run / "eval" / "scores.json").write_text(json.dumps({**scores, "config": {"model": {"variant": variant}}}))
