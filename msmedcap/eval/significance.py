"""Paired significance of two evaluations of the same samples (two predictions.jsonl files).

Per metric and per findings field: the difference of the statistic (B - A), a paired bootstrap 95 %
CI (percentile, the same resampled samples for both runs) and an approximate-randomization p-value
(each sample's two predictions swapped with probability 1/2; p = (1 + #|d*| >= |d|) / (1 + R)).
The statistic is the one the scores report: BLEU-1..4 and CIDEr are corpus scores, recomputed on every
resample by pycocoevalcap's own scorers from captions tokenized once (CIDEr's document frequencies
come from the resample); METEOR, ROUGE-L, SPICE and the ImageCLEF metrics are means of the per-sample
scores (METEOR's corpus score is not quite that mean: its test uses the mean); a findings field is
its accuracy over the samples it applies to. Seeded: the same files and seed give the same table.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from msmedcap.eval.scoring import ScoringError, _few

CORPUS_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr")
MEAN_METRICS = ("METEOR", "ROUGE_L", "SPICE")
DEFAULT_RESAMPLES = 1000


def _check_pair(a: Sequence[Mapping], b: Sequence[Mapping], a_name: str, b_name: str) -> list:
    """The shared keys in A's order; an error naming the files when the two runs did not score the
    same samples against the same references."""
    ka, kb = {str(r["key"]): r for r in a}, {str(r["key"]): r for r in b}
    only_a, only_b = set(ka) - set(kb), set(kb) - set(ka)
    if only_a or only_b:
        raise ScoringError(f"{a_name} and {b_name} are not the same samples: {len(only_a)} key(s) only in "
                           f"{a_name} ({_few(only_a) or '-'}), {len(only_b)} only in {b_name} ({_few(only_b) or '-'})")
    for name, recs in ((a_name, a), (b_name, b)):
        lacking = [str(r["key"]) for r in recs if not isinstance(r.get("references"), list) or not r["references"]]
        if lacking:
            raise ScoringError(f"{name}: {len(lacking)} line(s) without a 'references' list, e.g. key {lacking[0]!r}")
    differ = [k for k in ka if list(ka[k]["references"]) != list(kb[k]["references"])]
    if differ:
        raise ScoringError(f"{a_name} and {b_name} have other references for {len(differ)} key(s): {_few(differ)}")
    return list(ka)


# --------------------------------------------------------------------------- statistics
class _Corpus:
    """pycocoevalcap's BLEU / CIDEr of a resample: the scorers' cooked entries, computed once per
    caption, handed to a fresh scorer in the resample's order."""

    def __init__(self, gts: Mapping, res_a: Mapping, res_b: Mapping, keys: Sequence[str]):
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        self.Bleu, self.Cider = BleuScorer, CiderScorer
        self.cooked = {}
        for kind, cls in (("bleu", BleuScorer), ("cider", CiderScorer)):
            for side, res in (("a", res_a), ("b", res_b)):
                scorer = cls(n=4)
                for k in keys:
                    scorer += (res[k][0], gts[k])
                self.cooked[kind, side] = (scorer.crefs, scorer.ctest)

    def per_sample(self, kind: str, side: str) -> np.ndarray:
        """Each sample's score within the whole set (CIDEr's document frequencies from every reference)."""
        refs, tests = self.cooked[kind, side]
        scorer = self.Cider(n=4, sigma=6.0)
        scorer.crefs, scorer.ctest = list(refs), list(tests)
        return np.asarray(scorer.compute_score()[1], float)

    def scores(self, kind: str, sides: np.ndarray, idx: np.ndarray) -> dict:
        """Corpus scores of the samples ``idx`` with each one's prediction from side ``sides[i]`` (0 = A)."""
        ra, ta = self.cooked[kind, "a"]
        _, tb = self.cooked[kind, "b"]
        scorer = self.Bleu(n=4) if kind == "bleu" else self.Cider(n=4, sigma=6.0)
        scorer.crefs = [ra[i] for i in idx]
        scorer.ctest = [(tb if s else ta)[i] for i, s in zip(idx, sides)]
        if kind == "bleu":
            score, _ = scorer.compute_score(option="closest", verbose=0)
            return {f"Bleu_{n + 1}": float(score[n]) for n in range(4)}
        return {"CIDEr": float(scorer.compute_score()[0])}


