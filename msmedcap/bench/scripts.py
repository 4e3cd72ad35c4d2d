"""Parts 1 and 4 reuse the data and evaluation benchmarks (launch/bench_loader.py: the shard loader vs a
plain tar-read + decode loop with the same workers; launch/bench_generate.py: captions/s batched vs
batch 1, and whether both give the same captions), each run as its own process and read back from
the JSON it prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from msmedcap.bench.common import REPO


def last_json(text: str) -> dict:
    """The last JSON object printed (one line, or indented over several)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object in the output")


def run_script(name: str, args: list, threads: int, timeout: int = 900) -> dict:
    script = REPO / "launch" / name
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found (run from a source checkout)")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{name} exited {proc.returncode}:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    result = last_json(proc.stdout)
    if proc.stderr and "first difference" in proc.stderr:
        result["stderr"] = proc.stderr.strip().splitlines()[-1]
    return result


def bench_loader(preset: str, overrides: list, batches: int, workers: int, threads: int,
                 paper_sizes: bool = False) -> dict:
    extra = ["--paper-sizes"] if paper_sizes else []
    return run_script("bench_loader.py", ["--preset", preset, "--workers", str(workers), "--batches", str(batches),
                                          *extra, *overrides], threads)


def bench_generate(preset: str, overrides: list, samples: int, batch_size: int, threads: int) -> dict:
    return run_script("bench_generate.py", ["--config", preset, "--samples", str(samples), "--batch-size",
                                            str(batch_size), "--threads", str(threads), *overrides], threads)
