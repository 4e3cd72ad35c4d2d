"""`msmedcap shards write` on files laid out as the datasets ship them (issue 13, item 1).

Each fixture follows its dataset's public release; the captions and pixels are made up here, the
layout, file names and field names are the release's:

- MedICaT: README of github.com/allenai/medicat and its ``sample/`` folder (``sample/sample.jsonl``,
  ``sample/figures/{pdf_hash}_{fig_uri}``, e.g. ``57c9ad0f4aab133f96d40992c46926fabc901ffa_2-Figure1-1.png``
  for ``"fig_uri": "2-Figure1-1.png"``; rows carry pdf_hash, fig_key, fig_uri, s2_caption,
  s2orc_caption (may be null), s2orc_references (list or null), radiology, scope, predicted_type,
  oa_info). The fixture uses the sample's ten (pdf_hash, fig_key, fig_uri) triples.
- ROCO: github.com/razorx89/roco-dataset: ``data/<split>/<radiology|non-radiology>/captions.txt``
  (``ROCO_00001<TAB> Axial MRI ...``: a space after the tab), ``dlinks.txt`` (``ROCO_ID<TAB>wget -r
  ftp://.../PMCxxxx.tar.gz -P /path/to/Dir<TAB>name-in-archive.jpg``); ``scripts/fetch.py`` writes
  ``images/ROCO_ID.jpg`` since commit 0db07be (2022-01), ``images/{PMCID}_{name}`` before.
- ROCOv2 (Zenodo release, ImageCLEFmedical 2023-24): ``train_captions.csv`` with header ``ID,Caption``,
  images ``train/{ID}.jpg`` (IDs like ``ROCOv2_2023_train_000001``).
- COCO captions 2017: ``annotations/captions_train2017.json`` = {info, licenses, images: [{license,
  file_name, coco_url, height, width, date_captured, flickr_url, id}], annotations: [{image_id, id,
  caption}]}; file names ``000000391895.jpg``; some captions end in spaces or a newline.
"""
from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from msmedcap.cli import main

# (pdf_hash, fig_key, fig_uri) of the ten figures in allenai/medicat sample/sample.jsonl
MEDICAT_SAMPLE = [
    ("26491ab76c6e8d6acc582e71bb6b3b5f5601ccc2", "Figure4", "3-Figure4-1.png"),
    ("57c9ad0f4aab133f96d40992c46926fabc901ffa", "Figure1", "2-Figure1-1.png"),
    ("57c9ad0f4aab133f96d40992c46926fabc901ffa", "Figure3", "2-Figure3-1.png"),
    ("57c9ad0f4aab133f96d40992c46926fabc901ffa", "Figure2", "2-Figure2-1.png"),
    ("57c9ad0f4aab133f96d40992c46926fabc901ffa", "Figure4", "2-Figure4-1.png"),
    ("b362a19e4c4b1854f7cbe246a19502a56f52c2b5", "Figure2", "3-Figure2-1.png"),
    ("e19039cd42f72102389f811643cd3036f8db5182", "Figure3", "2-Figure3-1.png"),
    ("e19039cd42f72102389f811643cd3036f8db5182", "Figure1", "2-Figure1-1.png"),
    ("5f2d2f2ffbd20c7ff3ac30d514da54ee5bd825b4", "Figure1", "1-Figure1-1.png"),
    ("5f2d2f2ffbd20c7ff3ac30d514da54ee5bd825b4", "Figure2", "2-Figure2-1.png"),
]


def _image(path: Path, shade: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), (shade, 255 - shade, 40)).save(path, format=fmt)


def _written(out: Path) -> list:
    """(key, json, caption, image ext) of every sample in out/*.tar, in order."""
    got = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            ext = next(e for e in ("jpg", "png") if f"{key}.{e}" in members)
            got.append((key, json.loads(members[name]), members[f"{key}.txt"].decode(), ext))
    return got