def _test(stat, n: int, idx: np.ndarray, swaps: np.ndarray, perm_stat=None) -> dict:
    """stat(sides, sample indices) -> {name: value or None}, sides[i] = True where sample i takes B's
    prediction -> {name: {"a", "b", "diff", "ci95", "p"}}. ``perm_stat``: the same statistic, faster
    on the whole sample set (the permutations')."""
    perm_stat = perm_stat or stat
    every, zeros, ones = np.arange(n), np.zeros(n, dtype=bool), np.ones(n, dtype=bool)

    def diffs(pairs):
        return {m: np.array([_nan(hi[m]) - _nan(lo[m]) for lo, hi in pairs]) for m in pairs[0][0]}

    a, b = stat(zeros, every), stat(ones, every)
    boot = diffs([(stat(zeros, i), stat(ones, i)) for i in idx])
    perm = diffs([(perm_stat(s, every), perm_stat(~s, every)) for s in swaps])
    out = {}
    for m in a:
        observed = None if a[m] is None or b[m] is None else b[m] - a[m]
        out[m] = r = {"a": a[m], "b": b[m], "diff": observed, "ci95": None, "p": None}
        if observed is None:
            continue
        bm, pm = boot[m][~np.isnan(boot[m])], perm[m][~np.isnan(perm[m])]
        if len(bm):
            r["ci95"] = [float(v) for v in np.percentile(bm, [2.5, 97.5])]
        # a tolerance for float noise: an exact tie (identical runs) counts as at least as extreme
        extreme = np.abs(pm) >= abs(observed) - 1e-12 * max(1.0, abs(observed))
        r["p"] = float((1 + extreme.sum()) / (1 + len(pm)))
    return out


def _nan(v: Optional[float]) -> float:
    return np.nan if v is None else v


def _mean_stat(values: Mapping[str, tuple]):
    """Means of per-sample scores: {name: (A's values, B's values)}."""
    arrays = {m: (np.asarray(va, float), np.asarray(vb, float)) for m, (va, vb) in values.items()}

    def stat(sides, idx):
        return {m: float(np.where(sides, vb[idx], va[idx]).mean()) for m, (va, vb) in arrays.items()}
    return stat


def _accuracy_stat(fields: Mapping[str, tuple]):
    """Findings accuracy, correct / applicable (None where the field applies to no sample):
    {field: (A correct, A applicable, B correct, B applicable)}."""
    def stat(sides, idx):
        out = {}
        for f, (ca, ma, cb, mb) in fields.items():
            c, m = np.where(sides, cb[idx], ca[idx]), np.where(sides, mb[idx], ma[idx])
            out[f] = float(c.sum() / m.sum()) if m.sum() else None
        return out
    return stat


