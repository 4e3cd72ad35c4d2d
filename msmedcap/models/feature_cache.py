"""Optional cache of frozen-encoder outputs: they are pure functions of the image, so they need computing once.

Keyed by ``sha256(encoded image bytes)`` (the batch's ``image_sha256``, added by the loader) within a
store per encoder identity: the branch, its config (name, weights, image size, feature layer, token
layout), the frozen dtype and a fingerprint of the weights themselves. Another encoder, resolution or
checkpoint gets another store, so a stale feature is never served. Layout::

    ROOT/clip-<identity digest>/identity.json   what the features are of (readable)
                               /features.bin    fixed-size rows, raw encoder dtype, appended
                               /index.tsv       "<sha256>\\t<byte offset>" per row, appended after the row

A row is written before its index line, and the index is appended under an exclusive ``flock``,
so several ranks can fill one cache and a killed writer never leaves an index entry pointing at a
half-written row (an unterminated last index line is ignored). Rows are read through ``np.memmap``.

Switched on with ``model.feature_cache=PATH``. Misses are computed by the encoder and written, so the
first epoch fills the cache and later epochs skip the encoders. The loader still decodes and resizes
every image (in its workers); a hit skips only the encoder. See docs/benchmarks.md for when it pays off.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

KEY = "image_sha256"  # batch key: list[str], sha256 hex of each sample's encoded image bytes
_NUMPY = {torch.float16: np.uint16, torch.bfloat16: np.uint16, torch.float32: np.float32}


def image_sha256(data: bytes) -> str:
    """The cache key of an encoded image (the file's bytes as stored in the shard)."""
    return hashlib.sha256(data).hexdigest()


def weights_fingerprint(module: nn.Module, head: int = 256) -> str:
    """sha256 over every tensor's name, shape, dtype and first ``head`` values: different checkpoints
    differ there, and hashing a billion-parameter encoder in full would cost seconds at every start."""
    h = hashlib.sha256()
    for name, t in list(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1)[:head].float().cpu().numpy().tobytes())
    return h.hexdigest()


def encoder_identity(branch: str, encoder_cfg, encoder: nn.Module) -> dict:
    """What a store's features are of: the branch, its config's part (``EncoderSpec.identity``, by
    default the whole ``model.<branch>`` section), the dtype, the token shape and the weights."""
    from msmedcap.registry import encoder_spec

    return {"branch": branch, "config": encoder_spec(branch).identity(encoder_cfg), "dtype": str(encoder.dtype),
            "tokens": [encoder.num_tokens, encoder.width], "weights": weights_fingerprint(encoder)}