def _medicat_release(root: Path) -> Path:
    """The release's layout: a JSONL of rows as in sample.jsonl + figures/{pdf_hash}_{fig_uri}."""
    rows = []
    for i, (pdf_hash, fig_key, fig_uri) in enumerate(MEDICAT_SAMPLE):
        number = fig_key[len("Figure"):]
        rows.append({
            "pdf_hash": pdf_hash, "fig_key": fig_key, "fig_uri": fig_uri,
            "s2_caption": f"Figure {number}. Axial CT image {i} showing a hypodense lesion.",
            "s2orc_caption": None if i == 8 else f"Figure {number}. Axial CT image {i} showing a hypodense lesion.",
            "s2orc_references": None if i in (2, 7) else [f"The lesion is shown in Figure {number}."],
            "radiology": i % 3 != 1, "scope": i % 2 == 0, "predicted_type": "Medical images",
            "oa_info": {"doi": f"10.1000/example.{i}", "doi_url": f"https://doi.org/10.1000/example.{i}",
                        "oa": {"is_oa": True, "oa_status": "gold", "journal_is_oa": True, "journal_is_in_doaj": True,
                               "license": "cc-by" if i % 2 else None, "provenance": "unpaywall"}},
        })
        _image(root / "figures" / f"{pdf_hash}_{fig_uri}", 20 * i)
    path = root / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_medicat_as_released_all_ten_sample_figures(tmp_path, capsys):
    jsonl = _medicat_release(tmp_path / "release")
    out = tmp_path / "shards"
    assert main(["shards", "write", "--from", "medicat", str(jsonl), "--images", str(tmp_path / "release" / "figures"),
                 "--out", str(out), "--domain", "medical"]) == 0
    assert "wrote 10 samples" in capsys.readouterr().out
    got = _written(out)
    assert len(got) == 10
    by_id = {meta["id"]: (key, meta, caption, ext) for key, meta, caption, ext in got}
    key, meta, caption, ext = by_id["57c9ad0f4aab133f96d40992c46926fabc901ffa-2-Figure1-1"]
    assert key == "medicat-57c9ad0f4aab133f96d40992c46926fabc901ffa-2-Figure1-1" and ext == "png"
    assert caption == "Figure 1. Axial CT image 1 showing a hypodense lesion."
    assert meta == {"domain": "medical", "source": "medicat", "id": "57c9ad0f4aab133f96d40992c46926fabc901ffa-2-Figure1-1",
                    "pdf_hash": "57c9ad0f4aab133f96d40992c46926fabc901ffa", "fig_uri": "2-Figure1-1.png",
                    "fig_key": "Figure1", "radiology": False, "scope": False, "predicted_type": "Medical images",
                    "doi": "10.1000/example.1"}
    # the default figure directory is the release's figures/ next to the JSONL
    assert main(["shards", "write", "--from", "medicat", str(jsonl), "--out", str(tmp_path / "s2"),
                 "--domain", "medical"]) == 0
    assert len(_written(tmp_path / "s2")) == 10


def test_medicat_figure_named_by_fig_uri_alone_is_missing(tmp_path, capsys):
    """No release stores figures/{fig_uri}: such a file is not taken (two papers share '2-Figure1-1.png')."""
    root = tmp_path / "m"
    _image(root / "figures" / "2-Figure1-1.png", 10)
    (root / "rows.jsonl").write_text(json.dumps({"pdf_hash": "57c9ad0f4aab133f96d40992c46926fabc901ffa",
                                                 "fig_uri": "2-Figure1-1.png", "s2_caption": "Figure 1. X."}) + "\n")
    assert main(["shards", "write", "--from", "medicat", str(root / "rows.jsonl"), "--out", str(tmp_path / "o"),
                 "--domain", "medical"]) == 1
    err = capsys.readouterr()
    assert "57c9ad0f4aab133f96d40992c46926fabc901ffa_2-Figure1-1.png" in err.err and "'missing_image': 1" in err.out


