"""The streaming loader on real webdataset tars written here: identity, mixture, resumption, eval
coverage, corrupt data, per-variant images."""
from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.data import make_shards, png_bytes, sample, tiny_config
from msmedcap.batch import CLIP_MEAN, CLIP_STD, DOMAIN_INDEX, SAM_MEAN, SAM_STD
from msmedcap.data import loader as loader_mod
from msmedcap.data.loader import EvalStream, make_eval_loader, make_train_loader
from msmedcap.data.shards import write_shards
from msmedcap.data.transforms import ClipTransform, SamTransform
from msmedcap.models.encoders import encoder_input
from msmedcap.tokenization import load_lm_tokenizer, load_qformer_tokenizer


def keys(batches) -> list:
    return [k for b in batches for k in b["key"]]


def test_round_trip_exact_identity(tmp_path):
    pattern = make_shards(tmp_path, "rt", 23, shard_size=10, domain="medical", source="roco")
    cfg = tiny_config(eval=[pattern])
    batches = list(make_eval_loader(cfg, cfg.data.eval, rank=0, world_size=1, batch_size=5))
    assert [len(b["key"]) for b in batches] == [5, 5, 5, 5, 3]
    assert keys(batches) == [f"rt-{i:05d}" for i in range(23)]  # in order, each once
    clip, sam = ClipTransform(16), SamTransform(24)
    qtok, ltok = load_qformer_tokenizer(cfg.model.qformer.tokenizer), load_lm_tokenizer(cfg.model.lm.tokenizer)
    i = 0
    for b in batches:
        assert b["source"] == ["roco"] * len(b["key"]) and b["skipped"] == {}
        assert b["domain"].tolist() == [DOMAIN_INDEX["medical"]] * len(b["key"])
        for j, key in enumerate(b["key"]):
            original = Image.open(io.BytesIO(png_bytes(i))).convert("RGB")
            assert b["caption"][j] == f"caption number {i} of {key}"
            # uint8 across the worker boundary; the encoders' input path gives today's float tensors exactly
            assert b["clip_image"].dtype == torch.uint8 and b["clip_image"].shape[1:] == (16, 16, 3)
            assert torch.equal(encoder_input(b["clip_image"], CLIP_MEAN, CLIP_STD, torch.float32, 0,
                                             b["clip_image_size"])[j], clip(original))
            assert torch.equal(encoder_input(b["sam_image"], SAM_MEAN, SAM_STD, torch.float32, 24,
                                             b["sam_image_size"])[j], sam(original))
            # padded to the batch's longest caption (at most max_text_len)
            longest = max(len(qtok(c, truncation=True, max_length=cfg.model.qformer.max_text_len).input_ids)
                          for c in b["caption"])
            ids = qtok(b["caption"][j], padding="max_length", max_length=longest).input_ids
            assert b["text_input_ids"][j].tolist() == ids
            lm = ltok(b["caption"][j] + "\n", add_special_tokens=False).input_ids
            n = int(b["lm_attention_mask"][j].sum())
            assert b["lm_input_ids"][j, :n].tolist() == lm[: cfg.model.lm.max_caption_len]
            i += 1


def test_encoder_transforms_and_variants(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    clip = ClipTransform(16)(img)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert clip.shape == (3, 16, 16) and torch.allclose(clip[:, 8, 8], expected, atol=1e-2)
    sam = SamTransform(24)(img)  # 40x20 -> 24x12, zero-padded below
    assert sam.shape == (3, 24, 24) and (sam[:, 12:, :] == 0).all() and (sam[:, :12, :] != 0).all()
    # the same numbers as open_clip's eval transform and segment-anything's resize + Sam.preprocess
    from open_clip.transform import image_transform
    from segment_anything.utils.transforms import ResizeLongestSide

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (53, 71, 3), dtype=np.uint8))
    for size in (16, 224):
        reference = image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(noise)
        assert torch.allclose(ClipTransform(size)(noise), reference, atol=1e-5)
        resized = torch.from_numpy(ResizeLongestSide(size).apply_image(np.asarray(noise))).permute(2, 0, 1).float()
        mean, std = torch.tensor(SAM_MEAN).view(3, 1, 1) * 255, torch.tensor(SAM_STD).view(3, 1, 1) * 255
        reference = torch.nn.functional.pad((resized - mean) / std, (0, 0, 0, size - resized.shape[1]))
        assert torch.allclose(SamTransform(size)(noise), reference, atol=1e-5)

    pattern = make_shards(tmp_path, "v", 4, shard_size=4)
    for variant, present, absent in (("blip2", "clip_image", "sam_image"), ("sam-blip2", "sam_image", "clip_image")):
        cfg = tiny_config(eval=[pattern], model__variant=variant)
        (batch,) = list(make_eval_loader(cfg, cfg.data.eval, 0, 1, batch_size=4))
        assert present in batch and absent not in batch