class FeatureStore:
    """One encoder identity's rows: ``get`` hits, ``put`` new rows (appends, shared across processes)."""

    def __init__(self, directory: Path, identity: dict, row_shape: Sequence[int], dtype: torch.dtype):
        if dtype not in _NUMPY:
            raise ValueError(f"feature cache: unsupported encoder dtype {dtype}")
        self.dir, self.row_shape, self.dtype = Path(directory), tuple(row_shape), dtype
        self.row_bytes = int(np.prod(self.row_shape)) * torch.tensor([], dtype=dtype).element_size()
        self.dir.mkdir(parents=True, exist_ok=True)
        ident = self.dir / "identity.json"
        if ident.is_file():
            stored = json.loads(ident.read_text())
            if stored != json.loads(json.dumps(identity)):
                raise ValueError(f"feature cache {self.dir}: identity.json does not match this encoder "
                                 "(a digest collision or an edited file); remove the directory")
        else:
            tmp = ident.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(identity, indent=1))
            os.replace(tmp, ident)
        self.data_path, self.index_path = self.dir / "features.bin", self.dir / "index.tsv"
        self.data_path.touch()
        self.index_path.touch()
        self.offsets: dict = {}
        self._index_pos = 0  # bytes of index.tsv already read
        self._map: Optional[np.memmap] = None
        self.refresh()

    def refresh(self) -> None:
        """Read index lines appended since the last look (by this or another process)."""
        with open(self.index_path, "rb") as f:
            f.seek(self._index_pos)
            tail = f.read()
        end = tail.rfind(b"\n") + 1  # an unterminated last line is a write in progress (or a crash)
        for line in tail[:end].splitlines():
            key, _, offset = line.decode().partition("\t")
            if offset.isdigit():
                self.offsets[key] = int(offset)
        self._index_pos += end

    def __len__(self) -> int:
        return len(self.offsets)

    def _rows(self, need_end: int) -> np.memmap:
        if self._map is None or self._map.shape[0] < need_end:
            self._map = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        return self._map

    def get(self, keys: Sequence[str]) -> tuple:
        """(hit mask ``[n]`` bool, features ``[hits, *row_shape]`` of the hits in order)."""
        if any(k not in self.offsets for k in keys):
            self.refresh()
        hits = [k in self.offsets for k in keys]
        found = [self.offsets[k] for k in keys if k in self.offsets]
        if not found:
            return torch.tensor(hits, dtype=torch.bool), None
        rows = self._rows(max(found) + self.row_bytes)
        buf = np.stack([rows[o:o + self.row_bytes] for o in found])  # a copy out of the page cache
        feats = torch.from_numpy(buf.view(_NUMPY[self.dtype])).view(self.dtype)
        return torch.tensor(hits, dtype=torch.bool), feats.reshape(len(found), *self.row_shape)

    def put(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        """Append rows for keys not stored yet (by any process)."""
        feats = feats.detach().to("cpu", self.dtype).contiguous()
        if tuple(feats.shape[1:]) != self.row_shape:
            raise ValueError(f"feature cache {self.dir}: rows of shape {tuple(feats.shape[1:])}, store holds {self.row_shape}")
        raw = feats.view(torch.uint8).numpy().reshape(len(keys), self.row_bytes) if self.dtype != torch.float32 \
            else feats.numpy().view(np.uint8).reshape(len(keys), self.row_bytes)
        with open(self.index_path, "ab") as index:
            fcntl.flock(index, fcntl.LOCK_EX)
            try:
                self.refresh()
                new = [(k, i) for i, k in enumerate(keys) if k not in self.offsets]
                new = list({k: i for k, i in new}.items())  # a key twice in one batch: store it once
                if not new:
                    return
                with open(self.data_path, "ab") as data:
                    start = data.seek(0, os.SEEK_END)
                    for _, i in new:
                        data.write(raw[i].tobytes())
                    data.flush()
                    os.fsync(data.fileno())  # rows on disk before the index points at them
                if index.tell() and not _ends_with_newline(self.index_path):
                    index.write(b"\n")  # terminate a line a killed writer left half written
                lines = "".join(f"{k}\t{start + j * self.row_bytes}\n" for j, (k, _) in enumerate(new))
                index.write(lines.encode())
                index.flush()
            finally:
                fcntl.flock(index, fcntl.LOCK_UN)
        self.refresh()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class FeatureCache:
    """The model's frozen-encoder front: ``encode`` serves hits from the stores, runs the encoder on
    misses only and stores them. ``hits``/``misses`` count samples per branch."""

    def __init__(self, root, encoders: nn.ModuleDict, encoder_cfgs: dict, write: bool = True):
        self.root, self.write = Path(root), write
        self.stores: dict = {}
        for branch, enc in encoders.items():
            identity = encoder_identity(branch, encoder_cfgs[branch], enc)
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
            self.stores[branch] = FeatureStore(self.root / f"{branch}-{digest}", identity,
                                               (enc.num_tokens, enc.width), enc.dtype)
        self.hits = {b: 0 for b in encoders}
        self.misses = {b: 0 for b in encoders}

    def encode(self, encoder: nn.Module, branch: str, images: torch.Tensor, keys: Sequence[str],
               sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder tokens ``[n, N, C]`` of ``images`` (the batch's uint8 ``[n, H, W, 3]`` with their
        ``sizes``, or normalised floats; on the model's device) whose encoded bytes hash to ``keys``."""
        if len(keys) != len(images):
            raise ValueError(f"feature cache: {len(keys)} keys for {len(images)} images")
        store = self.stores[branch]
        hit, cached = store.get(keys)
        n_hit = int(hit.sum())
        self.hits[branch] += n_hit
        self.misses[branch] += len(keys) - n_hit
        if n_hit == len(keys):
            return cached.to(images.device, non_blocking=True)
        miss = (~hit).nonzero().squeeze(1)
        fresh = encoder(images[miss.to(images.device)], None if sizes is None else sizes[miss.to(sizes.device)])
        if self.write:
            store.put([keys[i] for i in miss.tolist()], fresh)
        if cached is None:
            return fresh
        out = torch.empty(len(keys), *fresh.shape[1:], dtype=fresh.dtype, device=fresh.device)
        out[miss.to(fresh.device)] = fresh
        out[hit.nonzero().squeeze(1).to(fresh.device)] = cached.to(fresh.device)
        return out


def attach_feature_cache(model, root, write: bool = True) -> FeatureCache:
    """Give ``model`` (an MSMedCap) a cache at ``root``: its ``encode`` then goes through it."""
    from msmedcap.registry import encoder_spec

    cfgs = {b: encoder_spec(b).section(model.cfg) for b in model.branches}
    model.feature_cache = FeatureCache(root, model.encoders, cfgs, write=write)
    return model.feature_cache
