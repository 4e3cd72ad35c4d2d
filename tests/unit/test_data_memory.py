"""The loader's host memory before it starts: a worker's buffer and batches, the node's /dev/shm need
and the refusal when /dev/shm is too small."""
import os

import pytest

from msmedcap.config import ConfigError, load_config
from msmedcap.data import memory
from msmedcap.data.loader import make_train_loader


def test_paper_figures():
    cfg = load_config("paper", ["model.sam.checkpoint=sam_vit_b_01ec64.pth"], check_files=False)
    b = cfg.train.stage1.micro_batch_size
    pixels = 3 * (224 ** 2 + 1024 ** 2)
    assert pixels * b <= memory.batch_bytes(cfg, 1) < (pixels + 8000) * b
    w = memory.worker_memory(cfg, 1, sample_bytes=200_000)
    assert w["shuffle_buffer_samples"] == 1000 and w["buffer_bytes"] == 200_000_000
    assert w["batches_in_flight"] == 3 and w["total_bytes"] == memory.worker_memory_bytes(cfg, 1, 200_000)
    # 8 ranks x 8 workers x 2 prefetched batches of ~165 MB (micro batch 50)
    assert b == 50 and 20e9 < memory.shm_need_bytes(cfg, 1, 8) < 22.5e9
    assert memory.shm_need_bytes(cfg, 1, 8) == 8 * memory.shm_need_bytes(cfg, 1, 1)


def test_sample_size_from_the_manifest():
    cfg = load_config("demo")  # the embedded shards' manifest
    w = memory.worker_memory(cfg, 1)
    assert w["sample_bytes_from"] == "manifest" and 1000 < w["sample_bytes"] < 10_000
    cfg.data.train = ["/nowhere/x-{000..001}.tar"]
    assert memory.worker_memory(cfg, 1)["sample_bytes_from"] == "default"


def test_shm_too_small_is_a_config_error_naming_the_fixes(monkeypatch):
    cfg = load_config("paper", ["data.num_workers=8", "model.sam.checkpoint=sam_vit_b_01ec64.pth"], check_files=False)
    with pytest.raises(ConfigError) as e:
        memory.check_shm(cfg, 1, 8, available=64 * 2**20)  # docker's default --shm-size
    msg = str(e.value)
    for part in ("/dev/shm has 64.0 MiB free", "need up to 19.69 GiB", "8 rank(s)", "data.num_workers=8", "prefetch 2",
                 "--ipc=host", "--shm-size=", "fewer data.num_workers", "train.stage1.micro_batch_size"):
        assert part in msg, (part, msg)
    assert memory.check_shm(cfg, 1, 8, available=64 * 2**30) > 0  # enough: the need, no error
    cfg.data.num_workers = 0
    assert memory.check_shm(cfg, 1, 8, available=1) == 0  # no workers: nothing in shared memory

    # where the train loader is made: os.statvfs says 64 MiB, the launcher says 8 ranks on this node
    class Small:
        f_bavail, f_frsize = 64 * 2**20 // 4096, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Small())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    cfg = load_config("demo", ["model.clip.image_size=224", "model.sam.image_size=1024", "data.num_workers=2"])
    with pytest.raises(ConfigError, match=r"/dev/shm has 64.0 MiB free .* 8 rank\(s\)"):
        make_train_loader(cfg, 1, 0, 8)


def test_ranks_per_node(monkeypatch):
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert memory.ranks_per_node(4) == 4
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert memory.ranks_per_node(16) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory.ranks_per_node(16) == 2
