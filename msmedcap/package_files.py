"""``pkg://`` paths: files inside the installed package (tiny tokenizers, model configs, demo weights).
A leaf module, so that anything may resolve such a path without importing the config."""
from __future__ import annotations

from pathlib import Path


def resolve_asset(path: str) -> str:
    """Paths starting with ``pkg://`` point inside the installed package (tiny tokenizers, configs)."""
    if path.startswith("pkg://"):
        return str(Path(__file__).parent / path[len("pkg://"):])
    return path
