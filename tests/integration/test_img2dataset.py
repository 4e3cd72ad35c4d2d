"""Shards written by img2dataset itself train and evaluate as they are (issue 13, item 2).

img2dataset (PyPI, 1.47; github.com/rom1504/img2dataset) downloads URLs into WebDataset tars:
``OUT/00000.tar`` with ``KEY.jpg``, ``KEY.txt`` (caption) and ``KEY.json`` (``url``, ``caption``,
``key``, ``status``, ``error_message``, ``width``, ``height``, ``original_width``, ``original_height``,
``exif``, ``sha256``) and no ``domain``/``source``; ``00000.parquet`` and ``00000_stats.json`` next to
them; failed downloads are left out of the tar. It pins ``webdataset<0.3``, so it runs from a venv of
its own (tests/helpers/img2dataset_venv.py; .ci/run creates it) and downloads from a ``python -m http.server``
on 127.0.0.1 serving images made here. Skipped, with the reason, when that venv cannot be made.
"""
from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from helpers.data import make_shards, tiny_config
from helpers.img2dataset_venv import img2dataset_command
from msmedcap.batch import DOMAIN_INDEX
from msmedcap.config import ConfigError, load_config
from msmedcap.data.loader import make_eval_loader, make_train_loader
from msmedcap.data.shards import inspect_shards

pytestmark = pytest.mark.slow

N_IMAGES = 12  # + one URL that 404s


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory):
    try:
        exe = img2dataset_command()
    except RuntimeError as e:
        pytest.skip(f"img2dataset venv unavailable: {e}")
    root = tmp_path_factory.mktemp("img2dataset")
    images = root / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        Image.new("RGB", (40 + 4 * i, 30), (20 * i, 200 - 10 * i, 90)).save(images / f"photo{i}.jpg", quality=90)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(images)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it answers
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/photo0.jpg", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        rows = ["url\tcaption"] + [f"http://127.0.0.1:{port}/photo{i}.jpg\ta photo of scene number {i}"
                                   for i in range(N_IMAGES)]
        rows.insert(5, f"http://127.0.0.1:{port}/missing.jpg\ta photo that is not there")
        (root / "rows.tsv").write_text("\n".join(rows) + "\n")
        out = root / "out"
        proc = subprocess.run(
            [str(exe), "--url_list", str(root / "rows.tsv"), "--input_format", "tsv", "--url_col", "url",
             "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
             "--image_size", "32", "--resize_mode", "keep_ratio", "--processes_count", "1", "--thread_count", "4",
             "--number_sample_per_shard", "8", "--enable_wandb", "False"],
            capture_output=True, text=True, timeout=180, cwd=root)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=10)
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"], sorted(p.name for p in out.iterdir())
    return {"dir": out, "pattern": f"{out}/{{00000..00001}}.tar"}


def _members(tar_path: Path) -> dict:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_img2dataset_output_is_what_we_expect(img2dataset_shards):
    """The layout the rest of this file relies on, as img2dataset 1.47 writes it."""
    members = {}
    for p in sorted(img2dataset_shards["dir"].glob("*.tar")):
        members.update(_members(p))
    keys = sorted({n.split(".")[0] for n in members})
    assert len(keys) == N_IMAGES  # the 404 is left out of the tar
    assert all(k.isdigit() for k in keys)  # shard number + sample number, zero-padded
    meta = json.loads(members[f"{keys[0]}.json"])
    assert {"url", "caption", "key", "status", "width", "height", "sha256"} <= set(meta)
    assert meta["status"] == "success" and "domain" not in meta and "source" not in meta
    assert (img2dataset_shards["dir"] / "00000.parquet").is_file()


def test_a_spec_without_domain_fails_before_work_naming_it(img2dataset_shards, tmp_path):
    spec = f"{img2dataset_shards['pattern']}::1"
    medical = make_shards(tmp_path, "med", 8, shard_size=8, domain="medical")
    for section, value in (("data.train", f'["{spec}", "{medical}::1"]'), ("data.eval", f'["{spec}"]')):
        with pytest.raises(ConfigError) as e:
            load_config("demo", [f"{section}={value}"])
        msg = str(e.value)
        assert section in msg and repr(spec) in msg and "no domain" in msg and "::1::general" in msg
    # loader start, for configs built without the file checks
    cfg = tiny_config(train=[spec, f"{medical}::1"])
    with pytest.raises(ConfigError, match="no domain"):
        make_train_loader(cfg, 1, 0, 1)
    with pytest.raises(ConfigError, match="no domain"):
        make_eval_loader(cfg, [spec], 0, 1, batch_size=4)


def test_img2dataset_shards_train_as_general_half_of_the_mix(img2dataset_shards, tmp_path):
    general = f"{img2dataset_shards['pattern']}::1::general::cc-local"
    medical = make_shards(tmp_path, "med", 16, shard_size=8, domain="medical", source="roco")
    cfg = load_config("demo", [f'data.train=["{general}", "{medical}::1"]', "model.clip.image_size=16",
                               "model.sam.image_size=24", "data.num_workers=0", "data.shuffle_buffer=8",
                               "train.stage1.micro_batch_size=8"])
    batches = list(itertools.islice(make_train_loader(cfg, 1, 0, 1), 8))
    domains = [d for b in batches for d in b["domain"].tolist()]
    sources = [s for b in batches for s in b["source"]]
    assert all(b["skipped"] == {} for b in batches)  # jpg/txt/json with url, status, exif...: nothing bad
    assert 0.3 < domains.count(DOMAIN_INDEX["general"]) / len(domains) < 0.7
    assert {s for s, d in zip(sources, domains) if d == DOMAIN_INDEX["general"]} == {"cc-local"}
    assert {s for s, d in zip(sources, domains) if d == DOMAIN_INDEX["medical"]} == {"roco"}
    captions = {c for b in batches for c, d in zip(b["caption"], b["domain"].tolist()) if d == 0}
    assert captions <= {f"a photo of scene number {i}" for i in range(N_IMAGES)}


def test_img2dataset_shards_evaluate_every_sample_once(img2dataset_shards):
    spec = f"{img2dataset_shards['pattern']}::1::general"
    cfg = tiny_config(eval=[spec])
    seen = []
    for rank in range(2):
        for b in make_eval_loader(cfg, cfg.data.eval, rank, 2, batch_size=5):
            assert b["skipped"] == {} and set(b["domain"].tolist()) == {DOMAIN_INDEX["general"]}
            assert set(b["source"]) == {"unknown"}  # no SOURCE in the spec, none in img2dataset's json
            seen += list(zip(b["key"], b["caption"]))
    assert len(seen) == len(set(seen)) == N_IMAGES
    assert sorted(c for _, c in seen) == sorted(f"a photo of scene number {i}" for i in range(N_IMAGES))
    report = inspect_shards([f"{img2dataset_shards['pattern']}::1::general::cc-local"])
    assert report["samples"] == N_IMAGES and report["domains"] == {"general": N_IMAGES}
    assert report["sources"] == {"cc-local": N_IMAGES} and report["skipped"] == {}
