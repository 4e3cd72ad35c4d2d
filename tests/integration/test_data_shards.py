"""Shard writer, manifest, inspect, the demo generator and `msmedcap shards write --from ...` on tiny
fixtures made here."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.data import make_shards, png_bytes
from msmedcap.cli import main
from msmedcap.demo import world as demo
from msmedcap.data.shards import inspect_shards, read_manifest, sha256_file, write_shards

REPO = Path(__file__).resolve().parents[2]


def test_writer_manifest_and_inspect(tmp_path, capsys):
    pattern = make_shards(tmp_path, "w", 25, shard_size=10, domain="medical", source="roco")
    manifest = read_manifest(tmp_path)["shards"]
    assert sorted(manifest) == ["w-000.tar", "w-001.tar", "w-002.tar"]
    assert [manifest[n]["samples"] for n in sorted(manifest)] == [10, 10, 5]
    assert manifest["w-002.tar"]["domains"] == {"medical": 5} and manifest["w-002.tar"]["sources"] == {"roco": 5}
    assert manifest["w-001.tar"]["sha256"] == sha256_file(tmp_path / "w-001.tar")
    with tarfile.open(tmp_path / "w-000.tar") as tar:  # only our three members per sample, nothing pickled
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"png", "txt", "json"}

    report = inspect_shards([pattern])
    assert report["samples"] == 25 and report["domains"] == {"medical": 25} and not report["problems"]
    assert main(["shards", "inspect", pattern]) == 0
    assert "25 samples" in capsys.readouterr().out
    data = bytearray((tmp_path / "w-001.tar").read_bytes())
    data[600] ^= 1  # one flipped bit in a member: the checksum catches it
    (tmp_path / "w-001.tar").write_bytes(bytes(data))
    assert any("w-001.tar" in p for p in inspect_shards([pattern])["problems"])
    assert main(["shards", "inspect", pattern]) == 1

    with pytest.raises(ValueError, match="needs domain"):
        write_shards([{"__key__": "k", "png": png_bytes(0), "txt": "c", "json": {"domain": "x", "source": "s"}}],
                     tmp_path, "bad")


def test_demo_generator_reproduces_the_committed_set(tmp_path):
    committed = read_manifest(REPO / "shards" / "demo")["shards"]
    total = sum(committed[f"{d}-train-{i:03d}.tar"]["samples"] for d in ("general", "medical") for i in range(4))
    assert total == 2 * demo.TRAIN_PER_DOMAIN
    for name, entry in committed.items():  # the files are what the manifest says
        assert sha256_file(REPO / "shards" / "demo" / name) == entry["sha256"], name
    for domain in ("general", "medical"):  # regenerate the eval shards: byte-identical
        samples = (demo.demo_sample(0, "eval", domain, i) for i in range(demo.EVAL_PER_DOMAIN))
        (name,) = write_shards(samples, tmp_path, f"{domain}-eval", shard_size=1000, mtime=demo.TAR_MTIME)
        assert sha256_file(tmp_path / name) == committed[name]["sha256"]
    # the CLI: a small seeded set plus tokenizers retrained on its captions
    out = tmp_path / "cli"
    assert main(["demo", "shards", "--out", str(out), "--train", "8", "--eval", "2", "--tokenizers",
                 str(out / "tok")]) == 0
    manifest = read_manifest(out)["shards"]
    assert manifest["medical-train-003.tar"]["samples"] == 2 and manifest["general-eval-000.tar"]["samples"] == 2
    from msmedcap.tokenization import load_lm_tokenizer, load_qformer_tokenizer

    caption = demo.demo_sample(0, "train", "medical", 3)["txt"]
    assert "[UNK]" not in load_qformer_tokenizer(str(out / "tok" / "qformer")).tokenize(caption)
    assert load_lm_tokenizer(str(out / "tok" / "lm")).decode(
        load_lm_tokenizer(str(out / "tok" / "lm"))(caption, add_special_tokens=False).input_ids) == caption
    # captions say what a low-resolution encoder cannot see, for medical samples
    captions = [demo.demo_sample(0, "train", "medical", i)["txt"] for i in range(40)]
    assert any("small" in c and "irregular margins" in c for c in captions)
    assert any("with no focal lesion" in c for c in captions)


def _jpeg(path: Path, colour=(200, 10, 10), size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


def _written(out: Path) -> list:
    samples = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".json"):
                key = name[:-5]
                samples.append((key, json.loads(members[name]), members[key + ".txt"].decode(),
                                next(e for e in ("jpg", "png") if f"{key}.{e}" in members)))
    return samples


def test_write_from_jsonl_folder_and_coco(tmp_path, capsys):
    src = tmp_path / "src"
    _jpeg(src / "a.jpg")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(src / "b.bmp")  # not jpg/png: converted to png
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (src / "list.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.jpg", "caption": "red box", "id": "r1", "extra": 3},
        {"image": "b.bmp", "caption": "blue box"},
        {"image": "missing.jpg", "caption": "gone"},
        {"image": "broken.jpg", "caption": "broken"},
        {"image": "a.jpg", "caption": ""}]) + "\n")
    out = tmp_path / "jsonl"
    assert main(["shards", "write", "--from", "jsonl", str(src / "list.jsonl"), "--out", str(out),
                 "--domain", "general", "--source", "mine", "--shard-size", "1"]) == 0
    text = capsys.readouterr()
    assert "wrote 2 samples to 2 shard(s)" in text.out
    assert "'missing_image': 1" in text.out and "'bad_image': 1" in text.out and "'missing_caption': 1" in text.out
    assert "missing.jpg" in text.err  # reported by path
    (k1, m1, c1, e1), (k2, m2, c2, e2) = _written(out)
    assert (k1, c1, e1, m1["extra"], m1["source"], m1["domain"]) == ("mine-r1", "red box", "jpg", 3, "mine", "general")
    assert (c2, e2) == ("blue box", "png")

    folder = tmp_path / "folder"
    _jpeg(folder / "x" / "one.jpg")
    (folder / "x" / "one.txt").write_text("first image\n")
    _jpeg(folder / "two.jpg")  # no caption file: skipped, counted
    assert main(["shards", "write", "--from", "folder", str(folder), "--out", str(tmp_path / "f"),
                 "--domain", "general"]) == 0
    assert [(k, c) for k, _, c, _ in _written(tmp_path / "f")] == [("folder-x_one", "first image")]

    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "nope.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "cap one"},
                            {"id": 11, "image_id": 1, "caption": "cap two"},
                            {"id": 12, "image_id": 2, "caption": "lost"}]}
    (src / "captions.json").write_text(json.dumps(coco))
    for per, expected in (("caption", ["cap one", "cap two"]), ("image", ["cap one"])):
        out = tmp_path / f"coco-{per}"
        assert main(["shards", "write", "--from", "coco", str(src / "captions.json"), "--images", str(src),
                     "--out", str(out), "--domain", "general", "--coco-per", per]) == 0
        got = _written(out)
        assert [c for _, _, c, _ in got] == expected
    assert got[0][1]["captions"] == ["cap one", "cap two"]


def test_write_from_roco_medicat_and_dicom(tmp_path, capsys):
    roco = tmp_path / "roco"
    _jpeg(roco / "images" / "ROCO_00001.jpg")
    Image.new("L", (12, 12), 90).save(roco / "images" / "ROCO_00002.png")
    (roco / "captions.txt").write_text("ROCO_00001\t CT of the chest.\nROCO_00002\t MRI knee.\nROCO_00003\t absent\n")
    assert main(["shards", "write", "--from", "roco", str(roco / "captions.txt"), "--out", str(tmp_path / "r"),
                 "--domain", "medical"]) == 0
    got = _written(tmp_path / "r")
    assert [(k, c, e) for k, _, c, e in got] == [("roco-ROCO_00001", "CT of the chest.", "jpg"),
                                                 ("roco-ROCO_00002", "MRI knee.", "png")]
    assert got[0][1] == {"domain": "medical", "source": "roco", "id": "ROCO_00001"}
    assert "'missing_image': 1" in capsys.readouterr().out

    med = tmp_path / "medicat"  # the release's layout: figures/{pdf_hash}_{fig_uri} (test_data_real_layouts.py)
    _jpeg(med / "figures" / "abc_2-Figure1-1.jpg")
    (med / "s2.jsonl").write_text(json.dumps({"pdf_hash": "abc", "fig_uri": "2-Figure1-1.jpg", "s2_caption": "Figure 1."})
                                  + "\n")
    assert main(["shards", "write", "--from", "medicat", str(med / "s2.jsonl"), "--out", str(tmp_path / "m"),
                 "--domain", "medical"]) == 0
    ((key, meta, caption, _),) = _written(tmp_path / "m")
    assert (key, caption, meta["pdf_hash"]) == ("medicat-abc-2-Figure1-1", "Figure 1.", "abc")

    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = tmp_path / "dcm"
    folder.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 4, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft-tissue window in HU
    raw = np.array([[0, 800, 1064, 1224], [1300, 2000, 3000, 4000]] * 2, dtype=np.int16)  # HU = raw - 1024
    ds.PixelData = raw.tobytes()
    ds.save_as(folder / "scan.dcm", enforce_file_format=True)
    (folder / "scan.txt").write_text("axial ct")
    assert main(["shards", "write", "--from", "folder", str(folder), "--out", str(tmp_path / "d"),
                 "--domain", "medical"]) == 0
    with tarfile.open(tmp_path / "d" / "folder-000.tar") as tar:
        png = tar.extractfile("folder-scan.png").read()
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 4)
    # HU -1024 and -224 are below the window (-160..240): black; 40 HU mid grey; >= 240 HU white
    assert pixels[0, 0] == 0 and pixels[0, 1] == 0 and 100 < pixels[0, 2] < 160 and (pixels[1] == 255).all()
