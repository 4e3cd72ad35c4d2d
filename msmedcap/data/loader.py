"""Train and eval streams over WebDataset shards, yielding batches in the msmedcap.batch format.

Train (:func:`make_train_loader`): a weighted mixture of shard sets (``data.train`` specs
``PATTERN[::WEIGHT[::DOMAIN[::SOURCE]]]``; weight = relative share of samples; a DOMAIN/SOURCE given
there labels every sample of the set and wins over its json), shards resampled with replacement,
a seeded shuffle buffer, our own decoder, per-encoder transforms, tokenisation, batching. Infinite:
the step count drives the epoch, and every rank yields a batch at every step.

Data position. Each DataLoader worker ``w`` of ``W`` (W = 1 without workers) yields the global
steps ``s`` with ``s % W == w`` (the DataLoader takes batches round-robin). Worker role ``s % W``'s
batches come in segments of ``data.segment_batches`` batches; segment ``k`` of a role is a pure
function of (train.seed, stage, world size, rank, W, role, k): its shards, mixture draws and shuffle
are seeded by that tuple, and it reads from fresh shard draws. A segment reads the samples its
batches need (segment_batches x micro batch, more only for skipped ones), shuffled through a buffer
of at most ``data.shuffle_buffer`` samples that starts yielding at ``data.shuffle_initial`` and is
drained by the segment's end: a worker holds at most that buffer, and no sample read is dropped (but
for the end of a top-up read when skipped samples left the segment short). So the batch at global step ``s`` on a
rank is fixed by (seed, s, world size, num_workers), and a run resumed at ``start_step`` starts each
worker at its segment and skips at most ``segment_batches - 1`` batches to reach ``s``: it sees exactly
the batches the uninterrupted run would have seen. (Resume with the same world size and
``data.num_workers``: they are part of the data order.)

Eval (:func:`make_eval_loader`): the specs' shards in order, no resampling, one slot per (rank, worker),
slot = worker x world + rank. With at least as many shards as slots, shard ``s`` goes whole to slot
``s % slots``: each shard is opened once in all. With fewer, the slots sharing a shard keep every
``parts``-th of its samples (:func:`eval_slot_shards`). Either way every sample is read exactly once
whatever the number of shards, ranks and workers, and every rank takes part in the gather.

Corrupt samples are skipped and counted; each batch's ``skipped`` holds the counts since the same
worker's previous batch.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import signal
import random
from functools import partial
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msmedcap.batch import DOMAIN_INDEX
from msmedcap.config import Config, ConfigError
from msmedcap.data.shard_spec import expand_braces, parse_shard_spec
import numpy as np

from msmedcap.data.decode import SkipCounter, decode_sample, image_member, parse_caption, parse_meta
from msmedcap.data.transforms import NATIVE_KEY, stack_pixels
from msmedcap.data.gpu_decode import gpu_decode_available
from msmedcap.data.shards import check_spec_has_domain, iter_raw_samples, label_sample
from msmedcap.tokenization import encode_lm_captions, encode_qformer_text

# Shards visited in a row without one sample before a source is declared unreadable (not an endless loop).
MAX_EMPTY_SHARDS = 64
# Samples in a row that fail to decode/transform before the train stream gives up with the reason.
MAX_UNUSABLE_IN_A_ROW = 1000


class ShardSet(NamedTuple):
    pattern: str
    urls: list
    weight: float
    domain: Optional[str]  # the spec's DOMAIN (wins over each sample's json), or None
    source: Optional[str]  # the spec's SOURCE, or None


def parse_specs(specs: list, where: str = "data") -> list:
    """["pattern::w::domain::source", ...] -> [ShardSet], naming a spec that expands to nothing or whose
    samples have no domain (checked on its first shard's first samples, before any work)."""
    out = []
    for spec in specs:
        parsed = parse_shard_spec(spec)
        urls = expand_braces(parsed.pattern)
        if not urls:
            raise ConfigError(f"shard spec {spec!r} names no files")
        if parsed.domain is None:
            check_spec_has_domain(where, spec, urls)
        out.append(ShardSet(parsed.pattern, urls, parsed.weight, parsed.domain, parsed.source))
    if not out:
        raise ConfigError("no shard specs given")
    return out


def _labelled(raws, domain: Optional[str], source: Optional[str]):
    if domain is None and source is None:
        return raws
    return (label_sample(raw, domain, source) for raw in raws)


def _worker() -> tuple:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _no_worker_seed() -> int:  # our seeds already name the worker's role
    return 0


class SampleProcessor:
    """Raw tar sample -> decoded sample with each encoder's uint8 pixels at their resized size (or, with
    ``data.resize_on_device``, the decoded pixels alone); samples -> batch dict (tokenised; images
    stacked by ``transforms.stack_pixels``). ``feature_stores`` (``FeatureCache.reader_spec``): a
    sample whose rows are stored for every branch it feeds (``stage`` 1: its routed branches, else all)
    is not decoded; its rows go into the batch (models/feature_cache.py)."""

    def __init__(self, cfg: Config, stage: Optional[int] = None, feature_stores: Optional[dict] = None):
        from msmedcap.data.transforms import draft_size, encoder_transforms
        from msmedcap.models.lm_families import caption_end
        from msmedcap.tokenization import load_lm_tokenizer, load_qformer_tokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we run in DataLoader workers
        self.max_pixels = cfg.data.max_image_pixels
        self.transforms = encoder_transforms(cfg)
        margin = cfg.data.jpeg_draft
        self.draft = partial(draft_size, list(self.transforms.values()), margin=margin) if margin else None
        self.gpu_decode = bool(cfg.data.gpu_decode) and gpu_decode_available()
        self.resize_on_device = bool(cfg.data.resize_on_device)
        self.qformer_tok = load_qformer_tokenizer(cfg.model.qformer.tokenizer)
        self.lm_tok = load_lm_tokenizer(cfg.model.lm.tokenizer)
        self.caption_end = caption_end(cfg.model, self.lm_tok)
        self.max_text_len = cfg.model.qformer.max_text_len
        self.max_caption_len = cfg.model.lm.max_caption_len
        self.hash_images = bool(cfg.model.feature_cache_dir)  # the feature cache's key (models/feature_cache.py)
        self.cache = None
        if feature_stores and self.hash_images:
            from msmedcap.models.feature_cache import WorkerReader

            self.cache = WorkerReader(feature_stores)
            branches = list(cfg.model.branches)
            self.needs = {d: [b for b in branches if stage != 1 or b in cfg.model.routing.get(d, [])]
                          for d in DOMAIN_INDEX}

    def prepare(self, raw: dict) -> dict:
        if self.cache is not None:
            sample = self._from_cache(raw)
            if sample is not None:
                return sample
        if self.gpu_decode:
            from msmedcap.data.gpu_decode import prepare_jpeg

            sample = prepare_jpeg(raw, self.max_pixels, self.transforms)
            if sample is not None:  # a JPEG: decoded on the device (msmedcap.data.gpu_decode)
                return self._hashed(sample, raw)
        sample = decode_sample(raw, self.max_pixels, self.draft)
        image, source = sample.pop("image"), sample.pop("source_size")
        if self.resize_on_device:  # data.resize_on_device: the decoded pixels cross as they are
            sample[NATIVE_KEY] = np.asarray(image)
        else:
            for name, transform in self.transforms.items():
                sample[name] = transform.pixels(image, source)
        return self._hashed(sample, raw)

    def _from_cache(self, raw: dict) -> Optional[dict]:
        """A sample whose every needed branch is stored: its rows, nothing decoded (else None, with the
        rows found kept for the decoded sample: they still skip their encoders)."""
        digest = hashlib.sha256(raw[image_member(raw)]).hexdigest()
        meta = parse_meta(raw)
        needs = self.needs[meta["domain"]]
        found = self.cache.lookup(digest, needs)
        self._found = (digest, found)
        if len(found) < len(needs):
            return None
        empty = np.zeros((0, 0, 3), np.uint8)
        sample = {"key": raw["__key__"], "caption": parse_caption(raw), "domain": meta["domain"],
                  "source": str(meta["source"]), "meta": meta, "image_sha256": digest, "cached": found}
        for name in ([NATIVE_KEY] if self.resize_on_device else self.transforms):
            sample[name] = empty  # size (0, 0): not decoded
        return sample

    def _hashed(self, sample: dict, raw: dict) -> dict:
        if self.hash_images:
            if self.cache is not None:
                sample["image_sha256"], sample["cached"] = self._found
            else:
                sample["image_sha256"] = hashlib.sha256(raw[image_member(raw)]).hexdigest()
        return sample

    def collate(self, samples: list, counter: SkipCounter) -> dict:
        captions = [s["caption"] for s in samples]
        # both texts padded to this batch's longest (at most max_text_len / max_caption_len)
        q = encode_qformer_text(self.qformer_tok, captions, self.max_text_len)
        q_truncated = q["truncated"]
        lm = encode_lm_captions(self.lm_tok, captions, self.max_caption_len, self.caption_end)
        batch = {
            "key": [s["key"] for s in samples],
            "source": [s["source"] for s in samples],
            "domain": torch.tensor([DOMAIN_INDEX[s["domain"]] for s in samples], dtype=torch.long),
            "caption": captions,
            "text_input_ids": q["input_ids"], "text_attention_mask": q["attention_mask"],
            "lm_input_ids": lm["input_ids"], "lm_attention_mask": lm["attention_mask"],
            "truncated": {"qformer_text": int(q_truncated), "lm_caption": int(lm["truncated"].sum())},
            "skipped": counter.pop(),
        }
        # uint8, straight into shared memory (no torch thread pool)
        for name in ([NATIVE_KEY] if self.resize_on_device else self.transforms):
            batch[name], batch[f"{name}_size"] = stack_pixels([s[name] for s in samples])
        if self.gpu_decode:
            batch["jpeg_bytes"] = [s.get("jpeg_bytes") for s in samples]
        if self.hash_images:
            batch["image_sha256"] = [s["image_sha256"] for s in samples]
        if self.cache is not None:
            self.cache.collate([s["cached"] for s in samples], batch)
        return batch


# --------------------------------------------------------------------------- train
class _Progress:
    """Fails loudly when a resampled source keeps yielding shards with no readable sample."""

    def __init__(self, pattern: str):
        self.pattern, self.empty = pattern, 0

    def shards(self, urls):
        for url in urls:
            self.empty += 1
            if self.empty > MAX_EMPTY_SHARDS:
                raise RuntimeError(f"{self.pattern}: {MAX_EMPTY_SHARDS} shards in a row gave no sample "
                                   f"(all empty or corrupt?)")
            yield url

    def samples(self, samples):
        for sample in samples:
            self.empty = 0
            yield sample


def _weighted_mix(streams: list, weights: list, rng: random.Random):
    cumulative = list(itertools.accumulate(weights))
    while True:
        yield next(streams[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])])


