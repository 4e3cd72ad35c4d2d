"""Train MSMedCap with DeepSpeed: stage 1 (ITC/ITM/ITG), stage 2 (captioning), then evaluation.

`msmedcap train`; launch/pretrain.py is its shim for the deepspeed launcher (which needs a script path):

    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json                 # the demo
    deepspeed --num_gpus 8 launch/pretrain.py --deepspeed ds_configs/zero2.json \\
        --config paper train.stage=1 train.output_dir=runs/stage1                  # anything else
    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json --resume auto  # after a kill
    msmedcap train train.stage1.steps=100                                          # one process, installed

Without a launcher it runs as a single process. Options and overrides come in any order.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

# The packaged DeepSpeed configs (msmedcap/ds_configs/, copies of the checkout's ds_configs/); --deepspeed
# also takes pkg://ds_configs/NAME.json.
DEFAULT_DS_CONFIG = "pkg://ds_configs/zero2.json"


def add_arguments(parser: argparse.ArgumentParser, default_ds_config=DEFAULT_DS_CONFIG) -> None:
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
    # deepspeed.add_config_arguments' options, spelled here so that `msmedcap --help` does not import
    # deepspeed (2 s); `--deepspeed` takes transformers' spelling `--deepspeed PATH` as well as DeepSpeed's
    # `--deepspeed --deepspeed_config PATH`.
    ds = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    ds.add_argument("--deepspeed", nargs="?", const=True, default=False, metavar="JSON",
                    help="DeepSpeed JSON config (default: ds_configs/zero2.json: the checkout's under "
                         "launch/pretrain.py, the packaged copy under msmedcap train)")
    ds.add_argument("--deepspeed_config", default=None, metavar="JSON", help="DeepSpeed JSON config")
    ds.add_argument("--deepscale", action="store_true", help=argparse.SUPPRESS)
    ds.add_argument("--deepscale_config", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run, intermixed=True, default_ds_config=default_ds_config)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train with DeepSpeed (stage 1, stage 2, evaluation)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)


def build_parser(prog=None, default_ds_config=DEFAULT_DS_CONFIG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_ds_config)
    return parser


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args.ds_config``: the DeepSpeed JSON path from ``--deepspeed PATH``, ``--deepspeed_config PATH``
    or the default; `--deepspeed a.b=c` is an override, not a path."""
    if isinstance(args.deepspeed, str) and "=" in args.deepspeed and not args.deepspeed.endswith(".json"):
        args.overrides.insert(0, args.deepspeed)
        args.deepspeed = True
    from msmedcap.config import resolve_asset

    path = args.deepspeed if isinstance(args.deepspeed, str) else args.deepspeed_config
    args.ds_config = Path(resolve_asset(str(path or args.default_ds_config)))
    return args


def parse_args(argv=None, default_ds_config=DEFAULT_DS_CONFIG) -> argparse.Namespace:
    # overrides may come before, between or after options
    return finish_args(build_parser(default_ds_config=default_ds_config).parse_intermixed_args(argv))


def run(args: argparse.Namespace) -> int:
    """Read the DeepSpeed JSON and the config (a ConfigError goes to the caller: the msmedcap CLI's
    handler), then train."""
    # Before torch loads OpenMP: spinning worker threads collapse when cores are shared (other ranks,
    # data workers, other jobs): a 64x64 matmul measured 3.9 ms spinning vs 36 us passive, 2 threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from msmedcap.config import load_config
    from msmedcap.train.ds_config import read_ds_json

    if not hasattr(args, "ds_config"):
        finish_args(args)
    ds_json = read_ds_json(args.ds_config)
    cfg = load_config(args.config, args.overrides)
    from msmedcap.train.world import single_process_env

    single_process_env()
    from msmedcap.train.trainer import train

    return train(cfg, ds_json, ds_source=str(args.ds_config), resume=args.resume, overwrite=args.overwrite)
