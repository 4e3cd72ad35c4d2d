#!/usr/bin/env python
"""Evaluate a trained captioner: distributed generation, gather on rank 0, pycocoevalcap scores.

    python launch/evaluate.py --checkpoint runs/demo                          # one process
    deepspeed --num_gpus 4 launch/evaluate.py --checkpoint runs/demo         # 4 ranks, one job
    python launch/evaluate.py --checkpoint runs/demo/.../export --data 'shards/roco-test-{000..009}.tar' \\
        eval.num_beams=5 eval.max_len=40
    python launch/evaluate.py --compare runs/blip2 runs/sam-blip2 runs/msmedcap [--markdown]

--checkpoint takes an export directory (trainable.safetensors + config.yaml) or a run directory,
where the newest export is used. Writes predictions.jsonl, scores.json and gallery.html to --out
(default: <run dir>/eval, or <export>/eval).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", metavar="RUN_DIR_OR_EXPORT")
    mode.add_argument("--compare", nargs="+", metavar="RUN", help="print the paper-style table of these runs")
    p.add_argument("--data", action="append", metavar="SPEC",
                   help="eval shard spec (brace patterns; repeatable); default: the config's data.eval")
    p.add_argument("--out", help="output directory (default: <run dir>/eval or <export>/eval)")
    p.add_argument("--markdown", action="store_true", help="--compare: print Markdown instead of tables")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides of the checkpoint's config, e.g. eval.num_beams=1 eval.max_samples=100")
    return p


def init_distributed() -> tuple:
    """(rank, world_size, device) from the launcher's environment (deepspeed, torchrun, srun)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before, between or after options
    if args.compare:
        from msmedcap.eval.report import print_compare

        try:
            print_compare(args.compare, markdown=args.markdown)
        except (FileNotFoundError, ValueError) as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            return 2
        return 0

    from msmedcap.config import ConfigError
    from msmedcap.eval.checkpoints import CheckpointError, default_out_dir, find_export, load_for_eval
    from msmedcap.eval.scoring import JavaMissing, require_java

    try:
        require_java()  # before minutes of generation
        export = find_export(args.checkpoint)
        rank, world_size, device = init_distributed()
        model, cfg = load_for_eval(export, args.overrides, device, data=args.data)
    except (CheckpointError, ConfigError, JavaMissing) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    from msmedcap.eval.evaluate import evaluate

    out = Path(args.out) if args.out else default_out_dir(args.checkpoint, export)
    evaluate(model, cfg, out, rank=rank, world_size=world_size, checkpoint=str(export))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
