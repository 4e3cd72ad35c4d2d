"""Scoring equals pycocoevalcap called directly; `msmedcap score` output and its errors; tables.

METEOR and the PTB tokenizer are Java processes costing seconds each: every case is batched into
few calls (the METEOR process is started once per test session by msmedcap.eval.scoring)."""
import json
import random

import pytest

from msmedcap.cli import main as msmedcap_main
from msmedcap.eval import scoring

WORDS = ("a small bright lesion in the left upper lobe with mild effusion dog cat running on grass near "
         "the red car axial ct scan shows no acute abnormality mass liver kidney").split()


def make_records(n=30, seed=0):
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        domain = "medical" if i % 3 else "general"
        source = ("roco", "medicat")[i % 2] if domain == "medical" else "demo-general"
        refs = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))).capitalize() + "." for _ in range(rng.randint(1, 3))]
        pred = " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))
        recs.append({"key": f"s{i:03d}", "domain": domain, "source": source, "references": refs, "prediction": pred})
    # Edge cases pycocoevalcap must see identically: punctuation, an empty prediction, odd whitespace.
    recs[1]["prediction"] = ""
    recs[2]["prediction"] = "A lesion, (small) -- in the lobe; isn't it?"
    recs[4]["references"].append("Multi   space\ttabbed caption")
    return recs


def direct_pycocoevalcap(recs, meteor):
    """pycocoevalcap exactly as its COCOEvalCap.evaluate uses it (separate tokenizer runs)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({r["key"]: [{"caption": c} for c in r["references"]] for r in recs})
    res = tok.tokenize({r["key"]: [{"caption": r["prediction"]}] for r in recs})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": b for i, b in enumerate(bleu)})
    out["METEOR"], _ = meteor.compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], cider = Cider().compute_score(gts, res)
    return out, dict(zip(gts, cider))


@pytest.fixture(scope="module")
def scored():
    recs = make_records()
    return recs, scoring.score_records(recs)


def test_scores_equal_pycocoevalcap_direct(scored):
    from pycocoevalcap.meteor.meteor import Meteor

    recs, scores = scored
    meteor = Meteor()  # its own JVM, independent of the one msmedcap.eval.scoring keeps
    medical = [r for r in recs if r["domain"] == "medical"]
    for subset, mine in ((recs, scores["overall"]), (medical, scores["domain"]["medical"])):
        direct, direct_cider = direct_pycocoevalcap(subset, meteor)
        for m, v in direct.items():
            assert mine[m] == pytest.approx(v, rel=1e-9, abs=1e-12), m
        assert mine["n"] == len(subset)
        if subset is recs:  # per-sample CIDEr (the gallery's sort key) is pycocoevalcap's too
            for k, v in direct_cider.items():
                assert scores["per_sample"][k]["CIDEr"] == pytest.approx(v, rel=1e-9, abs=1e-12)
    assert set(scores["source"]) == {"roco", "medicat", "demo-general"}
    assert sum(s["n"] for s in scores["source"].values()) == len(recs)
    assert set(scores["per_sample"]) == {r["key"] for r in recs}
    assert scores["per_sample"]["s001"]["Bleu_1"] == pytest.approx(0.0, abs=1e-6)  # empty prediction
    # SPICE: its Stanford models are not installed here, so it is unavailable (None), never 0.
    if scoring.spice_unavailable_reason():
        assert scores["overall"]["SPICE"] is None and "SPICE" in scores["unavailable"]


def test_score_cli_and_errors(tmp_path, capsys, scored):
    recs, scores = scored
    preds = tmp_path / "pred.jsonl"
    refs = tmp_path / "refs.jsonl"
    preds.write_text("".join(json.dumps({"key": r["key"], "prediction": r["prediction"]}) + "\n" for r in recs))
    refs.write_text("".join(json.dumps({"key": r["key"], "captions": r["references"], "domain": r["domain"],
                                        "source": r["source"]}) + "\n" for r in recs))
    out = tmp_path / "scores.json"
    assert msmedcap_main(["score", str(preds), "--refs", str(refs), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    for m in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert written["overall"][m] == pytest.approx(scores["overall"][m], rel=1e-9)
    assert written["domain"]["general"]["n"] == sum(r["domain"] == "general" for r in recs)
    assert "CIDEr" in capsys.readouterr().out

    def err(argv):
        assert msmedcap_main(argv) == 2
        return capsys.readouterr().err

    # Missing and extra keys: the error counts them and names a few.
    short = tmp_path / "short.jsonl"
    short.write_text("".join(preds.read_text().splitlines(True)[:-7]) + json.dumps({"key": "zzz", "prediction": "x"}) + "\n")
    msg = err(["score", str(short), "--refs", str(refs)])
    assert "7 key(s)" in msg and "'s023'" in msg and "and 2 more" in msg and "'zzz'" in msg and str(refs) in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "prediction": "x"}\nnot json\n')
    assert "bad.jsonl:2: not valid JSON" in err(["score", str(bad), "--refs", str(refs)])
    bad.write_text('{"key": "a", "caption": "x"}\n')
    assert "missing field 'prediction'" in err(["score", str(bad), "--refs", str(refs)])
    bad.write_text('{"key": "a", "prediction": "x"}\n{"key": "a", "prediction": "y"}\n')
    assert "key 'a' repeats line 1" in err(["score", str(bad), "--refs", str(refs)])
    assert "no such file" in err(["score", str(tmp_path / "nope.jsonl"), "--refs", str(refs)])
    assert "pass --refs" in err(["score", str(preds)])
    bad.write_text('{"key": "s000", "captions": []}\n')
    assert "non-empty list" in err(["score", str(preds), "--refs", str(bad)])


def test_tables_and_compare(tmp_path, scored):
    from rich.console import Console

    from msmedcap.eval import report

    recs, scores = scored
    for variant, bump in (("blip2", 0.0), ("msmedcap", 0.1)):
        run = tmp_path / variant / "eval"
        run.mkdir(parents=True)
        s = json.loads(json.dumps({k: v for k, v in scores.items() if k != "per_sample"}))
        s["overall"]["CIDEr"] += bump
        s["config"] = {"model": {"variant": variant}}
        (run / "scores.json").write_text(json.dumps(s))
    console = Console(record=True, width=200)
    report.print_scores(scores, console=console)
    report.print_compare([str(tmp_path / "blip2"), str(tmp_path / "msmedcap")], console=console)
    text = console.export_text()
    assert "domain: medical" in text and "n/a" in text  # SPICE unavailable shows as n/a
    for dataset in ("all", "roco", "medicat"):
        assert dataset in text
    md = report.compare_markdown([str(tmp_path / "blip2"), str(tmp_path / "msmedcap")])
    best = f"**{scores['overall']['CIDEr'] + 0.1:.4f}**"
    assert best in md.split("**domain: general**")[0]  # the "all" table
    assert "**source: roco**" in md and "**domain: general**" in md
    assert "**source: demo-general**" not in md  # general's only source: its domain table says it all
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scores.json"):
        report.find_scores(str(tmp_path / "empty"))
