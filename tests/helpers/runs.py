"""Starting a training run and reading its output: the environment of a run started as a subprocess, a
free port for a launcher's rendezvous, metrics.jsonl's records, the losses per stage and step."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path


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
