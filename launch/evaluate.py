#!/usr/bin/env python
"""Evaluate a trained captioner: the shim of `msmedcap evaluate` (msmedcap/eval/cli.py) for the deepspeed
launcher, which needs a script path.

    python launch/evaluate.py --checkpoint runs/demo                          # one process
    deepspeed --num_gpus 4 launch/evaluate.py --checkpoint runs/demo         # 4 ranks, one job
    python launch/evaluate.py --compare runs/blip2 runs/sam-blip2 runs/msmedcap [--markdown]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from msmedcap import cli  # noqa: E402


def main(argv=None) -> int:
    return cli.main(["evaluate", *(sys.argv[1:] if argv is None else argv)], prog="evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