def test_roco_current_and_pre_2022_fetch_layouts(tmp_path, capsys):
    split = tmp_path / "data" / "test" / "radiology"
    split.mkdir(parents=True)
    (split / "captions.txt").write_text(
        "ROCO_00001\t Axial MRI (coronal view).\n"
        "ROCO_00006\t Coronal plain computed tomography image showing multiple masses.\n"
        "ROCO_00016\t Axial source image from an intracranial magnetic resonance angiogram.\n")
    (split / "dlinks.txt").write_text(
        "ROCO_00001\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/8d/34/PMC4608653.tar.gz -P /path/to/Dir"
        "\tcro-0008-0385-g01.jpg\n"
        "ROCO_00006\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/70/6d/PMC4840839.tar.gz -P /path/to/Dir"
        "\tol-11-05-3298-g02.jpg\n"
        "ROCO_00016\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/00/9e/PMC5665693.tar.gz -P /path/to/Dir"
        "\tcureus-0009-00000001639-i01.jpg\n")
    # today's fetch.py: images/ROCO_ID.jpg
    for i, roco_id in enumerate(("ROCO_00001", "ROCO_00006", "ROCO_00016")):
        _image(split / "images" / f"{roco_id}.jpg", 30 * i, "JPEG")
    assert main(["shards", "write", "--from", "roco", str(split / "captions.txt"), "--out", str(tmp_path / "new"),
                 "--domain", "medical"]) == 0
    got = _written(tmp_path / "new")
    assert [(k, c, e) for k, _, c, e in got] == [
        ("roco-ROCO_00001", "Axial MRI (coronal view).", "jpg"),
        ("roco-ROCO_00006", "Coronal plain computed tomography image showing multiple masses.", "jpg"),
        ("roco-ROCO_00016", "Axial source image from an intracranial magnetic resonance angiogram.", "jpg")]
    # the fetch.py before 2022-01: images/{PMCID}_{name in the archive}, found through dlinks.txt
    old = tmp_path / "old-images"
    _image(old / "PMC4608653_cro-0008-0385-g01.jpg", 1, "JPEG")
    _image(old / "PMC5665693_cureus-0009-00000001639-i01.jpg", 2, "JPEG")
    assert main(["shards", "write", "--from", "roco", str(split / "captions.txt"), "--images", str(old),
                 "--out", str(tmp_path / "old"), "--domain", "medical"]) == 0
    assert [k for k, *_ in _written(tmp_path / "old")] == ["roco-ROCO_00001", "roco-ROCO_00016"]
    assert "'missing_image': 1" in capsys.readouterr().out


def test_rocov2_csv_and_a_tsv(tmp_path, capsys):
    root = tmp_path / "rocov2"
    captions = [("ROCOv2_2023_train_000001", "Head CT demonstrating left parotiditis."),
                ("ROCOv2_2023_train_000002", 'Acquired renal cysts, "end-stage" kidneys,\nboth sides.'),
                ("ROCOv2_2023_train_000003", "Chest X-ray.")]
    root.mkdir()
    with open(root / "train_captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Caption"])
        writer.writerows(captions)
    for i, (image_id, _) in enumerate(captions[:2]):
        _image(root / "train" / f"{image_id}.jpg", 50 * i, "JPEG")
    assert main(["shards", "write", "--from", "csv", str(root / "train_captions.csv"), "--images", str(root / "train"),
                 "--image-col", "ID", "--caption-col", "Caption", "--out", str(tmp_path / "o"), "--domain", "medical",
                 "--source", "rocov2"]) == 0
    got = _written(tmp_path / "o")
    assert [(k, c) for k, _, c, _ in got] == [("rocov2-ROCOv2_2023_train_000001", captions[0][1]),
                                              ("rocov2-ROCOv2_2023_train_000002", captions[1][1])]
    assert got[0][1] == {"domain": "medical", "source": "rocov2", "id": "ROCOv2_2023_train_000001"}
    assert "'missing_image': 1" in capsys.readouterr().out
    # a TSV with relative paths and an extra column (kept in the json)
    (root / "list.tsv").write_text("file\ttext\tsplit\ntrain/ROCOv2_2023_train_000001.jpg\tA head CT.\ttrain\n")
    assert main(["shards", "write", "--from", "csv", str(root / "list.tsv"), "--image-col", "file", "--caption-col",
                 "text", "--out", str(tmp_path / "t"), "--domain", "medical"]) == 0
    ((key, meta, caption, _),) = _written(tmp_path / "t")
    assert caption == "A head CT." and meta["split"] == "train" and meta["id"] == "train/ROCOv2_2023_train_000001.jpg"
    # a column that is not there: an error naming the file, the option and the header
    assert main(["shards", "write", "--from", "csv", str(root / "train_captions.csv"), "--out", str(tmp_path / "x"),
                 "--domain", "medical"]) == 1
    err = capsys.readouterr().err
    assert "train_captions.csv" in err and "'image' (--image-col)" in err and "['ID', 'Caption']" in err


