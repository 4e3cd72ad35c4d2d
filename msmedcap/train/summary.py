"""What a training run reports: each stage's :class:`StageResult` (kept next to the stage's export, so
a resumed run still lists the stages finished before the interruption), ``summary.json`` and the
table printed at the end."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from msmedcap.atomic_files import atomic_write_text


@dataclass
class StageResult:
    stage: int
    steps_done: int = 0
    total_steps: int = 0
    resumed_from: Optional[str] = None
    stopped_by: Optional[str] = None
    seconds: float = 0.0
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    checkpoint: Optional[str] = None
    export: Optional[str] = None
    weights_sha256: Optional[str] = None
    skipped_samples: dict = field(default_factory=dict)
    overflow_skipped_steps: int = 0
    finished_earlier: bool = False  # read back from stageN/result.json: finished by an earlier invocation
    # validation (msmedcap.train.validation): the best step by train.keep_best_by {metric, mode, value, step,
    # export}, and the step train.early_stop_patience ended the stage at
    best: Optional[dict] = None
    early_stopped_at: Optional[int] = None


def write_stage_record(path: Path, result: StageResult) -> None:
    """A finished stage's result (``stageN/result.json``)."""
    atomic_write_text(path, json.dumps(result.__dict__, indent=2, default=str))


def read_stage_record(path: Path) -> Optional[StageResult]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    known = {k: v for k, v in data.items() if k in StageResult.__dataclass_fields__}
    return StageResult(**{**known, "finished_earlier": True})


def summarize(out: Path, world_size: int, results: list, evaluation: Optional[dict], plot: Optional[Path],
              seconds: float, tensorboard: bool) -> dict:
    """Write ``out/summary.json`` and print the run's table (rank 0)."""
    from rich.console import Console
    from rich.table import Table

    summary = {"output_dir": str(out), "seconds": seconds, "world_size": world_size,
               "stages": [r.__dict__ for r in results], "evaluation": evaluation,
               "metrics": str(out / "metrics.jsonl"), "loss_plot": str(plot) if plot else None,
               "tensorboard": str(out / "tensorboard") if tensorboard else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    table = Table(title=f"msmedcap training: {seconds:.0f} s on {world_size} rank(s)")
    for col in ("stage", "steps", "loss first → last", "skipped", "time", "export"):
        table.add_column(col)
    for r in results:
        note = f" (stopped by {r.stopped_by})" if r.stopped_by else (" (earlier run)" if r.finished_earlier else "")
        first = f"{r.first_loss:.3f}" if r.first_loss is not None else "-"
        last = f"{r.last_loss:.3f}" if r.last_loss is not None else "-"
        table.add_row(str(r.stage), f"{r.steps_done}/{r.total_steps}{note}", f"{first} → {last}",
                      f"{sum(r.skipped_samples.values())} samples, {r.overflow_skipped_steps} steps",
                      f"{r.seconds:.0f} s", r.export or r.checkpoint or "-")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs: no wrapping at 80 columns
    console.print(table)
    for r in results:
        if r.early_stopped_at is not None:
            console.print(f"stage {r.stage}: stopped early at step {r.early_stopped_at} (train.early_stop_patience)",
                          highlight=False)
        if r.best and r.best.get("step") is not None:
            console.print(f"stage {r.stage}: best {r.best['metric']} {r.best['value']:.4f} at step {r.best['step']}: "
                          f"{r.best['export']}", highlight=False)
    if evaluation:
        console.print(f"held-out CIDEr {evaluation['CIDEr']:.4f} (BLEU-4 {evaluation['Bleu_4']:.4f}) vs "
                      f"{evaluation['baseline_CIDEr']:.4f} ({evaluation['baseline_Bleu_4']:.4f}) for the most "
                      f"frequent training caption {evaluation['baseline_caption']!r}; {evaluation['scores']}",
                      highlight=False)
    for name, path in (("checkpoints", out / "stage*/checkpoints"), ("metrics", summary["metrics"]),
                       ("loss curve", summary["loss_plot"]), ("tensorboard", summary["tensorboard"]),
                       ("summary", out / "summary.json")):
        if path:
            console.print(f"{name:>12}: {path}", highlight=False)
    return summary