def test_weighted_mix_within_a_few_percent(tmp_path):
    a = make_shards(tmp_path, "gen", 60, shard_size=20)
    b = make_shards(tmp_path, "med", 40, shard_size=20, domain="medical")
    cfg = tiny_config(train=[f"{a}::1", f"{b}::3"], train__stage1__micro_batch_size=50, data__segment_batches=20,
                      data__shuffle_buffer=50, model__variant="blip2")
    batches = list(itertools.islice(make_train_loader(cfg, stage=1, rank=0, world_size=1), 40))
    domains = torch.cat([b["domain"] for b in batches])
    assert len(domains) == 2000
    assert abs(domains.float().mean().item() - 0.75) < 0.03
    assert {len(b["key"]) for b in batches} == {50}
    assert len(set(keys(batches))) == 100  # both sources' shards all visited


def test_resumption_gives_identical_batches_with_workers(tmp_path):
    a = make_shards(tmp_path, "gen", 30, shard_size=6)
    b = make_shards(tmp_path, "med", 30, shard_size=6, domain="medical")
    cfg = tiny_config(train=[f"{a}::1", f"{b}::1"], data__num_workers=2, data__segment_batches=3)
    full = list(itertools.islice(make_train_loader(cfg, 2, rank=0, world_size=2), 11))
    resumed = list(itertools.islice(make_train_loader(cfg, 2, rank=0, world_size=2, start_step=7), 4))
    assert [b["key"] for b in resumed] == [b["key"] for b in full[7:]]
    assert all(torch.equal(x["sam_image"], y["sam_image"]) for x, y in zip(resumed, full[7:]))
    other_rank = list(itertools.islice(make_train_loader(cfg, 2, rank=1, world_size=2), 3))
    assert [b["key"] for b in other_rank] != [b["key"] for b in full[:3]]
    # without workers the stream is its own (W=1) but just as reproducible
    cfg.data.num_workers = 0
    one = list(itertools.islice(make_train_loader(cfg, 1, 0, 1), 6))
    again = list(itertools.islice(make_train_loader(cfg, 1, 0, 1, start_step=4), 2))
    assert [b["key"] for b in again] == [b["key"] for b in one[4:]]


