#!/usr/bin/env python
"""Loader benchmark: samples/s of msmedcap's train loader vs a plain loop over the same tars
(also ``msmedcap bench --parts loader``).

    python launch/bench_loader.py [--preset demo] [--workers 2] [--batches 100] [key=value ...]
    python launch/bench_loader.py --paper-sizes [--samples 240] [--data-dir DIR] [--repeats 3]

The code is msmedcap/bench/loader.py; this script runs its ``main``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from msmedcap.bench.loader import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
