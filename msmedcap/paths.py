"""Paths into the installed package: ``pkg://`` names (tiny tokenizers, configs, weights shipped with
msmedcap). A leaf module."""
from __future__ import annotations

from pathlib import Path


def resolve_asset(path: str) -> str:
    """Paths starting with ``pkg://`` point inside the installed package (tiny tokenizers, configs)."""
    if path.startswith("pkg://"):
        return str(Path(__file__).parent / path[len("pkg://"):])
    return path
