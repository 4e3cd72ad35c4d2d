"""Starting a training run and reading its output: the environment of a run started as a subprocess, a
free port for a launcher's rendezvous, metrics.jsonl's records, the losses per stage and step."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

# A few steps of the demo preset: a run that trains, checkpoints, resumes and exports in seconds.
TINY_RUN = ["train.stage1.steps=4", "train.stage2.steps=8", "train.stage1.micro_batch_size=4",
            "train.stage2.micro_batch_size=4", "train.stage1.warmup_steps=0", "train.stage2.warmup_steps=0",
            "train.stage2.lr=3e-3", "train.log_every=1", "train.ckpt_every=3", "train.keep_last=2",
            "data.shuffle_buffer=16", "data.num_workers=1", "eval.max_samples=8", "eval.num_beams=1",
            "eval.gallery=false"]


def with_overrides(base: list, *changes: str) -> list:
    """``base`` with each key of ``changes`` replaced (or added)."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(changes)


def run_env(fault: str | None = None, **extra) -> dict:
    """This process's environment for a training subprocess: one thread, no inherited rank or fault;
    ``fault``: its ``MSMEDCAP_FAULT`` (msmedcap.train.signals.fault_point); ``extra``: more variables."""
    e = {k: v for k, v in os.environ.items() if k not in ("MSMEDCAP_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    if fault:
        e["MSMEDCAP_FAULT"] = fault
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict:
    return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k.startswith("loss")} for r in records(out)}
