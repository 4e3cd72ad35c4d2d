"""Stage-1 FLOPs per sample of the two Q-Formers at the paper preset's shapes (issue 20).

The Q-Former side only, at paper width (BERT-base, 12 layers, 768, cross-attention every 2nd layer, 32
queries, a BERT-sized vocabulary) with random weights, on synthetic frozen-encoder tokens of the paper's
shapes (EVA CLIP 257 x 1408 with ln_vision; SAM vit_b "channels" layout 256 x 4096 without), forward +
backward of ITC + ITM + ITG counted by ``torch.utils.flop_counter`` (``count_flops``). The micro batch
mixes general and medical samples as stage 1's default routing does: SAM's Q-Former trains on every
sample, CLIP's on the general ones. The text is what the loader yields (``--text``): ``longest`` (padded
to the batch's longest, as now) or ``max_length`` (to ``max_text_len`` = 320, as before issue 20); the
model then pads as it does. The frozen encoders' FLOPs do not depend on the text and are not counted.

    PYTHONPATH=. python -m msmedcap.bench.stage1_flops --lengths 22,29,41,118

It also runs as a file against an older checkout (``PYTHONPATH=OLD python msmedcap/bench/stage1_flops.py
--text max_length``): it uses only ``QFormer`` and ``stage1_branch_loss``.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json

import torch

BERT_VOCAB = 30523  # bert-base-uncased's 30522 + [DEC]
ENCODERS = {"clip": (257, 1408, True), "sam": (256, 4096, False)}  # tokens, width, ln_vision (paper.yaml)


def text_batch(lengths: list, width: int, generator: torch.Generator) -> tuple:
    """[CLS] random word pieces [SEP] of the given lengths, right-padded (id 0) to ``width``."""
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1000, 30000, (n,), generator=generator)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    return ids, mask


def branch_flops(branch: str, qcfg, lengths: list, text: str, rows: int, seed: int = 0) -> dict:
    from msmedcap.models.qformer import QFormer
    from msmedcap.models.stage1 import stage1_branch_loss
    from msmedcap.train.metrics import count_flops

    tokens, width, ln_vision = ENCODERS[branch]
    torch.manual_seed(seed)
    qformer = QFormer(qcfg, width, BERT_VOCAB, 0, ln_vision=ln_vision).eval()
    g = torch.Generator().manual_seed(seed)
    ids, mask = text_batch(lengths, max(lengths) if text == "longest" else qcfg.max_text_len, g)
    enc = torch.randn(len(lengths), tokens, width, generator=g)
    kwargs = {"generator": torch.Generator().manual_seed(seed)}
    if "max_text_len" in inspect.signature(stage1_branch_loss).parameters:
        kwargs["max_text_len"] = qcfg.max_text_len
    widths = []
    hook = qformer.embeddings.register_forward_hook(
        lambda m, a, kw, out: widths.append(kw["input_ids"].shape[1]) if kw.get("input_ids") is not None else None,
        with_kwargs=True)

    def step():
        out = stage1_branch_loss(qformer, enc, ids, mask, rows, 30522, **kwargs)
        sum(out.values()).backward()
        return {k: float(v.detach()) for k, v in out.items()}

    losses, flops = count_flops(step)
    hook.remove()
    del qformer
    gc.collect()
    return {"samples": len(lengths), "text_width": sorted(set(widths)), "tflop": flops / 1e12, "losses": losses}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="22,29,41,118",
                   help="Q-Former token lengths ([CLS] .. [SEP]) of the micro batch's captions (ROCO: p50 29, p99 123)")
    p.add_argument("--text", choices=("longest", "max_length"), default="longest", help="how the loader pads the text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from msmedcap.config import load_config

    qcfg = load_config("paper", check_files=False).model.qformer
    lengths = [int(x) for x in args.lengths.split(",")]
    general = lengths[::2]  # alternate domains: general, medical, ...; CLIP trains on the general half
    result = {"lengths": lengths, "text": args.text, "max_text_len": qcfg.max_text_len,
              "sam": branch_flops("sam", qcfg, lengths, args.text, len(lengths)),
              "clip": branch_flops("clip", qcfg, general, args.text, len(lengths))}
    result["tflop_per_sample"] = (result["sam"]["tflop"] + result["clip"]["tflop"]) / len(lengths)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
