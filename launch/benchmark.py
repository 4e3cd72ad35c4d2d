#!/usr/bin/env python
"""Benchmark throughput, FLOPs utilisation and memory (same as ``msmedcap bench``).

    python launch/benchmark.py --preset demo                                    # CPU, a few minutes
    python launch/benchmark.py --preset paper --batch 8 --parts step,cache,hf,memory   # one GPU
    python launch/benchmark.py --help

See msmedcap/bench/__init__.py for the parts and docs/benchmarks.md for results.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msmedcap.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
