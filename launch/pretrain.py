#!/usr/bin/env python
"""Train MSMedCap with DeepSpeed: the shim of `msmedcap train` (msmedcap/train/cli.py) for the deepspeed
launcher, which needs a script path.

    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json                 # the demo
    deepspeed --num_gpus 8 launch/pretrain.py --deepspeed ds_configs/zero2.json \\
        --config paper train.stage=1 train.output_dir=runs/stage1                  # anything else
    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json --resume auto  # after a kill

Also runs without the launcher (``python launch/pretrain.py``) as a single process.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from msmedcap import cli  # noqa: E402

# The checkout's DeepSpeed config by default, as before (msmedcap train: the packaged copy, the same file).
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"


def parse_args(argv=None):
    from msmedcap.train.cli import parse_args

    return parse_args(argv, DEFAULT_DS_CONFIG)


def main(argv=None) -> int:
    return cli.main(["train", *(sys.argv[1:] if argv is None else argv)], prog="pretrain.py",
                    default_ds_config=DEFAULT_DS_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
