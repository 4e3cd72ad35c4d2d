#!/usr/bin/env python
"""Train MSMedCap with DeepSpeed: stage 1 (ITC/ITM/ITG), stage 2 (captioning), then evaluation.

    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json                 # the demo
    deepspeed --num_gpus 8 launch/pretrain.py --deepspeed ds_configs/zero2.json \\
        --config paper train.stage=1 train.output_dir=runs/stage1                  # anything else
    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json --resume auto  # after a kill

Also runs without the launcher (``python launch/pretrain.py``) as a single process.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: spinning worker threads collapse when cores are shared (other ranks,
# data workers, other jobs): a 64x64 matmul measured 3.9 ms spinning vs 36 us passive, 2 threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "zero2.json"


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler="resolve")
    parser.add_argument("--config", default="demo", metavar="PRESET_OR_YAML",
                        help="a packaged preset (demo, paper) or a YAML file (default: demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.stage=1 train.stage1.steps=100")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="auto: continue from the newest complete checkpoint under train.output_dir; "
                             "or a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if train.output_dir holds checkpoints of an earlier run")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(parser)
    # transformers' spelling `--deepspeed PATH`, and DeepSpeed's `--deepspeed --deepspeed_config PATH`.
    parser.add_argument("--deepspeed", nargs="?", const=True, default=False, metavar="JSON",
                        help=f"DeepSpeed JSON config (default: {DEFAULT_DS_CONFIG.relative_to(REPO)})")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before, between or after options
    if isinstance(args.deepspeed, str) and "=" in args.deepspeed and not args.deepspeed.endswith(".json"):
        args.overrides.insert(0, args.deepspeed)  # `--deepspeed a.b=c`: an override, not a path
        args.deepspeed = True
    path = args.deepspeed if isinstance(args.deepspeed, str) else args.deepspeed_config
    args.ds_config = Path(path) if path else DEFAULT_DS_CONFIG
    return args


def main(argv=None) -> int:
    from msmedcap.config import ConfigError, load_config

    args = parse_args(argv)
    try:
        from msmedcap.train.ds_config import read_ds_json

        ds_json = read_ds_json(args.ds_config)
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"pretrain: config error: {e}", file=sys.stderr)
        return 2
    from msmedcap.train.world import single_process_env

    single_process_env()
    from msmedcap.train.trainer import train

    return train(cfg, ds_json, ds_source=str(args.ds_config), resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
