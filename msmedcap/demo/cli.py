"""`msmedcap demo shards | encoders | lm`: rebuild what the demo ships (its shards and tokenizers, its
frozen encoders' and LM's weights) and probe its encoders. Registered through the ``msmedcap.commands``
entry point, so the core's command line knows nothing of the demo."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="rebuild the demo's shards, tokenizers, encoders and LM; probe its encoders")
    sub = p.add_subparsers(dest="demo_command", required=True)

    d = sub.add_parser("shards", help="generate the seeded demo set (what shards/demo holds)")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--train", type=int, default=None, help="train samples per domain (default: the embedded set's)")
    d.add_argument("--eval", type=int, default=None, help="eval samples per domain")
    d.add_argument("--tokenizers", help="also train the demo tokenizers on the train captions into this directory")
    d.set_defaults(func=cmd_shards)

    e = sub.add_parser("encoders", help="pre-train the demo's CLIP or SAM, or probe the frozen encoders "
                                        "(docs/demo_encoders.md)")
    e.add_argument("what", choices=("clip", "sam", "probe", "margin-probe"))
    e.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo preset")
    e.add_argument("--out", help="weights file (default: the shipped asset); probe: a JSON of the results")
    e.add_argument("--steps", type=int, help="optimizer steps (default: clip 1000, sam 2400)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=1, help="torch threads (the same count: the same weights)")
    e.set_defaults(func=cmd_encoders)

    m = sub.add_parser("lm", help="pre-train the demo's tiny OPT to read its prefix (msmedcap/assets/opt-demo)")
    m.add_argument("--out", default=None, help="output directory (default: the shipped asset)")
    m.add_argument("--steps", type=int, default=2000)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_lm)


def cmd_shards(args: argparse.Namespace) -> int:
    from msmedcap.demo import world

    n_train = world.TRAIN_PER_DOMAIN if args.train is None else args.train
    n_eval = world.EVAL_PER_DOMAIN if args.eval is None else args.eval
    manifest = world.write_demo(args.out, seed=args.seed, n_train=n_train, n_eval=n_eval)
    total = sum(s["samples"] for s in manifest["shards"].values())
    print(f"wrote {total} demo samples to {len(manifest['shards'])} shards in {args.out}")
    if args.tokenizers:
        from msmedcap.demo.tokenizers import train_demo_tokenizers

        train_demo_tokenizers(world.demo_captions(args.seed, n_train), args.tokenizers)
        print(f"trained demo tokenizers into {args.tokenizers}/qformer and {args.tokenizers}/lm")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    import torch

    from msmedcap.demo import encoder_probes as P
    from msmedcap.demo import encoders as E

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = E.demo_model_config(*E.SHIPPED_ENCODERS, *args.overrides)
    steps = {"steps": args.steps} if args.steps else {}
    if args.what == "clip":
        path = E.save_clip(E.train_clip(seed=args.seed, model_cfg=cfg, **steps), args.out or E.CLIP_OUT)
    elif args.what == "sam":
        path = E.save_sam(E.train_sam(seed=args.seed, model_cfg=cfg, **steps), args.out or E.SAM_OUT)
    elif args.what == "margin-probe":
        result = P.margin_probes(seed=args.seed, model_cfg=cfg)
        print("| margin read from the SAM embedding by | SAM | fit | test | small lesions | large lesions |\n"
              "|---|---|---|---|---|---|")
        for row, weights, *_ in P.MARGIN_READERS:
            r = result[row, weights]
            print(f"| {row} | {weights} | {r['fit']:.2f} | {r['all']:.2f} | {r['small']:.2f} | {r['large']:.2f} |")
        print(f"\n{time.perf_counter() - start:.0f} s")
        return 0
    else:
        result = P.run_probes(seed=args.seed, model_cfg=cfg)
        for pooling, what in (("flat", "flattened tokens"), ("mean", "mean-pooled tokens")):
            print(f"\nLogistic-regression probes on {what} (test accuracy):\n\n{P.probe_table(result, pooling)}")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\n{time.perf_counter() - start:.0f} s")
        return 0
    print(f"{path} ({path.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s")
    return 0


def cmd_lm(args: argparse.Namespace) -> int:
    import torch

    from msmedcap.demo import lm

    torch.set_num_threads(1)
    out = lm.pretrain_demo_lm(args.out or lm.OUT, steps=args.steps, seed=args.seed)
    print(out)
    for k in lm.prefix_lengths(lm.demo_lm_config()):
        acc, misses = lm.shipped_steer_accuracy(k, path=out)
        print(f"prefix of {k}: {acc:.1%} of the 300 eval captions reproduced exactly; misses: {misses[:5]}")
    return 0
