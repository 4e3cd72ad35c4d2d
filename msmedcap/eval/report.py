"""Score tables: one run's scores (overall, per domain, per source) and the paper-style comparison
of several runs (one row per model, one column per metric, one table per dataset)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from msmedcap.eval.scoring import METRICS

GROUPS = ("domain", "source")
# Column headers as papers print them; scores.json keeps pycocoevalcap's own names.
HEADERS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "ROUGE_L": "ROUGE-L"}


def make_console() -> Console:
    """A terminal keeps its width; a log file or pipe gets room for every column (rich would use 80)."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=150)


def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def scores_table(scores: dict, title: str = "Caption scores") -> Table:
    """Rows: overall, each domain, each source; columns: sample count and every metric."""
    table = Table(title=title)
    table.add_column("subset", style="bold")
    table.add_column("n", justify="right")
    for m in METRICS:
        table.add_column(HEADERS.get(m, m), justify="right")
    rows = [("overall", scores["overall"])]
    for group in GROUPS:
        rows += [(f"{group}: {name}", s) for name, s in scores.get(group, {}).items()]
    for label, s in rows:
        table.add_row(label, str(s["n"]), *(fmt(s.get(m)) for m in METRICS))
    if scores.get("unavailable"):
        table.caption = "; ".join(f"{m} unavailable: {why}" for m, why in scores["unavailable"].items())
    return table


def print_scores(scores: dict, title: str = "Caption scores", console: Optional[Console] = None) -> None:
    (console or make_console()).print(scores_table(scores, title))


# --------------------------------------------------------------------------- comparison
def find_scores(path: str) -> Path:
    """A scores.json file, or the newest scores.json anywhere under a run directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such file or run directory")
    if (p / "scores.json").is_file():
        return p / "scores.json"
    found = sorted(p.rglob("scores.json"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{path}: no scores.json in this run directory (evaluate it first)")
    return found[-1]


def load_run(path: str) -> tuple:
    """(model name, scores dict) for a run; the name is the model variant when the config says it."""
    f = find_scores(path)
    try:
        scores = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e
    if "overall" not in scores:
        raise ValueError(f"{f}: not a msmedcap scores.json (no 'overall' entry)")
    variant = ((scores.get("config") or {}).get("model") or {}).get("variant")
    return variant or Path(path).name, scores


def compare_rows(paths: Sequence[str]) -> dict:
    """{dataset: [(model, metrics)]}; datasets = "all", each domain, and each source any run has
    (a source that is its domain's only one is not repeated)."""
    runs = [load_run(p) for p in paths]
    names = [n for n, _ in runs]
    # Same variant twice (two seeds, two budgets): tell the rows apart by their run directory.
    runs = [(n if names.count(n) == 1 else f"{n} ({Path(p).name})", s) for (n, s), p in zip(runs, paths)]
    datasets = {"all": [(n, s["overall"]) for n, s in runs]}
    sole = {}  # source -> its domain, where it is that domain's only source
    for group in GROUPS:
        for name in sorted({x for _, s in runs for x in s.get(group, {})}):
            if group == "source" and name in sole:
                continue
            datasets[f"{group}: {name}"] = [(n, s.get(group, {}).get(name)) for n, s in runs]
        if group == "domain":
            for _, s in runs:
                sole.update({src[0]: d for d, src in s.get("sources_by_domain", {}).items() if len(src) == 1})
    return datasets


def _best(rows: list) -> dict:
    """The best (highest) value of each metric among the rows, for highlighting."""
    return {m: max((r[m] for _, r in rows if r and r.get(m) is not None), default=None) for m in METRICS}


def compare_tables(paths: Sequence[str]) -> list:
    tables = []
    for dataset, rows in compare_rows(paths).items():
        table = Table(title=f"{dataset}")
        table.add_column("model", style="bold")
        for m in METRICS:
            table.add_column(HEADERS.get(m, m), justify="right")
        best = _best(rows)
        for name, r in rows:
            if r is None:
                table.add_row(name, *("-" for _ in METRICS))
                continue
            cells = [fmt(r.get(m)) for m in METRICS]
            cells = [f"[green]{c}[/green]" if r.get(m) is not None and r.get(m) == best[m] else c
                     for c, m in zip(cells, METRICS)]
            table.add_row(f"{name} (n={r['n']})", *cells)
        tables.append(table)
    return tables


def compare_markdown(paths: Sequence[str]) -> str:
    """The comparison as Markdown (for READMEs and notes); best value per column in bold."""
    out = []
    for dataset, rows in compare_rows(paths).items():
        best = _best(rows)
        out.append(f"**{dataset}**\n")
        out.append("| model | n | " + " | ".join(HEADERS.get(m, m) for m in METRICS) + " |")
        out.append("|---|---:|" + "---:|" * len(METRICS))
        for name, r in rows:
            if r is None:
                out.append(f"| {name} | 0 |" + " - |" * len(METRICS))
                continue
            cells = [fmt(r.get(m)) for m in METRICS]
            cells = [f"**{c}**" if r.get(m) is not None and r.get(m) == best[m] else c for c, m in zip(cells, METRICS)]
            out.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def print_compare(paths: Sequence[str], markdown: bool = False, console: Optional[Console] = None) -> None:
    console = console or make_console()
    if markdown:
        console.print(compare_markdown(paths), markup=False, highlight=False)
        return
    for t in compare_tables(paths):
        console.print(t)
