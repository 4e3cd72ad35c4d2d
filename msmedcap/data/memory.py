"""Host memory of the train loader, before it starts: one worker's buffered samples and batches
(:func:`worker_memory`, for the planner's table) and the node's ``/dev/shm`` need (:func:`shm_need_bytes`,
checked by :func:`check_shm` where the train loader is made).

A worker holds at most ``data.shuffle_buffer`` raw (still encoded) samples in its shuffle buffer, the
batch it is assembling (decoded, resized uint8 pixels) and up to the DataLoader's ``prefetch_factor``
finished batches in shared memory until its rank takes them. Batch bytes are an upper bound: each
encoder's uint8 pixels at its full input size (SAM's rows are padded only to the batch's largest image,
which for a mix of portrait and landscape figures is the full square), plus the text tensors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# An encoded figure (JPEG/PNG around 700 x 500, as in MedICaT/ROCO) when no manifest tells.
DEFAULT_SAMPLE_BYTES = 200_000
PREFETCH_FACTOR = 2  # the DataLoader's, per worker (msmedcap.data.loader._loader)
SHM = "/dev/shm"


def batch_bytes(cfg, stage: int) -> int:
    """Upper bound of one train micro-batch's tensors (what crosses the worker boundary)."""
    from msmedcap.registry import encoder_specs

    b = getattr(cfg.train, f"stage{stage}").micro_batch_size
    pixels = sum(3 * spec.section(cfg.model).image_size ** 2 for spec in encoder_specs(cfg.model.branches))
    # ids + masks (int64) of both texts, domain, each image's (h, w)
    text = 8 * 2 * (cfg.model.qformer.max_text_len + cfg.model.lm.max_caption_len) + 8 + 16 * len(cfg.model.branches)
    return b * (pixels + text)


def mean_sample_bytes(specs: list) -> Optional[float]:
    """Mean encoded sample size of ``specs``' local shards from their manifest.json (bytes / samples,
    shards without an entry left out); None when no shard has one."""
    from msmedcap.data.shard_spec import expand_braces, is_local_shard, parse_shard_spec
    from msmedcap.data.shards import read_manifest

    total_bytes = total_samples = 0
    manifests: dict = {}
    for spec in specs:
        for url in expand_braces(parse_shard_spec(spec).pattern):
            if not is_local_shard(url):
                continue
            path = Path(url)
            entry = manifests.setdefault(path.parent, read_manifest(path.parent))["shards"].get(path.name)
            if entry and entry.get("samples"):
                total_bytes += entry["bytes"]
                total_samples += entry["samples"]
    return total_bytes / total_samples if total_samples else None


def worker_memory(cfg, stage: int = 1, sample_bytes: Optional[float] = None) -> dict:
    """One train worker's buffered memory: the shuffle buffer (raw samples x their mean size: given, from
    the train shards' manifests, or :data:`DEFAULT_SAMPLE_BYTES`) and the batches in flight (the one
    being assembled and ``PREFETCH_FACTOR`` finished ones)."""
    d = cfg.data
    source = "given"
    if sample_bytes is None:
        sample_bytes, source = mean_sample_bytes(list(d.train)), "manifest"
    if sample_bytes is None:
        sample_bytes, source = DEFAULT_SAMPLE_BYTES, "default"
    b = getattr(cfg.train, f"stage{stage}").micro_batch_size
    buffered = min(d.shuffle_buffer, d.segment_batches * b)  # a segment reads no more than it needs
    batch = batch_bytes(cfg, stage)
    in_flight = 1 + (PREFETCH_FACTOR if d.num_workers else 0)
    return {"shuffle_buffer_samples": buffered, "sample_bytes": int(sample_bytes), "sample_bytes_from": source,
            "buffer_bytes": int(buffered * sample_bytes), "batch_bytes": batch, "batches_in_flight": in_flight,
            "in_flight_bytes": in_flight * batch, "total_bytes": int(buffered * sample_bytes) + in_flight * batch}


def worker_memory_bytes(cfg, stage: int = 1, sample_bytes: Optional[float] = None) -> int:
    """:func:`worker_memory`'s total: one worker's shuffle buffer plus its batches in flight."""
    return worker_memory(cfg, stage, sample_bytes)["total_bytes"]


def shm_need_bytes(cfg, stage: int, ranks_per_node: int) -> int:
    """Shared memory the node's train loaders may hold at once: ranks x workers x prefetch x batch bytes
    (0 without workers: batches are then made in the rank's own process)."""
    return ranks_per_node * cfg.data.num_workers * PREFETCH_FACTOR * batch_bytes(cfg, stage)


def ranks_per_node(world_size: int) -> int:
    """This node's ranks, from the launcher's environment (deepspeed's LOCAL_SIZE, torchrun's
    LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE), else the whole world (one node)."""
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        digits = value.split("(")[0].split(",")[0]  # SLURM writes e.g. "8(x2)"
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return max(1, world_size)


def shm_available_bytes(path: str = SHM) -> Optional[int]:
    """Free bytes of ``path`` (os.statvfs), or None where there is no such mount."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_shm(cfg, stage: int, ranks: int, available: Optional[int] = None) -> int:
    """Raise ConfigError when ``ranks`` ranks' train loaders need more shared memory than ``/dev/shm``
    has free (``available``: that figure, else os.statvfs): workers would die with a bus error
    mid-run. Returns the need in bytes."""
    from msmedcap.errors import ConfigError

    need = shm_need_bytes(cfg, stage, ranks)
    if available is None:
        available = shm_available_bytes()
    if need == 0 or available is None or need <= available:
        return need
    b = getattr(cfg.train, f"stage{stage}").micro_batch_size
    raise ConfigError(
        f"{SHM} has {_gib(available)} free but the train loaders need up to {_gib(need)}: {ranks} rank(s) on this "
        f"node x data.num_workers={cfg.data.num_workers} x prefetch {PREFETCH_FACTOR} x {_gib(batch_bytes(cfg, stage))} "
        f"per batch (micro batch {b}, uint8 images at the encoders' input sizes). DataLoader workers would die with "
        f"a bus error. Fixes: run the container with --ipc=host or a larger --shm-size (docker run --shm-size="
        f"{-(-need // 2**30) + 1}g), or fewer data.num_workers, or a smaller train.stage{stage}.micro_batch_size "
        f"(with more grad_accum)")
