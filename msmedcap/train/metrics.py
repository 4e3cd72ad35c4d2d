"""Rank 0's view of training: rich progress, ``metrics.jsonl``, TensorBoard, ``loss.png``; the log
window every rank sums its micro-batches into.

One JSON object per log step (``stage``, ``step`` and the keys below), and one per validation
(``stage``, ``step`` and ``val/...`` keys, msmedcap.train.validation); a resumed run first drops the
records a killed run wrote after its checkpoint, so the file reads as one uninterrupted run.
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
                 "skipped_samples", "overflow_skipped_steps", "truncated_captions", "peak_memory_mb", "elapsed_s")


def peak_memory_mb(device) -> float:
    """Peak accelerator memory on GPUs (``max_memory_allocated``); the process's peak resident set
    (``ru_maxrss``, libraries included) on CPU. ``device``: a torch.device or its type (``"cuda"``)."""
    kind = device if isinstance(device, str) else device.type
    if kind == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    if kind == "cuda" and not isinstance(device, str):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().max_memory_allocated() / 2**20


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
        self.train_info = self.val_info = ""  # the progress line: the last log step's numbers, the last validation's

    def start_stage(self, stage: int, start_step: int, total_steps: int) -> None:
        """Keep the records before (stage, start_step); open the progress display."""
        kept = [r for r in read_records(self.path)
                if r["stage"] < stage or (r["stage"] == stage and r["step"] <= start_step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.stage, self.train_info, self.val_info = stage, "", ""
        self.progress = Progress(
            TextColumn(f"[bold]stage {stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="starting")
        self.progress.start()

    def _write(self, record: dict) -> dict:
        """The record in metrics.jsonl and its numbers in TensorBoard (``stageN/KEY``)."""
        record = {"stage": self.stage, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("stage", "step") and math.isfinite(v):
                    self.tb.add_scalar(f"stage{self.stage}/{k}", v, record["step"])
        return record

    def log_validation(self, record: dict) -> None:
        """One validation's record (``val/...`` keys); its main numbers join the progress line."""
        record = self._write(record)
        shown = [(k[4:], record.get(k)) for k in ("val/loss", "val/cider", "val/findings")]
        info = "val " + " ".join(f"{name} {v:.3f}" for name, v in shown if isinstance(v, (int, float)))
        if record.get("val/best_step") is not None:
            info += f" (best {record['val/best']:.3f} @ {record['val/best_step']})"
        self.val_info = info
        self.progress.update(self.task, info=f"{self.train_info} | {info}" if self.train_info else info)
        if not self.console.is_terminal:
            print(f"stage {self.stage} step {record['step']}/{self.progress.tasks[0].total} | {info}", flush=True)

    def log(self, record: dict) -> None:
        record = self._write(record)
        step = record["step"]
        losses = " ".join(f"{k[5:] or 'loss'} {v:.3f}" for k, v in record.items()
                          if k.startswith("loss") and "/" not in k)  # per-branch heads: in the file only
        if "n_cf" in record:
            losses += f" counterfactuals {record['n_cf']:.1f}"
        skipped = sum(record.get("skipped_samples", {}).values())
        info = (f"{losses} | lr {record['lr']:.2e} | {record['samples_per_s']:.1f} samples/s"
                f" | skipped {skipped} samples, {record['overflow_skipped_steps']} steps")
        self.train_info = info
        shown = f"{info} | {self.val_info}" if self.val_info else info  # logs: the validation has its own line
        self.progress.update(self.task, completed=step, info=shown)
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
        keys = sorted({k for r in rs for k in r if k.startswith("loss")}) + (["val/loss"] if any(
            r.get("val/loss") is not None for r in rs) else [])
        for k in keys:
            pts = [(r["step"], r[k]) for r in rs if r.get(k) is not None]
            ax.plot(*zip(*pts), label=k, linewidth=2 if k == "loss" else 1)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class Window:
    """Sums over the micro-batches since the last log step, reduced over ranks when logged. Losses stay
    on the device until then (float64 sums, as the Python floats they were: no host sync per micro-batch)."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}
        self.samples = self.tokens = self.micro_batches = self.steps = 0
        self.skipped: dict = {}
        self.truncated: dict = {}  # captions cut by the loader, per side (batch["truncated"])

    def add(self, out: dict, batch: dict, stage: int) -> None:
        """``out``: the model's losses (scalars); ``batch``: the host batch (counts, masks)."""
        import torch

        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() != 1:
                continue
            count = k.startswith("n_") or "/n_" in k  # counts per micro-batch (e.g. n_cf, sam/n_cf), not losses
            key = k if k.startswith("loss") or count else f"loss_{k}"
            v = v.detach().reshape(()).double() if isinstance(v, torch.Tensor) else float(v)
            self.sums[key] = self.sums[key] + v if key in self.sums else v
            self.counts[key] = self.counts.get(key, 0) + 1
        self.samples += len(batch["key"])
        mask = batch["text_attention_mask" if stage == 1 else "lm_attention_mask"]
        self.tokens += int(mask.sum())
        self.micro_batches += 1
        for reason, n in (batch.get("skipped") or {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
        for side, n in (batch.get("truncated") or {}).items():
            self.truncated[side] = self.truncated.get(side, 0) + int(n)

    def host_sums(self) -> dict:
        """The loss sums as Python floats (one device-to-host copy for all of them)."""
        import torch

        on_device = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        sums = dict(self.sums)
        if on_device:
            sums.update(zip(on_device, torch.stack([self.sums[k] for k in on_device]).tolist()))
        return sums

    def reduce(self, dist) -> dict:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.host_sums(), self.counts, self.samples, self.tokens, self.micro_batches,
                                       self.skipped, self.truncated))
        sums, counts, skipped, truncated = {}, {}, {}, {}
        samples = tokens = micro = 0
        for s, c, n, t, m, sk, tr in parts:
            for k, v in tr.items():
                truncated[k] = truncated.get(k, 0) + v
            for k in s:
                sums[k] = sums.get(k, 0.0) + s[k]
                counts[k] = counts.get(k, 0) + c[k]
            for k, v in sk.items():
                skipped[k] = skipped.get(k, 0) + v
            samples, tokens, micro = samples + n, tokens + t, micro + m
        losses = {k: sums[k] / counts[k] for k in sorted(sums, key=lambda k: (k != "loss", k))}
        return {"losses": losses, "loss": losses["loss"], "samples": samples, "tokens": tokens,
                "micro_batches": micro, "skipped": skipped, "truncated": truncated}