def test_coco_captions_2017_layout(tmp_path):
    root = tmp_path / "coco"
    images = [{"license": 3, "file_name": "000000391895.jpg", "coco_url": "http://images.cocodataset.org/train2017/"
               "000000391895.jpg", "height": 360, "width": 640, "date_captured": "2013-11-14 11:18:45",
               "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg", "id": 391895},
              {"license": 4, "file_name": "000000522418.jpg", "coco_url": "", "height": 480, "width": 640,
               "date_captured": "2013-11-14 11:38:44", "flickr_url": "", "id": 522418}]
    annotations = [{"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a small moped on a dirt road. "},
                   {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike on a dirt road on the countryside.\n"},
                   {"image_id": 522418, "id": 766909, "caption": "A woman wearing a net on her head cutting a cake. "}]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(
        {"info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017}, "licenses": [],
         "images": images, "annotations": annotations}))
    for i, img in enumerate(images):
        _image(root / "train2017" / img["file_name"], 60 * i, "JPEG")
    for per, expect in (("caption", [("coco-391895-770337", "A man with a red helmet on a small moped on a dirt road."),
                                     ("coco-391895-771687", "Man riding a motor bike on a dirt road on the countryside."),
                                     ("coco-522418-766909", "A woman wearing a net on her head cutting a cake.")]),
                        ("image", [("coco-391895", "A man with a red helmet on a small moped on a dirt road."),
                                   ("coco-522418", "A woman wearing a net on her head cutting a cake.")])):
        out = tmp_path / per
        assert main(["shards", "write", "--from", "coco", str(root / "annotations" / "captions_train2017.json"),
                     "--images", str(root / "train2017"), "--out", str(out), "--domain", "general",
                     "--coco-per", per]) == 0
        got = _written(out)
        assert sorted((k, c) for k, _, c, _ in got) == expect
    assert len(got[0][1]["captions"]) == 2  # per image: every caption in the json


@pytest.mark.parametrize("kind", ["medicat", "csv"])
def test_missing_image_directory_names_it(tmp_path, capsys, kind):
    (tmp_path / "x.jsonl").write_text(json.dumps({"pdf_hash": "a", "fig_uri": "1-Figure1-1.png"}) + "\n")
    (tmp_path / "x.csv").write_text("image,caption\nnope,a caption\n")
    src = tmp_path / ("x.jsonl" if kind == "medicat" else "x.csv")
    code = main(["shards", "write", "--from", kind, str(src), "--images", str(tmp_path / "absent"),
                 "--out", str(tmp_path / "o"), "--domain", "medical"])
    assert code == 1
    captured = capsys.readouterr()
    assert str(tmp_path / "absent") in captured.err + captured.out
