"""Gather each rank's evaluation records on rank 0, through torch.distributed (no shared files).

Exact-once is checked on rank 0: a key that two ranks (or one rank twice) produced is an error, and
so is a total that differs from the expected sample count when the caller knows it (shard manifests).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch.distributed as dist


class CoverageError(RuntimeError):
    """Some sample was evaluated twice, or records went missing between the ranks and rank 0."""


class RankLost(RuntimeError):
    """A rank died or went silent before its records reached rank 0: nothing is scored or written."""


def gather_to_rank0(obj: Any, rank: int = 0, world_size: int = 1, group=None) -> Optional[list]:
    """Every rank's ``obj`` (picklable), index = rank, on rank 0; None on the other ranks.

    Works with any backend whose ``gather`` exists (gloo; nccl with the current CUDA device set).
    With one process no process group is needed. ``group``: a torch.distributed group (default: the
    whole world); rank and world_size are then this process's rank in it and its size, and the
    group's first rank receives."""
    if world_size == 1:
        return [obj]
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    parts = [None] * world_size if rank == 0 else None
    try:
        dist.gather_object(obj, parts, group=group, group_dst=0)
    except (RuntimeError, ConnectionError) as e:  # gloo: a peer's connection closed; NCCL/gloo: timeout
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise RankLost(f"rank {rank}: another rank died or went silent before the evaluation's records were "
                       f"gathered ({detail}); no scores or predictions were written. Run the evaluation again") from e
    return parts


def gather_records(records: list, rank: int = 0, world_size: int = 1,
                   expected: Optional[int] = None, group=None) -> Optional[list]:
    """Every rank's list of records (dicts with ``key``) on rank 0, checked exact-once; None elsewhere."""
    parts = gather_to_rank0(records, rank, world_size, group)
    if parts is not None:
        check_exact_once([r for part in parts for r in part], per_rank=[len(p) for p in parts], expected=expected)
    return parts


def check_exact_once(records: list, per_rank: Optional[list] = None, expected: Optional[int] = None) -> None:
    counts = Counter(r["key"] for r in records)
    dup = [k for k, c in counts.items() if c > 1]
    if dup:
        shown = ", ".join(repr(k) for k in sorted(dup)[:5])
        raise CoverageError(f"{len(dup)} sample key(s) were evaluated more than once (e.g. {shown}); "
                            f"records per rank: {per_rank}. Duplicate __key__ values in the shards, or "
                            "shards read by two ranks")
    if expected is not None and len(records) != expected:
        raise CoverageError(f"{len(records)} samples evaluated but {expected} expected; records per rank: "
                            f"{per_rank}")