def _shuffled_chunks(samples, size: int, bufsize: int, initial: int, rng: random.Random):
    """``samples`` in chunks of ``size`` (a segment's worth), each through webdataset's shuffle buffer (at
    most ``bufsize`` samples held, the first yielded once ``initial`` are in) and drained at the chunk's
    end: every sample read is yielded, none is left in a buffer when the segment ends. A second chunk
    is read only when skipped samples left the first one short of the segment's batches."""
    import webdataset as wds

    shuffle = wds.shuffle(bufsize, initial=min(initial, bufsize), rng=rng)
    while True:
        empty = True
        for sample in shuffle(itertools.islice(samples, size)):
            empty = False
            yield sample
        if empty:
            return


def _full_batches(samples, size: int, collate):
    """Batches of ``size``, each made as its last sample arrives (webdataset's ``batched`` reads one sample
    more first, which at a segment's end would start another chunk's read)."""
    buf = []
    for sample in samples:
        buf.append(sample)
        if len(buf) == size:
            yield collate(buf)
            buf = []


class TrainStream(IterableDataset):
    def __init__(self, cfg: Config, stage: int, rank: int, world_size: int, start_step: int = 0,
                 feature_stores: Optional[dict] = None):
        super().__init__()
        self.feature_stores = feature_stores
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.stage, self.rank, self.world_size, self.start_step = cfg, stage, rank, world_size, start_step
        self.sources = parse_specs(cfg.data.train, "data.train")
        self.batch_size = getattr(cfg.train, f"stage{stage}").micro_batch_size

    def _source_samples(self, shard_set: ShardSet, seed: int, counter: SkipCounter):
        import webdataset as wds

        progress = _Progress(shard_set.pattern)
        shards = wds.ResampledShards(shard_set.urls, seed=seed, deterministic=True, worker_seed=_no_worker_seed)
        urls = (shard["url"] for shard in progress.shards(iter(shards)))
        raws = progress.samples(iter_raw_samples(urls, counter.tar_handler))
        return _labelled(raws, shard_set.domain, shard_set.source)

    def segment(self, processor: SampleProcessor, counter: SkipCounter, workers: int, role: int, index: int):
        """The ``index``-th segment (``data.segment_batches`` batches) of worker role ``role``."""
        import webdataset as wds

        d = self.cfg.data
        rng = random.Random(f"msmedcap-train/{self.cfg.train.seed}/{self.stage}/{self.world_size}/{self.rank}/"
                            f"{workers}/{role}/{index}")
        streams = [self._source_samples(s, rng.getrandbits(31), counter) for s in self.sources]
        mixed = _weighted_mix(streams, [s.weight for s in self.sources], rng)
        shuffled = _shuffled_chunks(mixed, d.segment_batches * self.batch_size, d.shuffle_buffer,
                                    d.shuffle_initial, random.Random(rng.getrandbits(64)))
        prepared = wds.map(processor.prepare, handler=counter.sample_handler)(shuffled)
        batches = _full_batches(prepared, self.batch_size, partial(processor.collate, counter=counter))
        return itertools.islice(batches, d.segment_batches)

    def __iter__(self):
        worker, workers = _worker()
        processor = SampleProcessor(self.cfg, self.stage, self.feature_stores)
        counter = SkipCounter(max_in_a_row=MAX_UNUSABLE_IN_A_ROW)
        first = self.start_step + worker  # the global step of this worker's first batch
        role, local = first % workers, first // workers
        index, skip = divmod(local, self.cfg.data.segment_batches)
        for batch in itertools.islice(self.segment(processor, counter, workers, role, index), skip, None):
            yield batch
        while True:
            index += 1
            yield from self.segment(processor, counter, workers, role, index)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to their rank. ``scancel`` and preemption signal every process
    of a job, and PyTorch's worker SIGTERM handler exits on any signal not sent by the parent, which
    would kill the rank before it checkpoints. Workers still stop when the rank shuts them down or dies."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def _loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    from msmedcap.data.memory import PREFETCH_FACTOR

    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      prefetch_factor=PREFETCH_FACTOR if num_workers else None, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_ignore_stop_signals if num_workers else None)


