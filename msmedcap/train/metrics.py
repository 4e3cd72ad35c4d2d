"""Rank 0's view of training: rich progress, ``metrics.jsonl``, TensorBoard, ``loss.png``.

One JSON object per log step (``stage``, ``step`` and the keys below); a resumed run first drops
the records a killed run wrote after its checkpoint, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from msmedcap.atomic_files import atomic_write_text

# Fields of every metrics.jsonl record besides stage/step and the per-head ``loss_*`` keys.
RECORD_FIELDS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "flops_per_s",
                 "skipped_samples", "overflow_skipped_steps", "peak_memory_mb", "elapsed_s")


def peak_memory_mb(device_type: str) -> float:
    """Peak accelerator memory on GPUs; the process's peak resident set on CPU."""
    if device_type != "cpu":
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def count_flops(fn) -> tuple:
    """Run ``fn()`` under torch's FLOP counter; return (result, FLOPs). Counts forward and
    backward as executed, frozen encoders included (a measurement, not a 6N rule of thumb)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, counter.get_total_flops()


def read_records(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Rank 0 only. ``start_stage`` before each stage; ``log`` per log step; ``close`` at the end."""

    def __init__(self, out_dir: str | Path, console: Optional[Console] = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.console = console or Console()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            pass
        self.progress: Optional[Progress] = None
        self.task = None
        self.stage = None

    def start_stage(self, stage: int, start_step: int, total_steps: int) -> None:
        """Keep the records before (stage, start_step); open the progress display."""
        kept = [r for r in read_records(self.path)
                if r["stage"] < stage or (r["stage"] == stage and r["step"] <= start_step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.stage = stage
        self.progress = Progress(
            TextColumn(f"[bold]stage {stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="starting")
        self.progress.start()

    def log(self, record: dict) -> None:
        record = {"stage": self.stage, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("stage", "step") and math.isfinite(v):
                    self.tb.add_scalar(f"stage{self.stage}/{k}", v, step)
        losses = " ".join(f"{k[5:] or 'loss'} {v:.3f}" for k, v in record.items()
                          if k.startswith("loss") and "/" not in k)  # per-branch heads: in the file only
        skipped = sum(record.get("skipped_samples", {}).values())
        info = (f"{losses} | lr {record['lr']:.2e} | {record['samples_per_s']:.1f} samples/s"
                f" | skipped {skipped} samples, {record['overflow_skipped_steps']} steps")
        self.progress.update(self.task, completed=step, info=info)
        if not self.console.is_terminal:  # logs and batch jobs: a plain line per log step
            total = self.progress.tasks[0].total
            print(f"stage {self.stage} step {step}/{total} | {info}", flush=True)

    def end_stage(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> Optional[Path]:
        self.end_stage()
        if self.tb is not None:
            self.tb.close()
        return plot_losses(self.path, self.out_dir / "loss.png")


def plot_losses(metrics_path: Path, out: Path) -> Optional[Path]:
    """One panel per stage: total loss and each head's loss against the step."""
    records = read_records(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r["stage"] for r in records})
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rs = [r for r in records if r["stage"] == stage]
        keys = sorted({k for r in rs for k in r if k.startswith("loss")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in rs if k in r]
            ax.plot(*zip(*pts), label=k, linewidth=2 if k == "loss" else 1)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
