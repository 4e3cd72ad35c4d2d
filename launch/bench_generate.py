#!/usr/bin/env python
"""Benchmark: captions/s of batched beam search vs a batch-1 loop over the same samples, and
whether both give the same captions (also ``msmedcap bench --parts generate``).

    python launch/bench_generate.py                                  # random-init demo model
    python launch/bench_generate.py --checkpoint runs/demo --samples 128 --batch-size 16

The code is msmedcap/bench/generate.py; this script runs its ``main``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from msmedcap.bench.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
