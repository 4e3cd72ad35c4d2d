"""Evaluation files: predictions.jsonl and scores.json written atomically, JSONL read with errors
that name the file, line and key."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from msmedcap.atomic_files import atomic_write_text


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class InputError(ValueError):
    """A predictions/references file that cannot be used: names the file, line and key."""


def read_jsonl(path, required: dict) -> list:
    """JSON objects, one per line (blank lines skipped). ``required``: field -> type(s); a line that
    is not a JSON object, lacks a field or has the wrong type is an error naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    out, seen = [], {}
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for field, types in required.items():
                if field not in rec:
                    raise InputError(f"{path}:{lineno}: missing field {field!r} (has: {', '.join(sorted(rec))})")
                if not isinstance(rec[field], types):
                    raise InputError(f"{path}:{lineno}: field {field!r} has type {type(rec[field]).__name__}")
            key = str(rec["key"]) if "key" in rec else None
            if key is not None:
                if key in seen:
                    raise InputError(f"{path}:{lineno}: key {key!r} repeats line {seen[key]}")
                seen[key] = lineno
            out.append(rec)
    if not out:
        raise InputError(f"{path}: no records")
    return out


def read_predictions(path) -> list:
    """``{"key", "prediction"}`` lines (extra fields such as references, domain, source are kept)."""
    return read_jsonl(path, {"key": (str, int), "prediction": str})


def read_references(path) -> list:
    """``{"key", "captions": [...]}`` lines (a single ``"caption"`` string is accepted too)."""
    recs = read_jsonl(path, {"key": (str, int)})
    for i, r in enumerate(recs):
        caps = r.get("captions", r.get("caption"))
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise InputError(f"{path}: key {r['key']!r}: 'captions' must be a non-empty list of strings")
        r["captions"] = caps
    return recs
