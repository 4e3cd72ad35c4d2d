"""Paired significance (msmedcap.eval.significance) on constructed pairs of evaluations.

Records are scored by msmedcap.eval.scoring.score_records (pycocoevalcap, findings), as evaluate
writes them to predictions.jsonl (tests/helpers/evaluations.py); references follow the demo grammar
(msmedcap.demo) so that the findings parser judges every field. Corpus scores are checked against pycocoevalcap's Bleu and
Cider called directly (pycocoevalcap 1.2)."""
import copy
import json
import random

import numpy as np
import pytest

from helpers.evaluations import scored_records

from msmedcap.eval import significance as S
from msmedcap.eval.scoring import ScoringError, tokenize

NUMBERS = ("one", "two", "three")
COLOURS = ("red", "blue", "yellow", "green")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "grey")


def caption(rng):
    n = rng.randrange(3)
    return f"{NUMBERS[n]} {rng.choice(COLOURS)} {rng.choice(SHAPES)}{'s' if n else ''} on a {rng.choice(BACKGROUNDS)} background."


def scored(refs, preds):
    return scored_records(refs, preds)[0]


@pytest.fixture(scope="module")
def pair():
    """(worse, better, identical copy of better): better predicts the reference for 3 of 4 samples,
    worse a random caption of the same grammar for every one."""
    rng = random.Random(0)
    refs = [caption(rng) for _ in range(40)]
    better = [r if i % 4 else caption(rng) for i, r in enumerate(refs)]
    worse = [caption(rng) for _ in refs]
    better = scored(refs, better)
    return scored(refs, worse), better, copy.deepcopy(better)


def test_clearly_better_run_is_significant(pair):
    worse, better, _ = pair
    r = S.paired_significance(worse, better, "worse", "better", resamples=300, seed=1)
    assert r["n"] == 40 and set(r["metrics"]) >= {"Bleu_1", "Bleu_4", "CIDEr", "METEOR", "ROUGE_L"}
    for name, m in list(r["metrics"].items()) + [(f, r["findings"][f]) for f in ("objects", "background")]:
        assert m["diff"] > 0 and m["ci95"][0] > 0, name
        assert m["p"] < 0.01, name  # 1/301 is the smallest p 300 rounds can give
    assert r["metrics"]["CIDEr"]["statistic"] == "corpus" and r["metrics"]["METEOR"]["statistic"] == "mean"


def test_identical_runs_p_1_and_ci_0(pair):
    _, better, same = pair
    r = S.paired_significance(better, same, "a", "b", resamples=100, seed=0)
    for name, m in list(r["metrics"].items()) + list(r["findings"].items()):
        assert m["diff"] == 0 and m["ci95"] == [0.0, 0.0] and m["p"] == 1.0, name


def test_corpus_scores_recomputed_by_pycocoevalcap_on_each_resample(pair):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    worse, better, _ = pair
    keys = [r["key"] for r in worse]
    refs = {r["key"]: r["references"] for r in worse}
    gts, res_a = tokenize(refs, {r["key"]: r["prediction"] for r in worse})
    _, res_b = tokenize(refs, {r["key"]: r["prediction"] for r in better})
    corpus = S._Corpus(gts, res_a, res_b, keys)
    r = S.paired_significance(worse, better, resamples=5, seed=0)
    assert r["metrics"]["CIDEr"]["a"] == pytest.approx(Cider().compute_score(gts, res_a)[0], abs=1e-12)
    assert r["metrics"]["Bleu_4"]["b"] == pytest.approx(Bleu(4).compute_score(gts, res_b, verbose=0)[0][3], abs=1e-12)
    # one resample with repeats and one mix of both runs' predictions: the library on that very corpus
    idx = np.random.default_rng(3).integers(0, len(keys), len(keys))
    sides = np.random.default_rng(4).random(len(keys)) < 0.5
    g = {str(j): gts[keys[i]] for j, i in enumerate(idx)}
    h = {str(j): (res_b if s else res_a)[keys[i]] for j, (i, s) in enumerate(zip(idx, sides))}
    assert len(set(idx)) < len(keys)  # a bootstrap resample repeats samples: CIDEr's document frequencies count them
    assert corpus.scores("cider", sides, idx)["CIDEr"] == pytest.approx(Cider().compute_score(g, h)[0], abs=1e-12)
    assert corpus.scores("bleu", sides, idx)["Bleu_2"] == pytest.approx(Bleu(4).compute_score(g, h, verbose=0)[0][1],
                                                                        abs=1e-12)
    # a permutation keeps every reference: its CIDEr is the mean of the whole set's per-sample CIDEr
    every = np.arange(len(keys))
    h = {keys[i]: (res_b if s else res_a)[keys[i]] for i, s in zip(every, sides)}
    assert float(np.where(sides, corpus.per_sample("cider", "b"), corpus.per_sample("cider", "a")).mean()) == \
        pytest.approx(Cider().compute_score(gts, h)[0], abs=1e-12)


def test_seeded(pair):
    worse, better, _ = pair
    one = S.paired_significance(worse, better, resamples=50, seed=7)
    assert one == S.paired_significance(worse, better, resamples=50, seed=7)
    other = S.paired_significance(worse, better, resamples=50, seed=8)
    assert other["metrics"]["CIDEr"]["ci95"] != one["metrics"]["CIDEr"]["ci95"]
    json.dumps(one)


def test_runs_of_other_samples_are_refused_naming_them(pair):
    worse, better, _ = pair
    with pytest.raises(ScoringError, match=r"run-a and run-b are not the same samples: 1 key\(s\) only in run-a \('k000'\)"):
        S.paired_significance(worse, better[1:], "run-a", "run-b")
    changed = [dict(r) for r in better]
    changed[5] = {**changed[5], "references": ["something else."]}
    with pytest.raises(ScoringError, match=r"other references for 1 key\(s\): 'k005'"):
        S.paired_significance(worse, changed, "run-a", "run-b")


def test_tables_show_every_metric_and_field(pair):
    worse, better, _ = pair
    r = S.paired_significance(worse, better, "blip2", "msmedcap", resamples=20, seed=0)
    md = S.significance_markdown(r)
    assert "msmedcap vs blip2" in md and "| CIDEr |" in md and "| findings: objects |" in md and "20 resamples" in md
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(S.significance_table(r))
    assert "95% CI" in console.export_text()
