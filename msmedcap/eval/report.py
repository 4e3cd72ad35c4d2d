"""Score tables: one run's scores (overall, per domain, per source) and the paper-style comparison
of several runs (one row per model, one column per metric, one table per dataset); each with a
second table of findings accuracy (msmedcap.eval.findings) where the scores carry it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from msmedcap.eval.findings import field_header, has_lexicon, table_fields
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
    for label, s in _subsets(scores):
        table.add_row(label, str(s["n"]), *(fmt(s.get(m)) for m in METRICS))
    if scores.get("unavailable"):
        table.caption = "; ".join(f"{m} unavailable: {why}" for m, why in scores["unavailable"].items())
    return table


def fmt_share(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def findings_columns(blocks, lexicon: Optional[str] = "f1") -> list:
    """[(key, header, getter)] of the findings columns these blocks (subsets' "findings") call for:
    each field scored anywhere, the share of distinct predictions, and where any sample went to the
    lexicon its F1 (``lexicon="f1"``), precision/recall/F1 (``"prf"``) or nothing (None) per
    category. ``getter(block)`` -> value or None."""
    blocks = [b for b in blocks if b]

    def field(f):
        return lambda b: ((b.get("fields") or {}).get(f) or {}).get("accuracy")

    def lexicon_value(cat, what):
        return lambda b: ((b.get("lexicon") or {}).get(cat) or {}).get(what) if (b.get("lexicon") or {}).get("n") else None

    cols = [(f, field_header(f), field(f)) for f in table_fields(blocks)]
    cols.append(("distinct_predictions", "distinct", lambda b: (b.get("distinct_predictions") or {}).get("share")))
    if lexicon and has_lexicon(blocks):
        parts = (("precision", "P"), ("recall", "R"), ("f1", "F1")) if lexicon == "prf" else (("f1", "F1"),)
        for cat, short in (("modality", "mod"), ("laterality", "lat")):
            for what, head in parts:
                cols.append((f"lexicon_{cat}_{what}", f"{short} {head}", lexicon_value(cat, what)))
    return cols


def _subsets(scores: dict) -> list:
    rows = [("overall", scores["overall"])]
    for group in GROUPS:
        rows += [(f"{group}: {name}", s) for name, s in scores.get(group, {}).items()]
    return rows


def _subset_table(title: str, rows: list, cols: list) -> Table:
    table = Table(title=title)
    table.add_column("subset", style="bold", no_wrap=True)
    table.add_column("n", justify="right")
    for _, head, _ in cols:
        table.add_column(head, justify="right")
    for label, b, n in rows:
        table.add_row(label, str(n), *(fmt_share(get(b)) for _, _, get in cols))
    return table


def findings_table(scores: dict, title: str = "Findings accuracy") -> Optional[Table]:
    """Rows: overall, each domain, each source; columns: per-field accuracy and the share of
    distinct predictions. None when the scores carry no findings (a scores.json from before them)."""
    rows = [(label, s["findings"], s["findings"]["n"]) for label, s in _subsets(scores) if s.get("findings")]
    if not rows:
        return None
    table = _subset_table(title, rows, findings_columns((b for _, b, _ in rows), lexicon=None))
    notes = ["accuracy per field over the samples it applies to (n per field in scores.json); count, size, "
             "side, margin, all four: where the reference has a lesion; distinct: distinct predictions / samples"]
    unparsed = scores["overall"]["findings"].get("unparsed_references")
    if unparsed:
        notes.append(f"{unparsed} reference(s) do not parse and are left out of the fields")
    table.caption = "; ".join(notes)
    return table


def lexicon_table(scores: dict, title: str = "Lexicon agreement") -> Optional[Table]:
    """Rows: the subsets with samples that went to the lexicon; columns: its precision, recall and F1
    per category. None when no sample did."""
    rows = [(label, s["findings"], s["findings"]["lexicon"]["n"]) for label, s in _subsets(scores)
            if has_lexicon([s.get("findings")])]
    if not rows:
        return None
    cols = [c for c in findings_columns((b for _, b, _ in rows), lexicon="prf") if c[0].startswith("lexicon_")]
    table = _subset_table(title, rows, cols)
    table.caption = ("modality and laterality terms named by the prediction vs the references, micro over the "
                     "samples without a caption parser (n)")
    return table


def imageclef_table(scores: dict, title: str = "ImageCLEFmedical caption protocol") -> Optional[Table]:
    """Rows: each protocol metric and the two aggregates: value, samples, model, or why it was skipped.
    None when the scores carry no ImageCLEF block (eval.protocol=coco)."""
    block = scores.get("imageclef")
    if not block:
        return None
    table = Table(title=title)
    for head in ("metric", "value", "n", "model / skipped"):
        table.add_column(head, justify="right" if head in ("value", "n") else "left")
    for name, m in block["metrics"].items():
        table.add_row(name, fmt(m["value"]), str(m["n"]), m["model"] or "" if m["ran"] else f"skipped: {m['skipped']}")
    for name in ("relevance", "factuality"):
        agg = block[name]
        table.add_row(f"[bold]{name}[/bold]", fmt(agg["value"]), "", f"mean of {', '.join(agg['parts'])}"
                      + (f"; skipped: {agg['skipped']}" if agg["skipped"] else ""))
    table.caption = f"as {block['evaluator']['repository']} at {block['evaluator']['commit'][:12]} computes them"
    return table


def print_scores(scores: dict, title: str = "Caption scores", console: Optional[Console] = None) -> None:
    console = console or make_console()
    console.print(scores_table(scores, title))
    for table in (findings_table(scores, title=f"Findings · {title}"), lexicon_table(scores, title=f"Lexicon · {title}"),
                  imageclef_table(scores, title=f"ImageCLEFmedical · {title}")):
        if table is not None:
            console.print(table)


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


def run_names(paths: Sequence[str], names: Optional[Sequence[str]] = None) -> list:
    """The runs' row names: the model variant (``names``: as load_run gives them), with the run
    directory where a variant repeats (two seeds, two budgets)."""
    names = names or [load_run(p)[0] for p in paths]
    return [n if names.count(n) == 1 else f"{n} ({Path(p).name})" for n, p in zip(names, paths)]


def compare_rows(paths: Sequence[str]) -> dict:
    """{dataset: [(model, metrics)]}; datasets = "all", each domain, and each source any run has
    (a source that is its domain's only one is not repeated)."""
    runs = [load_run(p) for p in paths]
    runs = list(zip(run_names(paths, [n for n, _ in runs]), (s for _, s in runs)))
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


def _findings_rows(rows: list) -> tuple:
    """(columns, [(model, block or None)], best value per column) of a dataset's findings."""
    blocks = [(name, (r or {}).get("findings")) for name, r in rows]
    cols = findings_columns(b for _, b in blocks)
    best = {k: max((get(b) for _, b in blocks if b and get(b) is not None), default=None) for k, _, get in cols}
    return cols, blocks, best


def compare_findings_table(dataset: str, rows: list) -> Optional[Table]:
    if not any(r and r.get("findings") for _, r in rows):
        return None
    cols, blocks, best = _findings_rows(rows)
    table = Table(title=f"{dataset} · findings")
    table.add_column("model", style="bold")
    for _, head, _ in cols:
        table.add_column(head, justify="right")
    for name, b in blocks:
        if b is None:
            table.add_row(name, *("-" for _ in cols))
            continue
        cells = [(fmt_share(get(b)), get(b) is not None and get(b) == best[k]) for k, _, get in cols]
        table.add_row(f"{name} (n={b['n']})", *(f"[green]{c}[/green]" if top else c for c, top in cells))
    return table


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
        findings = compare_findings_table(dataset, rows)
        if findings is not None:
            tables.append(findings)
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
        if any(r and r.get("findings") for _, r in rows):
            cols, blocks, best = _findings_rows(rows)
            out.append(f"*{dataset} · findings*\n")
            out.append("| model | n | " + " | ".join(head for _, head, _ in cols) + " |")
            out.append("|---|---:|" + "---:|" * len(cols))
            for name, b in blocks:
                if b is None:
                    out.append(f"| {name} | 0 |" + " - |" * len(cols))
                    continue
                cells = [fmt_share(get(b)) for _, _, get in cols]
                cells = [f"**{c}**" if get(b) is not None and get(b) == best[k] else c
                         for c, (k, _, get) in zip(cells, cols)]
                out.append(f"| {name} | {b['n']} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def print_compare(paths: Sequence[str], markdown: bool = False, console: Optional[Console] = None) -> None:
    console = console or make_console()
    if markdown:
        console.print(compare_markdown(paths), markup=False, highlight=False)
        return
    for t in compare_tables(paths):
        console.print(t)
