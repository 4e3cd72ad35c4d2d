"""Table 1 over seeds: the aggregation (msmedcap.analysis.table1) on hand-made scores.json files, and
launch/compare_variants.py's loop (order, commands, skip of finished runs, continuation after a
failure, refusal of a run directory trained otherwise) with a stand-in for launch/pretrain.py that
writes a config.yaml and a scores.json as a run would. Real training is not run here: one tiny real
run of one variant takes ~90 s on this machine (the loop's command is the README's, tested there)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from rich.console import Console

from msmedcap.analysis import table1 as A

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BASE = {"blip2": 1.0, "sam-blip2": 2.0, "msmedcap": 3.0}


def findings_block(side, n=10, lexicon_f1=None):
    lex = {"n": 0 if lexicon_f1 is None else 4,
           "modality": {"precision": lexicon_f1, "recall": lexicon_f1, "f1": lexicon_f1, "tp": 0, "fp": 0, "fn": 0},
           "laterality": {"precision": None, "recall": None, "f1": None, "tp": 0, "fp": 0, "fn": 0}}
    return {"n": n, "distinct_predictions": {"count": 5, "share": 0.5},
            "fields": {"modality": {"accuracy": 1.0, "correct": n, "n": n},
                       "side": {"accuracy": side, "correct": round(side * 6), "n": 6},
                       "count": {"accuracy": None, "correct": 0, "n": 0}},
            "unparsed_references": 0, "unparsed_predictions": 0, "parsers": {"demo-medical": n}, "lexicon": lex}


def fake_scores(variant, seed, first=42):
    """CIDEr = base + 0.1 * (seed - first); side accuracy = base / 10 + 0.01 * (seed - first)."""
    k = seed - first
    metrics = {m: None if m == "SPICE" else 0.5 for m in A.METRICS}
    sub = lambda bump: {**metrics, "CIDEr": BASE[variant] + 0.1 * k + bump, "n": 10,  # noqa: E731
                        "findings": findings_block(BASE[variant] / 10 + 0.01 * k)}
    return {"overall": sub(0.0), "domain": {"medical": sub(1.0)}, "source": {"demo-ct": sub(2.0)},
            "sources_by_domain": {"medical": ["demo-ct"]}, "config": {"model": {"variant": variant}}}


def test_aggregate_mean_and_sample_sd():
    runs = {v: [fake_scores(v, s) for s in (42, 43, 44)] for v in BASE}
    runs["msmedcap"][2] = None  # a run that has not finished: left out of its variant's stats
    agg = A.aggregate(runs)
    assert agg["variants"] == ["blip2", "sam-blip2", "msmedcap"]
    c = agg["overall"]["blip2"]["metrics"]["CIDEr"]
    assert c["mean"] == pytest.approx(1.1) and c["sd"] == pytest.approx(0.1)  # sample sd of 1.0, 1.1, 1.2
    assert c["values"] == pytest.approx([1.0, 1.1, 1.2])
    m = agg["overall"]["msmedcap"]
    assert m["runs"] == 2 and m["metrics"]["CIDEr"]["mean"] == pytest.approx(3.05)
    assert m["metrics"]["CIDEr"]["sd"] == pytest.approx(0.0707107, rel=1e-5) and m["metrics"]["CIDEr"]["values"][2] is None
    assert m["metrics"]["SPICE"] == {"mean": None, "sd": None, "values": [None, None, None]}
    side = agg["domain"]["medical"]["sam-blip2"]["findings"]["side"]
    assert side["mean"] == pytest.approx(0.21) and side["sd"] == pytest.approx(0.01)
    assert agg["domain"]["medical"]["blip2"]["metrics"]["CIDEr"]["mean"] == pytest.approx(2.1)
    assert agg["source"]["demo-ct"]["blip2"]["metrics"]["CIDEr"]["mean"] == pytest.approx(3.1)
    assert "count" not in agg["overall"]["blip2"]["findings"]  # scored on no sample: no column
    assert agg["overall"]["blip2"]["findings"]["distinct_predictions"]["mean"] == 0.5
    assert agg["overall"]["blip2"]["n"] == 10
    one = A.aggregate({"blip2": [fake_scores("blip2", 42)]})["overall"]["blip2"]["metrics"]["CIDEr"]
    assert one["mean"] == 1.0 and one["sd"] is None  # one seed: no sd
    json.dumps(agg)

    md = A.table1_markdown(agg)
    head = md.split("**domain: medical**")[0]
    assert "**all** (mean ± sd over seeds)" in head and "| model | seeds | n | BLEU-1 |" in head
    assert "| blip2 | 3 | 10 | " in head and "1.1000 ± 0.1000" in head and "**3.0500 ± 0.0707**" in head
    assert "SPICE" not in head  # no value anywhere: no column
    assert "**all · findings**" in head and "| modality | side | distinct |" in head and "**0.305 ± 0.007**" in head
    assert "**domain: medical · findings**" in md and "source: demo-ct" not in md
    assert "**source: demo-ct**" in A.table1_markdown(agg, sources=True)
    console = Console(record=True, width=200)
    for t in A.table1_tables(agg):
        console.print(t)
    text = console.export_text()
    assert "msmedcap (2 seeds, n=10)" in text and "1.1000 ± 0.1000" in text and "domain: medical · findings" in text
    # free-text sources: the lexicon's F1 gets a column
    lex = fake_scores("blip2", 42)
    lex["overall"]["findings"] = findings_block(0.1, lexicon_f1=0.75)
    assert "mod F1" in A.table1_markdown(A.aggregate({"blip2": [lex]}))


FAKE_PRETRAIN = '''
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_table1 import fake_scores
from msmedcap.config import load_config

argv = sys.argv[1:]
assert argv[0].endswith("launch/pretrain.py"), argv
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
config = argv[argv.index("--config") + 1]
overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
kv = dict(a.split("=", 1) for a in overrides)
out = Path(kv["train.output_dir"])
out.mkdir(parents=True, exist_ok=True)
cfg = load_config(config, overrides)
cfg.model.lm.dtype = "bf16"  # as the trainer writes it: model.lm.dtype auto resolved to the engine's precision
if cfg.model.feature_cache == "auto":  # and the demo's feature cache resolved to the run's own directory
    cfg.model.feature_cache = str(out / "feature-cache")
(out / "config.yaml").write_text(cfg.to_yaml())
if os.environ.get("FAKE_FAIL") == kv["model.variant"] + "/" + kv["train.seed"]:
    sys.exit(3)
(out / "eval").mkdir(exist_ok=True)
(out / "eval" / "scores.json").write_text(json.dumps(fake_scores(kv["model.variant"], int(kv["train.seed"]))))
'''


def load_command():
    spec = importlib.util.spec_from_file_location("compare_variants", REPO / "launch" / "compare_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_variants_loop_resume_and_table(tmp_path, monkeypatch, capsys):
    cmd = load_command()
    fake = tmp_path / "fake_pretrain.py"
    fake.write_text(FAKE_PRETRAIN.format(tests=str(REPO / "tests" / "analysis")))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", "sam-blip2/43")
    monkeypatch.chdir(REPO)  # the demo preset's shard paths are relative to the checkout
    out = tmp_path / "table1"
    argv = ["--seeds", "2", "--out", str(out), "--launcher", f"{sys.executable} {fake}", "train.stage2.steps=5"]
    console = Console(record=True, width=200)

    assert cmd.main(argv, console=console) == 3  # sam-blip2 seed 43 fails: stop there
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    order = [(dict(a.split("=", 1) for a in c if "=" in a)["model.variant"], dict(a.split("=", 1) for a in c if "=" in a)["train.seed"])
             for c in calls]
    assert order == [("blip2", "42"), ("sam-blip2", "42"), ("msmedcap", "42"), ("blip2", "43"), ("sam-blip2", "43")]
    first = calls[0]
    assert first[first.index("--resume") + 1] == "auto" and first[first.index("--config") + 1] == "demo"
    assert f"train.output_dir={out / 'blip2' / 'seed42'}" in first and first[-1] == "train.stage2.steps=5"
    assert "--deepspeed" not in first  # launch/pretrain.py's default, as in the README's command
    assert "sam-blip2 seed 43 failed (exit 3)" in capsys.readouterr().err
    assert not (out / "table1.json").exists()

    # The same command again: finished runs are skipped, the failed one runs again, then the rest.
    monkeypatch.delenv("FAKE_FAIL")
    assert cmd.main(argv, console=console) == 0
    calls = [json.loads(x) for x in log.read_text().splitlines()][5:]
    assert [(c[-3].split("=")[1], c[-4].split("=")[1]) for c in calls] == [("43", "sam-blip2"), ("43", "msmedcap")]
    result = json.loads((out / "table1.json").read_text())
    assert result["seeds"] == [42, 43] and result["variants"] == ["blip2", "sam-blip2", "msmedcap"]
    assert [r["status"] for r in result["runs"]] == ["done before"] * 4 + ["trained"] * 2
    assert result["missing"] == [] and result["overrides"] == ["train.stage2.steps=5"]
    cider = result["table"]["overall"]["msmedcap"]["metrics"]["CIDEr"]
    assert cider["mean"] == pytest.approx(3.05) and cider["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert result["table"]["domain"]["medical"]["blip2"]["findings"]["side"]["mean"] == pytest.approx(0.105)
    assert "3.0500 ± 0.0707" in (out / "table1.md").read_text()
    text = console.export_text()
    assert "all (mean ± sd over seeds)" in text and "domain: medical · findings" in text

    # Everything done: nothing runs; --markdown prints the Markdown table.
    n_calls = len(log.read_text().splitlines())
    assert cmd.main(argv + ["--markdown"], console=console) == 0
    assert len(log.read_text().splitlines()) == n_calls
    assert "| msmedcap | 2 | 10 | " in console.export_text()

    # Refusals, before anything runs: another budget into the same runs, keys this command sets.
    def refused(extra):
        assert cmd.main(["--seeds", "2", "--out", str(out), "--launcher", f"{sys.executable} {fake}", *extra],
                        console=console) == 2
        return capsys.readouterr().err

    msg = refused(["train.stage2.steps=7"])
    assert "trained with another configuration" in msg and "train.stage2.steps: 5 there, 7 now" in msg
    assert "set per run by this command" in refused(["train.seed=1"])
    assert "train.eval_at_end=true" in refused(["train.stage2.steps=5", "train.eval_at_end=false"])
    assert "config error" in refused(["train.stage2.nonsense=1"])
    assert len(log.read_text().splitlines()) == n_calls

    # --aggregate-only with a run missing: the table of the others, the missing one named.
    (out / "blip2" / "seed43" / "eval" / "scores.json").unlink()
    assert cmd.main(argv + ["--aggregate-only"], console=console) == 0
    result = json.loads((out / "table1.json").read_text())
    assert result["missing"][0]["variant"] == "blip2" and result["table"]["overall"]["blip2"]["runs"] == 1
    assert "1 run(s) without scores: blip2 seed 43" in console.export_text()
    assert len(log.read_text().splitlines()) == n_calls
    assert os.environ.get("FAKE_FAIL") is None
