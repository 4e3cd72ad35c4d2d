"""Feature-cache reads in the loader's workers (issue 21 item 3): a hit skips the decode, its rows
travel in the batch and equal the encoder's output; one append file per rank, no cross-rank lock;
one fsync per segment; stores written before (one shared features.bin/index.tsv) still read."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from helpers.data import tiny_config
from msmedcap.data import loader as loader_mod
from msmedcap.data.loader import make_eval_loader, make_train_loader
from msmedcap.data.shards import write_shards
from msmedcap.models.feature_cache import FeatureStore, cached_keys
from helpers.images import encoded

SIZES = dict(model__clip__image_size=32, model__sam__image_size=128, model__frozen_dtype="fp32")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    samples = [{"__key__": f"c-{i}", "png": encoded(i, 40 + 3 * i, 50, "RGB", "PNG"), "txt": f"image {i}",
                "json": {"domain": "general" if i % 2 else "medical", "source": "t"}} for i in range(6)]
    write_shards(samples, out, "c", shard_size=10)
    return str(out / "c-000.tar")


def counting_decodes(monkeypatch) -> list:
    calls = []
    real = loader_mod.decode_sample
    monkeypatch.setattr(loader_mod, "decode_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("device_resize", [False, True])
def test_a_hit_skips_the_decode_and_its_rows_equal_the_encoder_output(shard, tmp_path, monkeypatch, stage,
                                                                       device_resize):
    from msmedcap.models import build_model

    cfg = tiny_config(**SIZES, model__feature_cache=str(tmp_path / "cache"), data__resize_on_device=device_resize,
                      train=[f"{shard}::1"])
    model = build_model(cfg.model).eval()
    cache = model.feature_cache
    spec = cache.reader_spec()
    (full,) = list(make_eval_loader(cfg, [shard], 0, 1, batch_size=6))
    branches_of = {0: ["clip", "sam"], 1: ["sam"]}  # DOMAIN_INDEX general=0, medical=1 (demo routing)
    fresh = {}
    for b in model.branches:  # each image encoded alone, as the cache computes a miss
        images, sizes = _images(model, full, b)
        fresh[b] = torch.cat([model.encoders[b](images[i:i + 1], sizes[i:i + 1]) for i in range(len(images))])
    # a train batch before anything is stored: every sample decoded, no rows
    decodes = counting_decodes(monkeypatch)
    batch = next(iter(make_train_loader(cfg, stage, 0, 1, feature_stores=spec)))
    assert len(decodes) >= 4 and not any(batch[cached_keys(b)[0]].any() for b in model.branches)
    # fill (stage 1 fills only the routed pairs, as training does), sync: now the workers find them
    for b in model.branches:
        index = torch.tensor([i for i, d in enumerate(full["domain"].tolist()) if stage == 2 or b in _routed(d)])
        model.encode(full, b, index)
    cache.close()
    decodes.clear()
    batch = next(iter(make_train_loader(cfg, stage, 0, 1, feature_stores=spec)))
    assert decodes == []  # every sample a hit for every branch it feeds: nothing decoded
    keys = {k: i for i, k in enumerate(full["image_sha256"])}
    for b in model.branches:
        mask, rows = (batch[k] for k in cached_keys(b))
        needed = [stage == 2 or b in _routed(d) for d in batch["domain"].tolist()]
        assert mask.tolist() == needed
        expect = fresh[b][[keys[k] for k, m in zip(batch["image_sha256"], mask) if m]]
        assert torch.equal(rows, expect)
    # the model uses the rows: no encoder call, the same tokens
    calls = []
    for b in model.branches:
        model.encoders[b].register_forward_pre_hook(lambda *_: calls.append(1))
    if stage == 2:
        for b in model.branches:
            assert torch.equal(model.encode(batch, b), fresh[b][[keys[k] for k in batch["image_sha256"]]])
    else:
        assert torch.isfinite(model.stage1_loss(batch)["loss"])
    assert calls == []


def _routed(domain: int) -> list:
    return ["clip", "sam"] if domain == 0 else ["sam"]


def _images(model, batch, branch):
    from msmedcap.data.transforms import NATIVE_KEY, resize_pending

    key = f"{branch}_image"
    if NATIVE_KEY in batch:
        resize_pending(batch, {key: model.encoders[branch].transform}, "cpu")
    return batch[key], batch[f"{key}_size"]


def _append(directory, rank, keys, value, barrier):
    os.environ["RANK"] = str(rank)
    store = FeatureStore(directory, {"encoder": "x"}, (2, 3), torch.float16, sync_every=2)
    barrier.wait()  # both ranks write at once
    for k in keys:
        store.put([k], torch.full((1, 2, 3), value, dtype=torch.float16))
    store.close()


def test_two_ranks_append_concurrently_each_to_its_own_file(tmp_path):
    FeatureStore(tmp_path, {"encoder": "x"}, (2, 3), torch.float16)  # identity written once
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append, args=(tmp_path, r, [f"r{r}-{i}" for i in range(20)], float(r + 1), barrier))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(p.name for p in tmp_path.glob("index*.tsv")) == ["index-rank0.tsv", "index-rank1.tsv"]
    reader = FeatureStore(tmp_path, None, (2, 3), torch.float16)  # a worker's reader
    for r in range(2):
        hit, rows = reader.get([f"r{r}-{i}" for i in range(20)])
        assert hit.all() and torch.equal(rows, torch.full((20, 2, 3), float(r + 1), dtype=torch.float16))


def test_one_fsync_per_segment_and_index_lines_only_after_it(tmp_path, monkeypatch):
    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real(fd))
    store = FeatureStore(tmp_path, {"encoder": "x"}, (2, 3), torch.float16, sync_every=3)
    other = FeatureStore(tmp_path, None, (2, 3), torch.float16)  # another process's view
    for i in range(7):  # 7 batches of 2 rows: segments end after batches 3 and 6
        store.put([f"k{i}a", f"k{i}b"], torch.full((2, 2, 3), float(i), dtype=torch.float16))
        assert len(fsyncs) == (i + 1) // 3
        assert store.get([f"k{i}a"])[0].all()  # this process serves its own rows at once
        assert other.get([f"k{i}a"])[0].item() == (i < (i + 1) // 3 * 3)  # others see them once synced
    store.close()
    assert len(fsyncs) == 3 and store.fsyncs == 3  # the last, partial segment at close
    assert other.get([f"k{i}b" for i in range(7)])[0].all()


def test_a_store_written_before_issue_21_is_still_read(tmp_path):
    rows = torch.randn(3, 2, 3).half()
    (tmp_path / "identity.json").write_text('{"encoder": "x"}')
    (tmp_path / "features.bin").write_bytes(rows.view(torch.uint8).numpy().tobytes())  # the old layout
    (tmp_path / "index.tsv").write_text("".join(f"{k}\t{i * 12}\n" for i, k in enumerate("abc")) + "d\t3")
    store = FeatureStore(tmp_path, {"encoder": "x"}, (2, 3), torch.float16)
    hit, feats = store.get(["c", "a", "d"])
    assert hit.tolist() == [True, True, False] and torch.equal(feats, rows[[2, 0]])
    store.put(["d"], rows[:1])  # new rows go to this rank's own file; the shared one is never written
    store.close()
    assert (tmp_path / "index.tsv").read_text().endswith("d\t3") and (tmp_path / "index-rank0.tsv").is_file()
    assert FeatureStore(tmp_path, None, (2, 3), torch.float16).get(["d", "b"])[0].all()
    with pytest.raises(ValueError, match="no identity.json"):
        FeatureStore(tmp_path / "nothing", None, (2, 3), torch.float16)