def make_train_loader(cfg: Config, stage: int, rank: int, world_size: int, start_step: int = 0,
                      feature_stores: Optional[dict] = None) -> DataLoader:
    """Endless micro-batches for ``rank``. ``start_step`` counts micro-batches this rank's loader already
    yielded (optimizer step x grad_accum); the stream continues exactly from there (see module doc).
    ``feature_stores``: the model's ``feature_cache.reader_spec()``: workers read stored rows and skip
    decoding those samples (models/feature_cache.py)."""
    from msmedcap.data.memory import check_shm, ranks_per_node

    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    check_shm(cfg, stage, ranks_per_node(world_size))  # ConfigError: /dev/shm too small for the workers' batches
    return _loader(TrainStream(cfg, stage, rank, world_size, start_step, feature_stores), cfg.data.num_workers)


# --------------------------------------------------------------------------- eval
def _batches(samples, size: int, collate):
    """Batches of ``size`` (last one partial); a batch is built only when the next sample arrives or the
    stream ends, so skip counts read after the last full batch still reach a batch."""
    buf = []
    for sample in samples:
        if len(buf) == size:
            yield collate(buf)
            buf = []
        buf.append(sample)
    if buf:
        yield collate(buf)


def _ignore(exn: Exception) -> bool:
    return True