def _corrupt_shards(tmp_path) -> list:
    """One shard with a good sample plus one of each bad kind; an empty and a truncated tar."""
    good = [sample(f"ok-{i}", i) for i in range(3)]
    truncated = sample("trunc-img", 10)
    truncated["png"] = truncated["png"][:60]
    no_caption = sample("no-caption", 11)
    no_caption["txt"] = " "  # the writer refuses an empty caption; write the member raw below
    names = write_shards(good, tmp_path, "good", shard_size=10)
    path = tmp_path / "bad-000.tar"
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("trunc-img.json", b'{"domain": "general", "source": "x"}')
        add("trunc-img.png", truncated["png"])
        add("trunc-img.txt", b"a caption")
        add("no-caption.json", b'{"domain": "general", "source": "x"}')
        add("no-caption.png", png_bytes(11))
        add("bad-json.json", b'{"domain": "general", ')
        add("bad-json.png", png_bytes(12))
        add("bad-json.txt", b"a caption")
        add("huge.json", b'{"domain": "medical", "source": "x"}')
        add("huge.png", png_bytes(13, size=(80, 80)))
        add("huge.txt", b"a caption")
        add("late-ok.json", b'{"domain": "medical", "source": "x"}')
        add("late-ok.png", png_bytes(14))
        add("late-ok.txt", b"a good caption")
    (tmp_path / "empty-000.tar").write_bytes(b"")
    whole = (tmp_path / names[0]).read_bytes()
    (tmp_path / "cut-000.tar").write_bytes(whole[: len(whole) // 2 + 100])
    return [str(tmp_path / n) for n in ("good-000.tar", "bad-000.tar", "empty-000.tar", "cut-000.tar")]


def _skipped(batches) -> dict:
    total = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def test_corrupt_data_is_skipped_and_counted(tmp_path):
    good, bad, empty, cut = _corrupt_shards(tmp_path)
    cfg = tiny_config(data__max_image_pixels=1000)
    batches = list(make_eval_loader(cfg, [good, bad], 0, 1, batch_size=2))
    assert keys(batches) == ["ok-0", "ok-1", "ok-2", "late-ok"]
    assert _skipped(batches) == {"bad_image": 1, "missing_caption": 1, "bad_json": 1, "too_large": 1}
    batches = list(make_eval_loader(cfg, [good, empty, cut], 0, 1, batch_size=2))
    got = keys(batches)
    assert got[:3] == ["ok-0", "ok-1", "ok-2"] and 3 < len(got) < 6 and set(got[3:]) <= {"ok-0", "ok-1"}
    counts = _skipped(batches)
    assert counts.pop("bad_tar") >= 2  # the empty tar and the truncated one
    assert sum(counts.values()) <= 1  # at most the sample cut in half
    batches = list(make_eval_loader(cfg, [empty], 0, 1, batch_size=2))  # nothing to yield, nothing to count
    assert batches == []
    batches = list(make_eval_loader(cfg, [empty], 0, 1, batch_size=2, count_batches=True))  # the evaluation's
    assert [b["key"] for b in batches] == [[]] and _skipped(batches) == {"bad_tar": 1}
    # the train stream goes on past the same data and hands the counts on in `skipped`
    cfg.data.train = [str(tmp_path / "{bad,empty}-000.tar")]
    batches = list(itertools.islice(make_train_loader(cfg, 1, 0, 1), 3))
    assert all(b["key"] == ["late-ok"] * 4 for b in batches)
    assert {"bad_image", "missing_caption", "bad_json", "too_large", "bad_tar"} <= set(_skipped(batches))


def test_unreadable_source_fails_loudly_not_forever(tmp_path, monkeypatch):
    (tmp_path / "e-000.tar").write_bytes(b"")
    cfg = tiny_config(train=[str(tmp_path / "e-000.tar")])
    with pytest.raises(RuntimeError, match="shards in a row gave no sample"):
        next(iter(make_train_loader(cfg, 1, 0, 1)))
    pattern = make_shards(tmp_path, "ok", 5, shard_size=5)
    cfg = tiny_config(train=[pattern], data__max_image_pixels=1)  # every image is "too large"
    monkeypatch.setattr(loader_mod, "MAX_UNUSABLE_IN_A_ROW", 50)
    with pytest.raises(RuntimeError, match="50 samples in a row were unusable"):
        next(iter(make_train_loader(cfg, 1, 0, 1)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_covers_every_sample_exactly_once(tmp_path, monkeypatch, world_size):
    # 3 shards (fewer than 4 ranks x 2 workers), uneven sizes, one corrupt sample
    pattern = make_shards(tmp_path, "ev", 17, shard_size=7)
    bad = sample("ev-bad", 99)
    bad["json"] = {"domain": "general", "source": "s"}
    write_shards([sample(f"ev-x{i}", 50 + i) for i in range(2)] + [bad], tmp_path, "ex", shard_size=5)
    (tmp_path / "ex-000.tar").write_bytes((tmp_path / "ex-000.tar").read_bytes().replace(b'"domain": "general", "source": "s"', b'"domain": "nowhere", "source": "s"'))
    specs = [pattern, str(tmp_path / "ex-000.tar")]
    cfg = tiny_config(eval=specs, model__variant="blip2")
    expected = sorted([f"ev-{i:05d}" for i in range(17)] + ["ev-x0", "ev-x1"])
    for workers in (1, 2, 3):
        seen, skipped = [], 0
        for rank in range(world_size):
            for worker in range(workers):  # each (rank, worker) slot as the DataLoader worker would see it
                monkeypatch.setattr(loader_mod, "_worker", lambda w=worker, n=workers: (w, n))
                for b in EvalStream(cfg, specs, rank, world_size, batch_size=3, count_batches=True):
                    seen += b["key"]
                    skipped += sum(b["skipped"].values())
        assert sorted(seen) == expected, (world_size, workers)
        assert skipped == 1
    monkeypatch.undo()
    if world_size == 4:  # and once through real DataLoader worker processes
        cfg.data.num_workers = 2
        seen = [k for rank in range(4) for k in keys(make_eval_loader(cfg, specs, rank, 4, batch_size=2))]
        assert sorted(seen) == expected


def _count_opens(monkeypatch, root, log):
    """Record every open of a tar under ``root`` as "pid path" lines in ``log`` (DataLoader workers are
    forked from this process and inherit the patch; os-level appends, so their lines do not mix)."""
    import builtins
    import os

    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str) and file.startswith(str(root)) and file.endswith(".tar"):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"{os.getpid()} {file}\n".encode())
            os.close(fd)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)


@pytest.mark.parametrize("n_shards", [5, 3])
def test_eval_opens_each_shard_once_over_2_ranks_x_2_workers(tmp_path, monkeypatch, n_shards):
    import collections
    import os

    sizes = [4, 1, 6, 3, 5][:n_shards]
    data = tmp_path / "data"
    start, urls = 0, []  # uneven shards, one spec each
    for s, n in enumerate(sizes):
        write_shards((sample(f"op-{i:05d}", i) for i in range(start, start + n)), data, f"op{s}", shard_size=100)
        urls.append(str(data / f"op{s}-000.tar"))
        start += n
    cfg = tiny_config(eval=urls, data__num_workers=2, model__variant="blip2")
    log = tmp_path / "opens.log"
    _count_opens(monkeypatch, data, str(log))
    seen = [k for rank in range(2) for k in keys(make_eval_loader(cfg, urls, rank, 2, batch_size=2))]
    assert sorted(seen) == [f"op-{i:05d}" for i in range(sum(sizes))]  # every sample once
    lines = [line.split(" ", 1) for line in log.read_text().splitlines()]
    workers = collections.Counter(path for pid, path in lines if int(pid) != os.getpid())
    # the domain probe (loader start, this process): the first shard of each spec, once per rank
    probes = collections.Counter(path for pid, path in lines if int(pid) == os.getpid())
    assert probes == {u: 2 for u in urls}
    if n_shards >= 4:  # at least one shard per (rank, worker) slot: each shard opened once in all
        assert workers == {u: 1 for u in urls}
    else:  # 3 shards, 4 slots: shard 0 split between two slots
        assert workers == {urls[0]: 2, urls[1]: 1, urls[2]: 1}


def test_a_segment_reads_only_the_samples_its_batches_need(tmp_path, monkeypatch):
    # segment: 4 batches of 4 = 16 samples; buffer 20, first yield at 5. The old refill (a full buffer
    # before the first batch, dropped at the segment's end) read 20 + 16 = 36 samples per segment.
    pattern = make_shards(tmp_path, "seg", 30, shard_size=10)
    cfg = tiny_config(train=[pattern], data__shuffle_buffer=20, data__shuffle_initial=5)
    reads = []
    real_mix = loader_mod._weighted_mix

    def counted(*args):
        for sample in real_mix(*args):
            reads.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(loader_mod, "_weighted_mix", counted)
    got = keys(itertools.islice(make_train_loader(cfg, 1, 0, 1), 8))  # two segments
    assert len(reads) == 32 and sorted(got) == sorted(reads)  # every sample read is trained on, none dropped
