"""The paper's Table 1 over seeds: each variant's evaluation scores (scores.json of one run per seed)
as mean ± sample standard deviation over the seeds, per n-gram metric and per findings field,
overall, per domain and per source. ``launch/compare_variants.py`` trains the runs and calls this;
it works on any scores.json files.

Layout of the aggregate (``table1.json``'s ``table``)::

    {"variants": [...],
     "overall": {variant: {"runs": k, "n": samples or None, "metrics": {metric: stats},
                           "findings": {column: stats}}},
     "domain": {name: {variant: ...}}, "source": {name: {variant: ...}}}

with ``stats = {"mean", "sd", "values"}`` (``values`` one per run, None where that run lacks it;
``sd`` the sample sd, None under two values) and findings columns as
:func:`msmedcap.eval.report.findings_columns` names them (field names, ``distinct_predictions``,
``lexicon_<category>_<precision|recall|f1>``).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Mapping, Optional, Sequence

from rich.table import Table

from msmedcap.eval.report import GROUPS, HEADERS, findings_columns
from msmedcap.eval.scoring import METRICS

VARIANTS = ("blip2", "sam-blip2", "msmedcap")


def run_dir(out, variant: str, seed: int) -> Path:
    return Path(out) / variant / f"seed{seed}"


def scores_file(run) -> Path:
    return Path(run) / "eval" / "scores.json"


def stats(values: Sequence[Optional[float]]) -> dict:
    present = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "sd": statistics.stdev(present) if len(present) >= 2 else None,
            "values": [None if v is None else float(v) for v in values]}


def _subset(scores: Optional[Mapping], group: Optional[str], name: Optional[str]) -> Optional[Mapping]:
    if scores is None:
        return None
    return scores.get("overall") if group is None else (scores.get(group) or {}).get(name)


def _variant_entry(subsets: Sequence[Optional[Mapping]]) -> dict:
    """One variant's stats on one subset from its runs' subset scores (None: the run lacks it)."""
    blocks = [(s or {}).get("findings") for s in subsets]
    cols = findings_columns([b for b in blocks if b], lexicon="prf")
    ns = {s.get("n") for s in subsets if s}
    return {
        "runs": sum(s is not None for s in subsets),
        "n": ns.pop() if len(ns) == 1 else None,  # None: missing, or the runs saw different samples
        "metrics": {m: stats([(s or {}).get(m) for s in subsets]) for m in METRICS},
        "findings": {key: stats([get(b) if b else None for b in blocks]) for key, _, get in cols},
    }


def aggregate(runs: Mapping[str, Sequence[Optional[Mapping]]]) -> dict:
    """runs: {variant: [scores dict (as in scores.json) or None, one per seed]} -> the aggregate."""
    out: dict = {"variants": list(runs), "overall": {v: _variant_entry([_subset(s, None, None) for s in runs[v]])
                                                     for v in runs}}
    for group in GROUPS:
        names = sorted({n for scores in runs.values() for s in scores if s for n in (s.get(group) or {})})
        out[group] = {name: {v: _variant_entry([_subset(s, group, name) for s in runs[v]]) for v in runs}
                      for name in names}
    return out


def load_runs(out, variants: Sequence[str], seeds: Sequence[int]) -> tuple:
    """({variant: [scores or None per seed]}, [(variant, seed, path) of the missing ones])."""
    runs, missing = {}, []
    for v in variants:
        runs[v] = []
        for seed in seeds:
            f = scores_file(run_dir(out, v, seed))
            if f.is_file():
                runs[v].append(json.loads(f.read_text()))
            else:
                runs[v].append(None)
                missing.append((v, seed, str(f)))
    return runs, missing


# --------------------------------------------------------------------------- tables
def fmt_stat(s: Optional[Mapping], digits: int) -> str:
    if not s or s.get("mean") is None:
        return "-"
    mean = f"{s['mean']:.{digits}f}"
    return mean if s.get("sd") is None else f"{mean} ± {s['sd']:.{digits}f}"


def _datasets(agg: Mapping, sources: bool = False) -> list:
    """[(title, {variant: entry})]: overall, each domain (and each source)."""
    out = [("all", agg["overall"])]
    for group in GROUPS if sources else ("domain",):
        out += [(f"{group}: {name}", entries) for name, entries in agg.get(group, {}).items()]
    return out


def _columns(entries: Mapping) -> tuple:
    """(metric columns, findings columns) with a value in some variant: [(key, header, kind)]."""
    metrics = [(m, HEADERS.get(m, m), "metrics") for m in METRICS
               if any(e["metrics"][m]["mean"] is not None for e in entries.values())]
    keys: list = []
    for e in entries.values():
        keys += [k for k in e["findings"] if k not in keys]
    present = [k for k in keys if any((e["findings"].get(k) or {}).get("mean") is not None for e in entries.values())]
    # the tables show the lexicon's F1 (precision and recall are in the JSON)
    present = [k for k in present if not k.startswith("lexicon_") or k.endswith("_f1")]
    from msmedcap.eval.findings import field_header

    def head(k):
        if k == "distinct_predictions":
            return "distinct"
        if k.startswith("lexicon_"):
            return f"{k.split('_')[1][:3]} F1"
        return field_header(k)

    return metrics, [(k, head(k), "findings") for k in present]


def _best(entries: Mapping, cols: list) -> dict:
    """The highest mean per column (for highlighting; none with a single variant)."""
    if len(entries) < 2:
        return {k: None for k, _, _ in cols}
    return {k: max((e[kind][k]["mean"] for e in entries.values() if (e[kind].get(k) or {}).get("mean") is not None),
                   default=None) for k, _, kind in cols}


def _label(variant: str, e: Mapping) -> str:
    n = f", n={e['n']}" if e.get("n") is not None else ""
    return f"{variant} ({e['runs']} seed{'s' if e['runs'] != 1 else ''}{n})"


def _sections(agg: Mapping, sources: bool = False):
    """Per dataset, the n-gram and the findings section: ``(title, cols, rows)`` with rows
    ``(variant, entry, [(cell text, is best mean), ...])``; what both renderings show."""
    for title, entries in _datasets(agg, sources):
        metrics, fcols = _columns(entries)
        for cols, suffix, digits in ((metrics, "", 4), (fcols, " · findings", 3)):
            if not cols:
                continue
            best = _best(entries, cols)
            rows = []
            for variant, e in entries.items():
                cells = []
                for k, _, kind in cols:
                    stat = e[kind].get(k)
                    cells.append((fmt_stat(stat, digits),
                                  bool(stat) and stat["mean"] is not None and stat["mean"] == best[k]))
                rows.append((variant, e, cells))
            yield f"{title}{suffix}", cols, rows


def table1_tables(agg: Mapping, sources: bool = False) -> list:
    """Rich tables: per dataset, one of the n-gram metrics and one of the findings (mean ± sd)."""
    tables = []
    for title, cols, rows in _sections(agg, sources):
        table = Table(title=f"{title} (mean ± sd over seeds)")
        table.add_column("model", style="bold", no_wrap=True)
        for _, head, _ in cols:
            table.add_column(head, justify="right")
        for variant, e, cells in rows:
            table.add_row(_label(variant, e), *(f"[green]{c}[/green]" if best else c for c, best in cells))
        tables.append(table)
    return tables


def table1_markdown(agg: Mapping, sources: bool = False) -> str:
    """The same as Markdown; the best mean per column in bold."""
    out = []
    for title, cols, rows in _sections(agg, sources):
        out.append(f"**{title}** (mean ± sd over seeds)\n")
        out.append("| model | seeds | n | " + " | ".join(h for _, h, _ in cols) + " |")
        out.append("|---|---:|---:|" + "---:|" * len(cols))
        for variant, e, cells in rows:
            n = "-" if e.get("n") is None else str(e["n"])
            out.append(f"| {variant} | {e['runs']} | {n} | " + " | ".join(f"**{c}**" if best else c for c, best in cells) + " |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- significance
def table1_significance(out, variants: Sequence[str], seeds: Sequence[int], resamples: int, seed: int = 0) -> list:
    """Each variant against the first, seed by seed (the same seed's runs saw the same samples):
    msmedcap.eval.significance's paired tests from the runs' predictions.jsonl, each result with
    ``"run_seed"`` (``"seed"`` is the tests'); a pair without both files is left out (its runs are listed as missing anyway)."""
    from msmedcap.eval.io import read_predictions
    from msmedcap.eval.significance import paired_significance

    results = []
    for s in seeds:
        files = {v: scores_file(run_dir(out, v, s)).with_name("predictions.jsonl") for v in variants}
        if not files[variants[0]].is_file():
            continue
        first = read_predictions(files[variants[0]])
        for v in variants[1:]:
            if files[v].is_file():
                r = paired_significance(first, read_predictions(files[v]), variants[0], v, resamples=resamples, seed=seed)
                results.append({**r, "run_seed": s})
    return results


def significance_markdown(results: Sequence[Mapping]) -> str:
    """Per variant pair, one table: a row per metric and findings field, a column per seed with the
    difference, its 95 % CI and the randomization p."""
    from msmedcap.eval.significance import rows

    out = []
    pairs: dict = {}
    for r in results:
        pairs.setdefault((r["a"], r["b"]), []).append(r)
    for (a, b), per_seed in pairs.items():
        out.append(f"**{b} vs {a}**: difference B - A [paired bootstrap 95% CI], approximate-randomization p "
                   f"({per_seed[0]['resamples']} resamples, test seed {per_seed[0]['seed']})\n")
        out.append("| metric | " + " | ".join(f"seed {r['run_seed']} (n={r['n']})" for r in per_seed) + " |")
        out.append("|---|" + "---:|" * len(per_seed))
        cells = [{row[0]: row for row in rows(r)} for r in per_seed]
        labels = list(dict.fromkeys(label for c in cells for label in c))
        for label in labels:
            out.append(f"| {label} | " + " | ".join(
                f"{c[label][3]} {c[label][4]}, p={c[label][5]}" if label in c else "-" for c in cells) + " |")
        out.append("")
    return "\n".join(out)