def paired_significance(a: Sequence[Mapping], b: Sequence[Mapping], a_name: str = "A", b_name: str = "B",
                        resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """A vs B (records as in predictions.jsonl: key, references, prediction, scores[, findings,
    imageclef]) -> ``{"a", "b", "n", "resamples", "seed", "metrics": {metric: result}, "findings":
    {field: result}}`` with ``result = {"a", "b", "diff", "ci95": [lo, hi], "p", "statistic"}``."""
    from msmedcap.eval.findings import sample_verdicts
    from msmedcap.eval.scoring import tokenize

    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    keys = _check_pair(a, b, a_name, b_name)
    ra, rb = {str(r["key"]): r for r in a}, {str(r["key"]): r for r in b}
    n = len(keys)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    swaps = rng.random((resamples, n)) < 0.5
    out = {"a": a_name, "b": b_name, "n": n, "resamples": resamples, "seed": seed, "metrics": {}, "findings": {}}

    refs = {k: ra[k]["references"] for k in keys}
    gts, res_a = tokenize(refs, {k: ra[k]["prediction"] for k in keys})
    _, res_b = tokenize(refs, {k: rb[k]["prediction"] for k in keys})
    corpus = _Corpus(gts, res_a, res_b, keys)
    # Swapping predictions leaves the references, so CIDEr's document frequencies, as they are: a
    # permutation's CIDEr is the mean of the whole set's per-sample CIDEr (exactly), not so a resample's.
    cider_a, cider_b = (corpus.per_sample("cider", side) for side in ("a", "b"))
    fast = {"bleu": None, "cider": lambda sides, i: {"CIDEr": float(np.where(sides, cider_b[i], cider_a[i]).mean())}}
    for kind in ("bleu", "cider"):
        results = _test(lambda sides, sample, kind=kind: corpus.scores(kind, sides, sample), n, idx, swaps,
                        perm_stat=fast[kind])
        out["metrics"].update({m: {**r, "statistic": "corpus"} for m, r in results.items()})

    per_sample = {}
    for m in MEAN_METRICS:
        if all(m in (ra[k].get("scores") or {}) and m in (rb[k].get("scores") or {}) for k in keys):
            per_sample[m] = ([ra[k]["scores"][m] for k in keys], [rb[k]["scores"][m] for k in keys])
    for m in sorted({m for k in keys for m in (ra[k].get("imageclef") or {})}):
        va = [(ra[k].get("imageclef") or {}).get(m) for k in keys]
        vb = [(rb[k].get("imageclef") or {}).get(m) for k in keys]
        if all(v is not None for v in va + vb):  # concept F1 leaves out images without reference CUIs
            per_sample[f"imageclef/{m}"] = (va, vb)
    if per_sample:
        results = _test(_mean_stat(per_sample), n, idx, swaps)
        out["metrics"].update({m: {**r, "statistic": "mean"} for m, r in results.items()})

    verdicts_a = [sample_verdicts(ra[k].get("findings") or {}) for k in keys]
    verdicts_b = [sample_verdicts(rb[k].get("findings") or {}) for k in keys]
    fields = {}
    for f in sorted({f for v in verdicts_a + verdicts_b for f in v}):
        fields[f] = tuple(np.array(col, float) for col in (
            [bool(v.get(f)) for v in verdicts_a], [f in v for v in verdicts_a],
            [bool(v.get(f)) for v in verdicts_b], [f in v for v in verdicts_b]))
    if fields:
        results = _test(_accuracy_stat(fields), n, idx, swaps)
        out["findings"] = {f: {**r, "statistic": "accuracy"} for f, r in results.items()}
    return out


# --------------------------------------------------------------------------- files and tables
def compare_significance(paths: Sequence[str], resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> list:
    """Each run (a run directory or scores.json, as `msmedcap evaluate --compare` takes them) after the
    first against the first, from the predictions.jsonl beside each scores.json -> [result]."""
    from msmedcap.eval.io import read_predictions
    from msmedcap.eval.report import find_scores, run_names

    files = [find_scores(p).parent / "predictions.jsonl" for p in paths]
    runs = [read_predictions(f) for f in files]  # every file read and checked before any test
    names = run_names(paths)
    for i in range(1, len(runs)):
        _check_pair(runs[0], runs[i], str(files[0]), str(files[i]))
    return [paired_significance(runs[0], runs[i], names[0], names[i], resamples=resamples, seed=seed)
            for i in range(1, len(runs))]


def print_compare_significance(paths: Sequence[str], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                               markdown: bool = False, console=None) -> list:
    from msmedcap.eval.report import make_console

    console = console or make_console()
    results = compare_significance(paths, resamples=resamples, seed=seed)
    for r in results:
        if markdown:
            console.print(significance_markdown(r), markup=False, highlight=False)
        else:
            console.print(significance_table(r))
    return results


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "-" if v is None else f"{v:+.{digits}f}"


def _fmt_p(p: Optional[float]) -> str:
    return "-" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def rows(result: Mapping) -> list:
    """[(label, a, b, diff, ci text, p text)] of one pair: metrics, then findings fields."""
    from msmedcap.eval.findings import field_header
    from msmedcap.eval.report import HEADERS

    out = []
    for section, label in (("metrics", lambda m: HEADERS.get(m, m)), ("findings", lambda f: f"findings: {field_header(f)}")):
        for name, r in result[section].items():
            ci = "-" if r["ci95"] is None else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
            out.append((label(name), "-" if r["a"] is None else f"{r['a']:.4f}", "-" if r["b"] is None else f"{r['b']:.4f}",
                        _fmt(r["diff"]), ci, _fmt_p(r["p"])))
    return out


def title(result: Mapping) -> str:
    return (f"{result['b']} vs {result['a']}: difference (B - A), paired bootstrap 95% CI, approximate-randomization "
            f"p ({result['n']} samples, {result['resamples']} resamples, seed {result['seed']})")


def significance_table(result: Mapping):
    from rich.table import Table

    table = Table(title=title(result))
    for head in ("metric", result["a"], result["b"], "diff", "95% CI", "p"):
        table.add_column(head, justify="left" if head == "metric" else "right")
    for row in rows(result):
        table.add_row(*row)
    return table


def significance_markdown(result: Mapping) -> str:
    lines = [f"*{title(result)}*\n", f"| metric | {result['a']} | {result['b']} | diff | 95% CI | p |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return "\n".join(lines) + "\n"
