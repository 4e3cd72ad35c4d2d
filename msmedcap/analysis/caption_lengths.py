"""Caption sets built from published length distributions, and the share of them each text length cuts
(issue 13, item 4; the README's "Long captions" table).

``python -m msmedcap.analysis.caption_lengths --pool roco/data/test/radiology/captions.txt \\
    --qformer-tokenizer DIR --lm-tokenizer DIR`` builds ``--n`` captions whose word counts follow
``--quantiles`` (default: ROCO's published p50 16, p90 37, p99 81, max 187 words; log-linear between
them) from words drawn from the pool's captions, and prints word and token quantiles and the share of
captions longer than each length, per tokenizer (with its special tokens / end token), as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from typing import Sequence

# (cumulative share, words) of ROCO captions as published (600 test captions: median 16, p90 37, p99 81,
# max 187); 1 word at p0.
ROCO_WORD_QUANTILES = ((0.0, 1), (0.5, 16), (0.9, 37), (0.99, 81), (1.0, 187))


def synthetic_lengths(n: int, quantiles: Sequence = ROCO_WORD_QUANTILES, seed: int = 0) -> list:
    """``n`` word counts whose quantile function is log-linear between the given (share, words) knots."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        for (p0, w0), (p1, w1) in zip(quantiles, quantiles[1:]):
            if u <= p1:
                t = (u - p0) / (p1 - p0) if p1 > p0 else 1.0
                out.append(max(1, round(math.exp(math.log(w0) + t * (math.log(w1) - math.log(w0))))))
                break
    return out


def synthetic_captions(pool: Sequence[str], n: int, quantiles: Sequence = ROCO_WORD_QUANTILES, seed: int = 0) -> list:
    """Captions of :func:`synthetic_lengths` words, each word drawn from the words of ``pool``."""
    words = [w for caption in pool for w in caption.split()]
    if not words:
        raise ValueError("the caption pool has no words")
    rng = random.Random(seed + 1)
    return [" ".join(rng.choice(words) for _ in range(k)) for k in synthetic_lengths(n, quantiles, seed)]


def quantile(values: Sequence, q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def truncation_shares(lengths: Sequence, limits: Sequence) -> dict:
    """{limit: share of ``lengths`` over it}."""
    return {int(limit): sum(n > limit for n in lengths) / len(lengths) for limit in limits}


def report(captions: Sequence[str], qformer_tok=None, lm_tok=None, qformer_limits=(32, 128, 256, 320),
           lm_limits=(32, 64, 128, 160)) -> dict:
    """Word/token quantiles and truncation shares: the Q-Former side with [CLS]/[SEP], the LM side with
    its end token (as the loader counts them)."""
    from msmedcap.batch import CAPTION_EOS

    qs = (0.5, 0.9, 0.99, 1.0)
    words = [len(c.split()) for c in captions]
    out = {"n": len(captions), "words": {q: quantile(words, q) for q in qs}}
    sides = []
    if qformer_tok is not None:
        sides.append(("qformer", [len(i) for i in qformer_tok(list(captions), truncation=False, verbose=False)["input_ids"]],
                      qformer_limits))
    if lm_tok is not None:
        sides.append(("lm", [len(i) for i in lm_tok([c + CAPTION_EOS for c in captions], add_special_tokens=False,
                                                     verbose=False)["input_ids"]], lm_limits))
    for name, lengths, limits in sides:
        out[f"{name}_tokens"] = {q: quantile(lengths, q) for q in qs}
        out[f"{name}_truncated"] = truncation_shares(lengths, limits)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", required=True, help="captions to draw words from: ROCO captions.txt or one caption a line")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantiles", default=json.dumps(ROCO_WORD_QUANTILES), help="JSON [[share, words], ...]")
    ap.add_argument("--qformer-tokenizer", help="e.g. a bert-base-uncased directory")
    ap.add_argument("--lm-tokenizer", help="e.g. an OPT tokenizer directory")
    args = ap.parse_args(argv)
    from msmedcap.tokenization import load_lm_tokenizer, load_qformer_tokenizer

    with open(args.pool, encoding="utf-8") as f:
        pool = [line.split("\t", 1)[-1].strip() for line in f if line.strip()]
    captions = synthetic_captions(pool, args.n, [tuple(k) for k in json.loads(args.quantiles)], args.seed)
    q = load_qformer_tokenizer(args.qformer_tokenizer) if args.qformer_tokenizer else None
    lm = load_lm_tokenizer(args.lm_tokenizer) if args.lm_tokenizer else None
    print(json.dumps({"synthetic": report(captions, q, lm), "pool": report(pool, q, lm)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
