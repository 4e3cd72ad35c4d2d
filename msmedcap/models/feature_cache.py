"""Optional cache of frozen-encoder outputs: they are pure functions of the image, so they need computing once.

Keyed by ``sha256(encoded image bytes)`` (the batch's ``image_sha256``, added by the loader) within a
store per encoder identity: the branch, its config (name, weights, image size, feature layer, token
layout), the frozen dtype and a fingerprint of the weights themselves. Another encoder, resolution or
checkpoint gets another store, so a stale feature is never served. Layout::

    ROOT/clip-<identity digest>/identity.json          what the features are of (readable)
                               /features-<writer>.bin  fixed-size rows, raw encoder dtype, appended by one writer
                               /index-<writer>.tsv     "<sha256>\\t<byte offset>" per row of that file
                               /features.bin, index.tsv  the same, shared, as stores before issue 21 wrote
                                                       them: still read, never written

One writer per rank (``rank<R>``; an exclusive ``flock`` on its own index, taken once, so no rank
waits for another). Rows are appended at once; their index lines follow after an fsync of the rows,
once per segment (``SYNC_EVERY`` batches) and at close, so an index entry never points at rows that
may not be on disk (an unterminated last index line is ignored). Rows are read through ``np.memmap``.

Switched on with ``model.feature_cache=PATH`` (``auto``: a trainer's OUTPUT_DIR/feature-cache). Misses
are computed by the encoder, one image at a time (a row is then the image's own, whatever missed with it,
so results do not depend on the cache's state), and written, so the first epoch fills the cache and later
epochs skip the encoders. The train loader's workers look each sample up by its hash before decoding
(``WorkerReader``, given ``FeatureCache.reader_spec`` through ``make_train_loader``): when every branch
the sample feeds (stage 1: its routed branches; stage 2: all) is stored, the image is not decoded at
all and its rows travel in the batch (``<branch>_cached`` mask, ``<branch>_cached_rows``; pinned by the
DataLoader on a GPU); the model uses them instead of the encoder. Batches without worker-read rows (eval,
benches) are looked up in the model's process. See docs/benchmarks.md for when it pays off.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import itertools
import json
import os
import weakref
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

KEY = "image_sha256"  # batch key: list[str], sha256 hex of each sample's encoded image bytes
SYNC_EVERY = 50  # puts (batches) per fsync of a store's new rows; and at close
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
    """One encoder identity's rows: ``get``/``row`` hits, ``put`` new rows.

    Reads cover every ``index*.tsv`` of the directory: the shared ``index.tsv``/``features.bin`` of
    stores written before issue 21 (read as they are, never written again) and one
    ``index-<writer>.tsv``/``features-<writer>.bin`` pair per writer. A writer (a rank) appends only
    to its own pair (no cross-rank lock; an exclusive ``flock`` on its own index, taken once, makes a
    second process with the same rank pick another name). Rows are written at once; their index lines
    are held until :meth:`sync` (every ``sync_every`` puts and at :meth:`close`), which fsyncs the rows
    and then appends the lines: one fsync per segment, and an index line never points at rows that
    might not be on disk. Until then this process serves its own new rows from memory-mapped pages.
    ``identity=None``: a reader of an existing store (a DataLoader worker), nothing written."""

    def __init__(self, directory: Path, identity: Optional[dict], row_shape: Sequence[int], dtype: torch.dtype,
                 sync_every: int = 1, writer: Optional[str] = None):
        if dtype not in _NUMPY:
            raise ValueError(f"feature cache: unsupported encoder dtype {dtype}")
        self.dir, self.row_shape, self.dtype = Path(directory), tuple(row_shape), dtype
        self.row_bytes = int(np.prod(self.row_shape)) * torch.tensor([], dtype=dtype).element_size()
        self.sync_every, self.writer_name = max(1, int(sync_every)), writer
        if identity is not None:
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
        elif not (self.dir / "identity.json").is_file():
            raise ValueError(f"feature cache {self.dir}: no identity.json (not a store)")
        self.files: list = []  # data file of each index file, by position
        self._file_of: dict = {}  # index file name -> position in self.files
        self.offsets: dict = {}  # key -> (file position, byte offset)
        self._index_pos: dict = {}  # index file name -> bytes already read
        self._maps: dict = {}
        self._data = self._index = None  # this writer's open files
        self._pending: list = []  # (key, offset) written, index lines not yet appended
        self._puts = 0
        self.fsyncs = 0
        self.refresh()

    # ------------------------------------------------------------------ reading
    def _file(self, index_name: str) -> int:
        pos = self._file_of.get(index_name)
        if pos is None:
            stem = index_name[len("index"):-len(".tsv")]
            data = self.dir / f"features{stem}.bin"
            pos = self._file_of[index_name] = len(self.files)
            self.files.append(data)
            self._index_pos[index_name] = 0
        return pos

    def refresh(self) -> None:
        """Read index lines appended since the last look (by this or another process), in every index file."""
        names = sorted(n for n in os.listdir(self.dir) if n.startswith("index") and n.endswith(".tsv"))
        for name in names:
            pos = self._file(name)
            with open(self.dir / name, "rb") as f:
                f.seek(self._index_pos[name])
                tail = f.read()
            end = tail.rfind(b"\n") + 1  # an unterminated last line is a write in progress (or a crash)
            for line in tail[:end].splitlines():
                key, _, offset = line.decode().partition("\t")
                if offset.isdigit():
                    self.offsets.setdefault(key, (pos, int(offset)))
            self._index_pos[name] += end

    def __len__(self) -> int:
        return len(self.offsets)

    def _rows(self, pos: int, need_end: int) -> np.memmap:
        m = self._maps.get(pos)
        if m is None or m.shape[0] < need_end:
            m = self._maps[pos] = np.memmap(self.files[pos], dtype=np.uint8, mode="r")
        return m

    def row(self, key: str, refresh: bool = True) -> Optional[np.ndarray]:
        """The stored bytes of ``key``'s row (a memory-mapped view, uint8 ``[row_bytes]``), or None."""
        where = self.offsets.get(key)
        if where is None and refresh:
            self.refresh()
            where = self.offsets.get(key)
        if where is None:
            return None
        pos, offset = where
        return self._rows(pos, offset + self.row_bytes)[offset:offset + self.row_bytes]

    def as_features(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, row_bytes]`` -> ``[n, *row_shape]`` in the store's dtype (a view)."""
        return rows.view(self.dtype).reshape(len(rows), *self.row_shape)

    def get(self, keys: Sequence[str]) -> tuple:
        """(hit mask ``[n]`` bool, features ``[hits, *row_shape]`` of the hits in order)."""
        if any(k not in self.offsets for k in keys):
            self.refresh()
        hits = [k in self.offsets for k in keys]
        found = [self.row(k, refresh=False) for k in keys if k in self.offsets]
        if not found:
            return torch.tensor(hits, dtype=torch.bool), None
        buf = np.stack(found)  # a copy out of the page cache
        return torch.tensor(hits, dtype=torch.bool), self.as_features(torch.from_numpy(buf))

    # ------------------------------------------------------------------ writing
    def _open_writer(self) -> None:
        name = self.writer_name or f"rank{_rank()}"
        for attempt in itertools.count():
            stem = name if attempt == 0 else f"{name}.{os.getpid()}.{attempt}"
            index = open(self.dir / f"index-{stem}.tsv", "ab")
            try:
                fcntl.flock(index, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours for as long as we write
            except OSError:  # another process writes under this name: take another
                index.close()
                continue
            break
        self.index_path, self.data_path = self.dir / f"index-{stem}.tsv", self.dir / f"features-{stem}.bin"
        self._index, self._data = index, open(self.data_path, "ab")
        if index.tell() and not _ends_with_newline(Path(index.name)):
            index.write(b"\n")  # terminate a line a killed writer left half written
        self.refresh()
        self._own = self._file(f"index-{stem}.tsv")

    def put(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        """Append rows for keys not stored yet (by any process); their index lines follow at the next sync."""
        feats = feats.detach().to("cpu", self.dtype).contiguous()
        if tuple(feats.shape[1:]) != self.row_shape:
            raise ValueError(f"feature cache {self.dir}: rows of shape {tuple(feats.shape[1:])}, store holds {self.row_shape}")
        raw = feats.view(torch.uint8).numpy().reshape(len(keys), self.row_bytes)
        if self._data is None:
            self._open_writer()
        if any(k not in self.offsets for k in keys):
            self.refresh()
        new = list({k: i for i, k in enumerate(keys) if k not in self.offsets}.items())  # a key twice: once
        start = self._data.seek(0, os.SEEK_END)
        for j, (k, i) in enumerate(new):
            self._data.write(raw[i].tobytes())
            self.offsets[k] = (self._own, start + j * self.row_bytes)  # served to this process at once
            self._pending.append((k, start + j * self.row_bytes))
        self._data.flush()  # in the page cache: readable through the memory map
        self._puts += 1
        if self._puts % self.sync_every == 0:
            self.sync()

    def sync(self) -> None:
        """The segment's rows to disk (one fsync), then their index lines: other processes see them now."""
        if not self._pending:
            return
        self._data.flush()
        os.fsync(self._data.fileno())
        self.fsyncs += 1
        self._index.write("".join(f"{k}\t{o}\n" for k, o in self._pending).encode())
        self._index.flush()
        self._index_pos[Path(self._index.name).name] = self._index.tell()
        self._pending = []

    def close(self) -> None:
        if self._data is not None:
            self.sync()
            self._data.close()
            self._index.close()  # releases the flock
            self._data = self._index = None


def _rank() -> int:
    """This process's rank (torch.distributed when initialised, else $RANK, else 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class FeatureCache:
    """The model's frozen-encoder front: ``encode`` serves hits from the stores, runs the encoder on
    misses only and stores them. ``hits``/``misses`` count samples per branch."""

    def __init__(self, root, encoders: nn.ModuleDict, encoder_cfgs: dict, write: bool = True,
                 sync_every: int = SYNC_EVERY):
        self.root, self.write = Path(root), write
        self.stores: dict = {}
        for branch, enc in encoders.items():
            identity = encoder_identity(branch, encoder_cfgs[branch], enc)
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
            self.stores[branch] = FeatureStore(self.root / f"{branch}-{digest}", identity,
                                               (enc.num_tokens, enc.width), enc.dtype, sync_every=sync_every)
        self.hits = {b: 0 for b in encoders}
        self.misses = {b: 0 for b in encoders}
        atexit.register(_close_ref, weakref.ref(self))  # the last segment's rows and index lines

    def close(self) -> None:
        """Sync and close every store's writer (idempotent)."""
        for store in self.stores.values():
            store.close()

    def reader_spec(self) -> dict:
        """What the loader's workers need to read the stores (picklable): {branch: (dir, row shape, dtype)}."""
        return {b: (str(s.dir), s.row_shape, s.dtype) for b, s in self.stores.items()}

    def encode(self, encoder: nn.Module, branch: str, images: torch.Tensor, keys: Sequence[str],
               sizes: Optional[torch.Tensor] = None, found: Optional[tuple] = None) -> torch.Tensor:
        """Encoder tokens ``[n, N, C]`` of ``images`` (the batch's uint8 ``[n, H, W, 3]`` with their
        ``sizes``, or normalised floats; on the model's device) whose encoded bytes hash to ``keys``.
        ``found``: (hit mask, rows of the hits) the loader's workers already read (:func:`batch_rows`);
        else the store is looked up here."""
        if len(keys) != len(images):
            raise ValueError(f"feature cache: {len(keys)} keys for {len(images)} images")
        store = self.stores[branch]
        hit, cached = found if found is not None else store.get(keys)
        if cached is not None and not len(cached):
            cached = None
        n_hit = int(hit.sum())
        self.hits[branch] += n_hit
        self.misses[branch] += len(keys) - n_hit
        if n_hit == len(keys):
            return cached.to(images.device, non_blocking=True)
        miss = (~hit).nonzero().squeeze(1)
        if sizes is not None and not sizes[miss.to(sizes.device)].all():
            raise RuntimeError(f"feature cache: {branch} has no cached row for an image the loader did not decode "
                               "(the workers' branches differ from the model's)")
        # one image at a time: a row then depends on its image alone, not on which samples missed with it,
        # so a run's numbers do not depend on the cache's state (cold, warm, or rows lost to a kill)
        missed = miss.tolist()
        fresh = torch.cat([encoder(images[i:i + 1], None if sizes is None else sizes[i:i + 1]) for i in missed])
        if self.write:
            store.put([keys[i] for i in missed], fresh)
        if cached is None:
            return fresh
        out = torch.empty(len(keys), *fresh.shape[1:], dtype=fresh.dtype, device=fresh.device)
        out[miss.to(fresh.device)] = fresh
        out[hit.nonzero().squeeze(1).to(fresh.device)] = cached.to(fresh.device)
        return out


def _close_ref(ref) -> None:
    cache = ref()
    if cache is not None:
        cache.close()


def attach_feature_cache(model, root, write: bool = True) -> FeatureCache:
    """Give ``model`` (an MSMedCap) a cache at ``root``: its ``encode`` then goes through it (a cache
    it had is closed first: its rows synced)."""
    from msmedcap.registry import encoder_spec

    if getattr(model, "feature_cache", None) is not None:
        model.feature_cache.close()
    cfgs = {b: encoder_spec(b).section(model.cfg) for b in model.branches}
    model.feature_cache = FeatureCache(root, model.encoders, cfgs, write=write)
    return model.feature_cache


# --------------------------------------------------------------------------- reads in the loader's workers
def cached_keys(branch: str) -> tuple:
    """Batch keys of the rows the workers read for ``branch``: (hit mask ``[B]`` bool, rows ``[hits, N, C]``)."""
    return f"{branch}_cached", f"{branch}_cached_rows"


class WorkerReader:
    """A DataLoader worker's view of the stores (``FeatureCache.reader_spec``): ``lookup`` finds a
    sample's rows before anything is decoded, ``collate`` copies a batch's rows into one tensor in
    shared memory (which the DataLoader's ``pin_memory`` then pins)."""

    def __init__(self, spec: dict):
        self.stores = {b: FeatureStore(Path(d), None, shape, dtype) for b, (d, shape, dtype) in spec.items()}

    def lookup(self, key: str, branches) -> dict:
        """{branch: row bytes} of the ``branches`` stored for ``key``."""
        out = {}
        for b in branches:
            store = self.stores.get(b)
            row = store.row(key) if store is not None else None
            if row is not None:
                out[b] = row
        return out

    def collate(self, found: list, batch: dict) -> None:
        """``found``: each sample's ``lookup``; puts each branch's mask and rows into ``batch``."""
        from msmedcap.data.transforms import _shared_uint8

        for b, store in self.stores.items():
            rows = [f[b] for f in found if b in f]
            buf = _shared_uint8((len(rows), store.row_bytes))
            if rows:
                np.stack(rows, out=buf.numpy())
            mask_key, rows_key = cached_keys(b)
            batch[mask_key] = torch.tensor([b in f for f in found], dtype=torch.bool)
            batch[rows_key] = store.as_features(buf)


def batch_rows(batch: dict, branch: str, index: Optional[torch.Tensor] = None) -> Optional[tuple]:
    """(hit mask, rows) of the batch's worker-read rows of ``branch`` (those of ``index`` only), or None."""
    mask_key, rows_key = cached_keys(branch)
    if mask_key not in batch:
        return None
    mask, rows = batch[mask_key].cpu(), batch[rows_key]
    if index is None:
        return mask, rows
    index = index.cpu()
    pos = mask.long().cumsum(0) - 1  # each hit's row in ``rows``
    sel = mask[index]
    return sel, rows[pos[index][sel].to(rows.device)]
