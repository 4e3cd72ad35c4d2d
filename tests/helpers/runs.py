"""Reading a training run's output: a free port for a launcher's rendezvous, metrics.jsonl's records,
the losses per stage and step."""
from __future__ import annotations

import json
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict:
    return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k.startswith("loss")} for r in records(out)}
