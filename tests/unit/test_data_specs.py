"""Shard specs ``PATTERN[::WEIGHT[::DOMAIN[::SOURCE]]]`` (issue 13, item 2): parsing, the spec's
domain/source winning over the samples' json, samples without json or domain, extra members, and
the check before work. Tars are written here as other tools write them (raw ``tarfile``: jpg + txt,
with or without json, extra members); img2dataset's own output is tested in test_img2dataset.py."""
from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image

from helpers.data import make_shards, png_bytes, tiny_config
from msmedcap.batch import DOMAIN_INDEX
from msmedcap.config import ConfigError, load_config
from msmedcap.data.shard_spec import ShardSpec, parse_shard_spec, split_weighted_spec
from msmedcap.data.loader import make_eval_loader, parse_specs


def _jpeg(index: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(index))).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def _raw_tar(path, samples: list) -> str:
    """samples: [(key, {ext: bytes})] written member by member, as any tar-writing tool would."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_parse_shard_spec():
    assert parse_shard_spec("a-{0..3}.tar") == ShardSpec("a-{0..3}.tar", 1.0, None, None)
    assert parse_shard_spec("a.tar::2.5") == ShardSpec("a.tar", 2.5, None, None)
    assert parse_shard_spec("a.tar::2::general") == ShardSpec("a.tar", 2.0, "general", None)
    assert parse_shard_spec("a.tar::1::medical::roco") == ShardSpec("a.tar", 1.0, "medical", "roco")
    assert parse_shard_spec("a.tar::::general") == ShardSpec("a.tar", 1.0, "general", None)  # empty weight = 1
    assert parse_shard_spec("a.tar::3::::cc3m") == ShardSpec("a.tar", 3.0, None, "cc3m")  # source only
    assert split_weighted_spec("a.tar::2::general::cc") == ("a.tar", 2.0)  # the older two-field view
    for bad, words in (("a.tar::1::web", "domain 'web'"), ("a.tar::x", "not a number"), ("a.tar::0", "> 0"),
                       ("a.tar::1::general::s::extra", "at most"), ("::1", "no pattern")):
        with pytest.raises(ConfigError, match=words) as e:
            parse_shard_spec(bad)
        assert repr(bad) in str(e.value)
    with pytest.raises(ConfigError, match="domain 'Medical'"):
        load_config("demo", ['data.train=["shards/demo/medical-train-000.tar::1::Medical"]'])


def test_spec_domain_and_source_win_over_the_json(tmp_path):
    pattern = make_shards(tmp_path, "g", 6, shard_size=6, domain="general", source="coco")
    cfg = tiny_config()
    (b,) = make_eval_loader(cfg, [f"{pattern}::1::medical::relabelled"], 0, 1, batch_size=6)
    assert b["domain"].tolist() == [DOMAIN_INDEX["medical"]] * 6 and b["source"] == ["relabelled"] * 6
    (b,) = make_eval_loader(cfg, [f"{pattern}::1::medical"], 0, 1, batch_size=6)
    assert b["domain"].tolist() == [DOMAIN_INDEX["medical"]] * 6 and b["source"] == ["coco"] * 6  # json's source
    (b,) = make_eval_loader(cfg, [pattern], 0, 1, batch_size=6)
    assert b["domain"].tolist() == [DOMAIN_INDEX["general"]] * 6


def test_foreign_tars_no_json_foreign_json_extra_members(tmp_path):
    """jpg + txt only; a json whose 'domain' is a web domain; extra members (exif, npy, parquet-ish)."""
    shard = _raw_tar(tmp_path / "foreign-000.tar", [
        ("000000", {"jpg": _jpeg(0), "txt": b"a dog on a beach"}),
        ("000001", {"jpg": _jpeg(1), "txt": b"a red car", "json": b'{"url": "http://x/1.jpg", "domain": "x.org"}',
                    "exif": b"{}", "npy": b"\x93NUMPY", "cls": b"3"}),
        ("000002", {"webp": _webp(2), "txt": b"a webp image", "json": b'{"status": "success"}'}),
    ])
    cfg = tiny_config()
    (b,) = make_eval_loader(cfg, [f"{shard}::1::general::web"], 0, 1, batch_size=8)
    assert b["key"] == ["000000", "000001", "000002"] and b["skipped"] == {}
    assert b["domain"].tolist() == [0, 0, 0] and b["source"] == ["web"] * 3
    # without a domain in the spec: refused at loader start, naming the spec and the first keys
    with pytest.raises(ConfigError) as e:
        make_eval_loader(cfg, [shard], 0, 1, batch_size=8)
    assert repr(shard) in str(e.value) and "000000: no json member" in str(e.value)
    with pytest.raises(ConfigError, match="data.train"):
        load_config("demo", [f'data.train=["{shard}::2"]'])


def _webp(index: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(index))).save(buf, format="WEBP")
    return buf.getvalue()


def test_a_sample_without_domain_later_in_a_shard_is_counted_as_no_domain(tmp_path):
    shard = _raw_tar(tmp_path / "mixed-000.tar", [
        ("a", {"png": png_bytes(0), "txt": b"x", "json": b'{"domain": "medical", "source": "s"}'}),
        ("b", {"png": png_bytes(1), "txt": b"y", "json": b'{"source": "s"}'}),
        ("c", {"png": png_bytes(2), "txt": b"z", "json": b'{"domain": "medical", "source": "s"}'}),
    ])
    assert len(parse_specs([shard])) == 1  # the first samples have a domain: accepted
    batches = list(make_eval_loader(tiny_config(), [shard], 0, 1, batch_size=8))
    assert [k for b in batches for k in b["key"]] == ["a", "c"]
    assert sum((b["skipped"].get("no_domain", 0) for b in batches)) == 1