def eval_slot_shards(n_shards: int, slots: int, slot: int) -> list:
    """What slot ``slot`` of ``slots`` reads of ``n_shards`` eval shards: ``[(shard, part, parts)]``, keep
    the shard's samples ``i`` (counted in the shard, corrupt ones included) with ``i % parts == part``.

    ``n_shards >= slots``: shard ``s`` goes whole to slot ``s % slots``; each shard is opened once in
    all. Fewer shards than slots: shard ``slot % n_shards`` is shared by the slots with that remainder
    (``parts`` of them, ``slots // n_shards`` or one more), each keeping every ``parts``-th sample; each
    shard is then opened ``parts`` times, ``slots`` opens in all, and every slot has work."""
    if n_shards >= slots:
        return [(s, 0, 1) for s in range(slot, n_shards, slots)]
    shard = slot % n_shards
    parts = slots // n_shards + (1 if shard < slots % n_shards else 0)
    return [(shard, slot // n_shards, parts)]


class EvalStream(IterableDataset):
    def __init__(self, cfg: Config, specs: list, rank: int, world_size: int, batch_size: int,
                 count_batches: bool = False):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.rank, self.world_size, self.batch_size = cfg, rank, world_size, batch_size
        self.count_batches = count_batches
        sets = parse_specs(specs, "data.eval")
        self.urls = [u for s in sets for u in s.urls]
        # a spec's DOMAIN/SOURCE by shard (the first spec naming a shard labels it)
        self.labels = {}
        for s in sets:
            for u in s.urls:
                self.labels.setdefault(u, (s.domain, s.source))

    def _raw(self, slot: int, slots: int, counter: SkipCounter):
        for shard, part, parts in eval_slot_shards(len(self.urls), slots, slot):
            # a shard shared by several slots: its first part counts shard-level errors, so they count once
            raws = iter_raw_samples([self.urls[shard]], counter.tar_handler if part == 0 else _ignore)
            yield from itertools.islice(raws, part, None, parts)

    def __iter__(self):
        import webdataset as wds

        worker, workers = _worker()
        slots, slot = self.world_size * workers, worker * self.world_size + self.rank
        processor, counter = SampleProcessor(self.cfg), SkipCounter()
        mine = self._raw(slot, slots, counter)
        if any(d is not None or src is not None for d, src in self.labels.values()):
            mine = (label_sample(r, *self.labels.get(r.get("__url__"), (None, None))) for r in mine)
        prepared = wds.map(processor.prepare, handler=counter.sample_handler)(mine)
        yield from _batches(prepared, self.batch_size, partial(processor.collate, counter=counter))
        counts = counter.pop()  # left only when no batch was made: every sample of the slot skipped
        if self.count_batches and counts:
            yield {"key": [], "skipped": counts}


def make_eval_loader(cfg: Config, specs: list, rank: int, world_size: int, batch_size: int,
                     count_batches: bool = False) -> DataLoader:
    """Finite batches of this rank's share of ``specs``; all ranks together see every sample once.
    ``count_batches``: a (rank, worker) slot that skipped samples but made no batch (all its samples
    corrupt, or its only shard an empty tar) still hands its counts on, as ``{"key": [], "skipped"}``."""
    return _loader(EvalStream(cfg, specs, rank, world_size, batch_size, count_batches), cfg.data.num_workers)
