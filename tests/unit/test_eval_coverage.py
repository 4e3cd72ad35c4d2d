"""Exact-once evaluation coverage: 1-4 real gloo ranks x 1-5 shards (and loader workers), every
sample gathered on rank 0 exactly once. One torch.multiprocessing start of 4 processes (forked, so
they share the parent's imports instead of paying seconds each); world sizes 2 and 3 run on process
subgroups of it (the same gather path as a smaller world)."""
import datetime
import io
import json
import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from msmedcap.eval.gather import CoverageError, gather_records

# Shards per layout and samples per shard; uneven on purpose (a 1-sample shard, more ranks than shards).
LAYOUTS = [[5], [4, 1], [3, 6, 2], [1, 2, 7, 3], [2, 2, 1, 4, 3]]
WORKERS = {0: 0, 1: 2, 2: 0, 3: 2, 4: 1}  # loader workers per layout (each rank)


def write_shards(root, layouts):
    import webdataset as wds
    from PIL import Image

    specs = []
    for li, sizes in enumerate(layouts):
        paths = []
        for si, n in enumerate(sizes):
            path = os.path.join(root, f"layout{li}-{si:03d}.tar")
            with wds.TarWriter(path) as sink:
                for j in range(n):
                    buf = io.BytesIO()
                    Image.new("RGB", (16, 16), (10 * j, 20 * si, 30)).save(buf, format="PNG")
                    domain = "medical" if j % 2 else "general"
                    sink.write({"__key__": f"l{li}s{si}n{j}", "png": buf.getvalue(), "txt": f"caption {j}",
                                "json": {"domain": domain, "source": f"src{si}"}})
            paths.append(path)
        specs.append(paths)
    return specs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, specs, out_file):
    import torch

    from msmedcap.config import load_config
    from msmedcap.data.loader import make_eval_loader

    torch.set_num_threads(1)  # forked: stay off the parent's OpenMP pool; 4 ranks share 2 cores anyway
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    groups = {2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2]), 4: None}  # all ranks create all
    results = []
    for ws in (1, 2, 3, 4):
        for li, layout in enumerate(specs):
            if rank >= ws:
                continue
            cfg = load_config("demo", [f"data.num_workers={WORKERS[li]}"], check_files=False)
            keys = [k for b in make_eval_loader(cfg, layout, rank, ws, 3) for k in b["key"]]
            parts = gather_records([{"key": k} for k in keys], rank, ws, group=groups.get(ws))
            if rank == 0:
                results.append({"world_size": ws, "layout": li, "parts": [[r["key"] for r in p] for p in parts]})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def test_every_sample_exactly_once_over_ranks_shards_workers(tmp_path):
    from msmedcap.config import load_config
    from msmedcap.data.loader import SampleProcessor

    SampleProcessor(load_config("demo", check_files=False))  # import open_clip, SAM, tokenizers once, here
    specs = write_shards(str(tmp_path), LAYOUTS)
    out = tmp_path / "results.json"
    mp.start_processes(_rank_main, args=(4, _free_port(), specs, str(out)), nprocs=4, join=True,
                       start_method="fork")
    results = json.loads(out.read_text())
    assert len(results) == 4 * len(LAYOUTS)
    for r in results:
        sizes = LAYOUTS[r["layout"]]
        expected = sorted(f"l{r['layout']}s{si}n{j}" for si, n in enumerate(sizes) for j in range(n))
        got = [k for part in r["parts"] for k in part]
        assert sorted(got) == expected, r  # none lost, none twice
        assert len(r["parts"]) == r["world_size"]
        if len(sizes) >= r["world_size"]:  # enough shards: every rank got work
            assert all(r["parts"]), r


def test_duplicates_and_losses_are_errors():
    with pytest.raises(CoverageError, match="more than once.*'b'"):
        gather_records([{"key": "a"}, {"key": "b"}, {"key": "b"}])
    with pytest.raises(CoverageError, match="2 samples evaluated but 3 expected"):
        gather_records([{"key": "a"}, {"key": "b"}], expected=3)
    with pytest.raises(RuntimeError, match="not initialised"):
        gather_records([], rank=0, world_size=2)
