"""The training loop: stage 1 (ITC/ITM/ITG), stage 2 (captioning), then evaluation.

DeepSpeed owns the distributed part (ZeRO-2 over the trainable parameters only, gradient
accumulation, clipping, bf16/fp16, AdamW + warmup/cosine from the filled JSON); this module owns
the order of things, the data position, checkpoints, signals and logging. Output layout::

    OUTPUT_DIR/config.yaml  metrics.jsonl  loss.png  tensorboard/  summary.json  eval/
    OUTPUT_DIR/stage1/checkpoints/stepNNNNNNNN/ ...   (see checkpoint.py)
    OUTPUT_DIR/stage1/export/                          the finished stage's trainable weights + config
    OUTPUT_DIR/stage2/...
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from msmedcap.config import Config, ConfigError
from msmedcap.train.checkpoint import (CheckpointError, CheckpointManager, CheckpointWriteError, check_checkpoint,
                                       remove_leftovers, set_rng_states, usable_checkpoint)
from msmedcap.train.ds_config import bf16_supported, fill_ds_config
from msmedcap.train.metrics import MetricsLog, count_flops, peak_memory_mb
from msmedcap.train.schedule import warmup_cosine
from msmedcap.train.signals import StopRequest, fault_point


def stage_dir(cfg: Config, stage: int) -> Path:
    return Path(cfg.train.output_dir) / f"stage{stage}"


def export_dir(cfg: Config, stage: int) -> Path:
    return stage_dir(cfg, stage) / "export"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StageLoss(nn.Module):
    """What DeepSpeed wraps: ``forward(batch)`` is the model's loss for one stage (the engine's
    forward must run so ZeRO's backward hooks are armed). Wrapping scopes the model to the stage
    (``set_stage``: the trainables this stage does not train are frozen while it runs)."""

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model = model
        self.stage = stage
        if hasattr(model, "set_stage"):
            model.set_stage(stage)

    def forward(self, batch: dict) -> dict:
        return getattr(self.model, f"stage{self.stage}_loss")(batch)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Trainable tensors only. DeepSpeed's ``exclude_frozen_parameters`` drops frozen parameters by
        name, which misses a tied alias (OPT's ``lm_head.weight`` is ``embed_tokens.weight``)."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {f"{prefix}model.{n}" for n, _ in self.model.trainable_named_parameters()}
        for k in [k for k in full if k not in keep]:
            del full[k]
        return full


def param_groups(model: nn.Module, weight_decay: float, stage: Optional[int] = None) -> list:
    """The parameters ``stage`` trains (``model.stage_named_parameters``; by default the stage that
    ``StageLoss(model, stage)`` set, which freezes the others; every trainable for a model without
    stages); no weight decay on biases, norms and other 1-D tensors (BLIP-2)."""
    stage = stage if stage is not None else getattr(model, "stage", None)  # the stage StageLoss set
    scoped = stage is not None and hasattr(model, "stage_named_parameters")
    named = model.stage_named_parameters(stage) if scoped else model.trainable_named_parameters()
    frozen = [n for n, p in named if not p.requires_grad]
    if frozen:
        raise RuntimeError(f"param_groups: {len(frozen)} parameters to train have requires_grad=False "
                           f"({frozen[0]}, ...): wrap the model in StageLoss(model, {stage}) first")
    decay, no_decay = [], []
    for name, p in named:
        if p.ndim < 2 or name.endswith("bias") or "norm" in name.lower() or ".ln" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device (the model casts images to each frozen encoder's dtype)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def weights_digest(model: nn.Module) -> str:
    """sha256 over the trainable weights: equal on every rank when data parallelism is sound."""
    h = hashlib.sha256()
    for name, p in model.trainable_named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


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


def stage_record(cfg: Config, stage: int) -> Path:
    """A finished stage's StageResult, written next to its export, so that a resumed run's summary
    still lists the stages finished before the interruption."""
    return stage_dir(cfg, stage) / "result.json"


def read_stage_record(cfg: Config, stage: int) -> Optional[StageResult]:
    path = stage_record(cfg, stage)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    known = {k: v for k, v in data.items() if k in StageResult.__dataclass_fields__}
    return StageResult(**{**known, "finished_earlier": True})


class Trainer:
    def __init__(self, cfg: Config, ds_json: dict, ds_source: str):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.ds_json, self.ds_source = cfg, ds_json, ds_source
        self.acc = get_accelerator()
        from datetime import timedelta

        # A collective waits at most train.dist_timeout_s for a silent peer (torch's default: 30 min);
        # a peer that died is noticed at once (gloo/NCCL see its connections close).
        deepspeed.init_distributed(dist_backend=self.acc.communication_backend_name(),
                                   timeout=timedelta(seconds=cfg.train.dist_timeout_s))
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device_type = self.acc.device_name()
        if self.device_type == "cpu":
            self.device = torch.device("cpu")
            if "OMP_NUM_THREADS" not in os.environ:
                # torch defaults to every core per process: N ranks on one machine oversubscribe it, and
                # OpenMP's spinning threads then make small matmuls hundreds of times slower.
                local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
                torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
        else:
            self.acc.set_device(self.local_rank)
            self.device = torch.device(self.acc.device_name(self.local_rank))
        self.stop = StopRequest()  # before any DataLoader worker forks
        self.out = Path(cfg.train.output_dir)
        self.log: Optional[MetricsLog] = None

    # ------------------------------------------------------------------ helpers
    def barrier(self) -> None:
        self.dist.barrier()

    def print0(self, *args) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def ds_config(self, stage: int) -> dict:
        return fill_ds_config(self.ds_json, self.cfg, stage, self.world, self.device_type,
                              bf16_supported(self.acc), source=self.ds_source)

    # ------------------------------------------------------------------ planning
    def plan(self, stages: list, resume: Optional[str], overwrite: bool) -> dict:
        """stage -> None (train from scratch), a checkpoint Path (resume it), or "done" (skip)."""
        plan = {s: None for s in stages}
        if resume == "auto":
            for s in stages:
                if export_dir(self.cfg, s).is_dir():
                    plan[s] = "done"
                else:
                    plan[s] = self.agreed_checkpoint(stage_dir(self.cfg, s) / "checkpoints")
                    break
        elif resume:
            path = Path(resume)
            state_file = path / "trainer_state.json"
            if not state_file.is_file():
                raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (no trainer_state.json)")
            problem = [check_checkpoint(path) if self.rank == 0 else None]  # rank 0 reads, all ranks agree
            if self.world > 1:
                self.dist.broadcast_object_list(problem, src=0)
            if problem[0]:
                raise ConfigError(f"--resume {resume}: damaged checkpoint: {problem[0]}")
            stage = json.loads(state_file.read_text())["stage"]
            if stage not in stages:
                raise ConfigError(f"--resume {resume}: a stage-{stage} checkpoint, but train.stage={self.cfg.train.stage}")
            for s in stages:
                plan[s] = "done" if s < stage else (path if s == stage else None)
        else:
            earlier = [stage_dir(self.cfg, s) for s in stages if stage_dir(self.cfg, s).exists()]
            if earlier and not overwrite:
                raise ConfigError(f"{earlier[0]} holds an earlier run: pass --resume auto to continue it, "
                                  "--overwrite to start afresh, or another train.output_dir")
            self.barrier()  # everyone has looked before rank 0 deletes
            if earlier and self.rank == 0:
                for d in earlier:
                    shutil.rmtree(d)
        return plan

    def agreed_checkpoint(self, root: Path) -> Optional[Path]:
        """Rank 0 picks the newest checkpoint whose files match their manifest (naming each damaged
        one it passes over); every rank gets its choice, or the same CheckpointError."""
        choice: list = [None]
        if self.rank == 0:
            remove_leftovers(root)  # half-written saves and half-deleted prunes of a killed run
            try:
                choice = [usable_checkpoint(root, log=lambda msg: print(f"resume: {msg}", flush=True))]
            except CheckpointError as e:
                choice = [e]
        if self.world > 1:
            self.dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], CheckpointError):
            raise ConfigError(f"--resume auto: {choice[0]}")
        return Path(choice[0]) if choice[0] is not None else None

    # ------------------------------------------------------------------ one stage
    def build(self, stage: int) -> nn.Module:
        from msmedcap.models import build_model

        seed_everything(self.cfg.train.seed)  # identical frozen weights and initial trainables on all ranks
        init = export_dir(self.cfg, 1)
        if stage == 2 and init.is_dir():
            self.print0(f"stage 2 starts from stage 1's export {init}")
            model = build_model(self.cfg.model, init_trainables=False)
            model.load_trainable(init, strict=True)
            return model
        if stage == 2:
            self.print0(f"warning: no stage-1 export at {init}; stage 2 starts from the model config's weights")
        return build_model(self.cfg.model)

    def run_stage(self, stage: int, resume_from: Optional[Path]) -> StageResult:
        import deepspeed
        from msmedcap.data.loader import make_train_loader
        from msmedcap.models import save_trainable

        cfg, st = self.cfg, getattr(self.cfg.train, f"stage{stage}")
        result = StageResult(stage, total_steps=st.steps, resumed_from=str(resume_from) if resume_from else None)
        t_start = time.time()
        ds_cfg = self.ds_config(stage)
        model = self.build(stage)
        engine, _, _, scheduler = deepspeed.initialize(
            model=StageLoss(model, stage), model_parameters=param_groups(model, st.weight_decay, stage), config=ds_cfg,
            lr_scheduler=None if "scheduler" in ds_cfg else warmup_cosine(st))
        model.restore_frozen_dtype()  # the engine cast everything to its precision
        ckpts = CheckpointManager(stage_dir(cfg, stage) / "checkpoints", cfg.train.keep_last, self.rank, self.barrier)

        step, rng = 0, None
        if resume_from is not None:
            client = ckpts.load(engine, resume_from)
            step, rng = client["step"], client["rng"]
            if client.get("world_size") != self.world:
                self.print0(f"warning: checkpoint was written by {client.get('world_size')} ranks, now {self.world}: "
                            "the data order differs from an uninterrupted run")
            self.print0(f"stage {stage}: resumed from {resume_from} at step {step}")
        seed_everything(cfg.train.seed + 1000 * stage + self.rank)  # per-rank dropout / negative sampling
        # The loader's position counts micro-batches; it is a function of (seed, position, world size).
        batches = iter(make_train_loader(cfg, stage, self.rank, self.world, step * st.grad_accum))
        if rng is not None:
            set_rng_states(rng)  # after the loader started: starting it draws from torch's generator

        def client_state() -> dict:
            return {"stage": stage, "step": step, "world_size": self.world, "seed": cfg.train.seed,
                    "data": {"micro_batches": step * st.grad_accum, "num_workers": cfg.data.num_workers}, "config": cfg.to_dict()}

        def export(d: Path) -> None:
            save_trainable(model, d, cfg)

        if self.log:
            self.log.start_stage(stage, step, st.steps)
        window = Window()
        flops_per_micro = None
        t_window = time.time()
        while step < st.steps:
            for _ in range(st.grad_accum):
                batch = next(batches)
                inputs = to_device(batch, self.device)

                def fwd_bwd():
                    out = engine(inputs)
                    engine.backward(out["loss"])
                    fault_point("step.after_backward", stage, step + 1, self.rank)
                    return out

                if flops_per_micro is None:
                    out, flops_per_micro = count_flops(fwd_bwd)
                else:
                    out = fwd_bwd()
                engine.step()
                window.add(out, batch, stage)
            step += 1
            result.steps_done = step
            window.steps += 1
            if step % cfg.train.log_every == 0 or step == st.steps:
                stats = window.reduce(self.dist)
                if result.first_loss is None:
                    result.first_loss = stats["loss"]
                result.last_loss = stats["loss"]
                for k, v in stats["skipped"].items():
                    result.skipped_samples[k] = result.skipped_samples.get(k, 0) + v
                result.overflow_skipped_steps = int(engine.skipped_steps)
                dt = time.time() - t_window
                if self.log:
                    grad_norm = engine.get_global_grad_norm()
                    self.log.log({
                        "step": step, **stats["losses"],
                        "lr": float(scheduler.get_last_lr()[0]),
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "samples_per_s": stats["samples"] / dt, "tokens_per_s": stats["tokens"] / dt,
                        "flops_per_s": flops_per_micro * stats["micro_batches"] / dt,
                        "skipped_samples": stats["skipped"], "overflow_skipped_steps": result.overflow_skipped_steps,
                        "truncated_captions": {**stats["truncated"], "of": stats["samples"]},
                        "peak_memory_mb": peak_memory_mb(self.device_type), "elapsed_s": time.time() - t_start})
                window, t_window = Window(), time.time()
            fault_point("step.end", stage, step, self.rank)
            stopping = self.stop.agreed(self.device)
            if step % cfg.train.ckpt_every == 0 or step == st.steps or stopping:
                result.checkpoint = str(ckpts.save(engine, step, client_state(), export))
            if stopping:
                result.stopped_by = self.stop.name
                break
        if self.log:
            self.log.end_stage()
        result.weights_sha256 = self.check_replicas(model)
        if not result.stopped_by and self.rank == 0:
            final = export_dir(cfg, stage)
            tmp = final.with_name(".export.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_trainable(model, tmp, cfg)
            if final.exists():
                shutil.rmtree(final)
            fault_point("stage.before_export_rename", stage, step, self.rank)
            os.rename(tmp, final)  # the export's existence marks the stage as finished
            fault_point("stage.after_export", stage, step, self.rank)
        if not result.stopped_by:
            result.export = str(export_dir(cfg, stage))
        self.barrier()
        del batches
        result.seconds = time.time() - t_start
        if not result.stopped_by and self.rank == 0:
            from msmedcap.atomic_files import atomic_write_text

            atomic_write_text(stage_record(cfg, stage), json.dumps(result.__dict__, indent=2, default=str))
        self.model = model
        engine.destroy()
        del engine
        gc.collect()
        return result

    def check_replicas(self, model: nn.Module) -> str:
        """Every rank hashes its trainable weights; all must agree (ZeRO-2 keeps full replicas)."""
        digest = weights_digest(model)
        print(f"rank {self.rank}: trainable weights sha256 {digest}", flush=True)
        digests = [None] * self.world
        self.dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"trainable weights differ across ranks: {digests}")
        return digest

    # ------------------------------------------------------------------ the job
    def run(self, resume: Optional[str], overwrite: bool) -> int:
        cfg = self.cfg
        stages = [1, 2] if cfg.train.stage == "all" else [int(cfg.train.stage)]
        for s in stages:
            self.ds_config(s)  # a contradicting JSON fails before any work
        if cfg.train.eval_at_end and stages[-1] == 2:
            from msmedcap.eval.scoring import JavaMissing, require_java

            try:
                require_java()  # the final evaluation needs it: fail now, not after training
            except JavaMissing as e:
                raise ConfigError(f"train.eval_at_end=true: {e} (or set train.eval_at_end=false)") from e
        plan = self.plan(stages, resume, overwrite)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            self.log = MetricsLog(self.out)
        t0 = time.time()
        results = []
        self.model = None
        for s in stages:
            if plan[s] == "done":
                self.print0(f"stage {s}: already finished ({export_dir(cfg, s)}), skipping")
                earlier = read_stage_record(cfg, s)
                if earlier is not None:  # the summary keeps the stage's record (steps, losses, time, digest)
                    results.append(earlier)
                continue
            results.append(self.run_stage(s, plan[s]))
            if results[-1].stopped_by:
                break
        stopped = any(r.stopped_by for r in results)
        evaluation = None
        if not stopped and cfg.train.eval_at_end:
            evaluation = self.evaluate(stages[-1])
        plot = self.log.close() if self.log else None
        if self.rank == 0:
            self.summarize(results, evaluation, plot, time.time() - t0)
        # No closing barrier: the other ranks would wait in it for rank 0's scoring, which may take
        # longer than train.dist_timeout_s on a large eval set; nothing after this needs them.
        return 0

    def evaluate(self, stage: int) -> Optional[dict]:
        """The fused evaluation (msmedcap.eval) of the finished captioner, plus the most-frequent-
        training-caption baseline scored on the same references, so the numbers have a floor."""
        from msmedcap.eval.evaluate import evaluate
        from msmedcap.models import load_from_export

        if stage != 2:
            self.print0("evaluation skipped: stage 1 does not train the captioner (train.stage=2 or all does)")
            return None
        model = self.model
        if model is None:  # every stage was already finished: evaluate the last export
            model, _ = load_from_export(export_dir(self.cfg, stage))
        model.to(self.device)
        out = self.out / "eval"
        scores = evaluate(model, self.cfg, out, self.rank, self.world, checkpoint=str(export_dir(self.cfg, stage)))
        if self.rank != 0:
            return None
        baseline = most_frequent_caption_baseline(self.cfg, out / "predictions.jsonl")
        (out / "baseline_scores.json").write_text(json.dumps(baseline, indent=2))
        return {"scores": str(out / "scores.json"), "CIDEr": scores["overall"]["CIDEr"],
                "Bleu_4": scores["overall"]["Bleu_4"], "baseline_caption": baseline["caption"],
                "baseline_CIDEr": baseline["overall"]["CIDEr"], "baseline_Bleu_4": baseline["overall"]["Bleu_4"]}

    def summarize(self, results: list, evaluation: Optional[dict], plot: Optional[Path], seconds: float) -> None:
        from rich.console import Console
        from rich.table import Table

        summary = {"output_dir": str(self.out), "seconds": seconds, "world_size": self.world,
                   "stages": [r.__dict__ for r in results], "evaluation": evaluation,
                   "metrics": str(self.out / "metrics.jsonl"), "loss_plot": str(plot) if plot else None,
                   "tensorboard": str(self.out / "tensorboard") if self.log and self.log.tb else None}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        table = Table(title=f"msmedcap training: {seconds:.0f} s on {self.world} rank(s)")
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
        if evaluation:
            console.print(f"held-out CIDEr {evaluation['CIDEr']:.4f} (BLEU-4 {evaluation['Bleu_4']:.4f}) vs "
                          f"{evaluation['baseline_CIDEr']:.4f} ({evaluation['baseline_Bleu_4']:.4f}) for the most "
                          f"frequent training caption {evaluation['baseline_caption']!r}; {evaluation['scores']}",
                          highlight=False)
        for name, path in (("checkpoints", self.out / "stage*/checkpoints"), ("metrics", summary["metrics"]),
                           ("loss curve", summary["loss_plot"]), ("tensorboard", summary["tensorboard"]),
                           ("summary", self.out / "summary.json")):
            if path:
                console.print(f"{name:>12}: {path}", highlight=False)


class Window:
    """Sums over the micro-batches since the last log step, reduced over ranks when logged."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}
        self.samples = self.tokens = self.micro_batches = self.steps = 0
        self.skipped: dict = {}
        self.truncated: dict = {}  # captions cut by the loader, per side (batch["truncated"])

    def add(self, out: dict, batch: dict, stage: int) -> None:
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() != 1:
                continue
            key = "loss" if k == "loss" else (k if k.startswith("loss") else f"loss_{k}")
            self.sums[key] = self.sums.get(key, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.samples += len(batch["key"])
        mask = batch["text_attention_mask" if stage == 1 else "lm_attention_mask"]
        self.tokens += int(mask.sum())
        self.micro_batches += 1
        for reason, n in (batch.get("skipped") or {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
        for side, n in (batch.get("truncated") or {}).items():
            self.truncated[side] = self.truncated.get(side, 0) + int(n)

    def reduce(self, dist) -> dict:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.sums, self.counts, self.samples, self.tokens, self.micro_batches,
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


def training_captions(cfg: Config, limit: int = 20000) -> list:
    """Captions (``.txt`` members) of the training shards, up to ``limit``."""
    import tarfile

    from msmedcap.config import expand_braces, split_weighted_spec

    captions = []
    for spec in cfg.data.train:
        for path in expand_braces(split_weighted_spec(spec)[0]):
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.name.endswith(".txt"):
                        captions.append(tar.extractfile(member).read().decode("utf-8").strip())
                        if len(captions) >= limit:
                            return captions
    return captions


def most_frequent_caption_baseline(cfg: Config, predictions_path: Path) -> dict:
    """The most frequent training caption as every prediction, on the evaluation's references:
    PTB tokenization, BLEU and CIDEr exactly as the evaluation computes them (overall and per domain;
    METEOR's Java run is skipped: a floor needs no more)."""
    from collections import Counter

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from msmedcap.eval.findings import score_findings
    from msmedcap.eval.io import read_predictions
    from msmedcap.eval.scoring import group_keys, tokenize

    caption = Counter(training_captions(cfg)).most_common(1)[0][0]
    records = read_predictions(predictions_path)
    gts, res = tokenize({r["key"]: r["references"] for r in records}, {r["key"]: caption for r in records})

    def score(keys) -> dict:
        g, r = {k: gts[k] for k in keys}, {k: res[k] for k in keys}
        return {"Bleu_4": float(Bleu(4).compute_score(g, r, verbose=0)[0][3]),
                "CIDEr": float(Cider().compute_score(g, r)[0]), "n": len(keys)}

    by_domain = group_keys(records, ("domain",)).get("domain", {})
    out = {"caption": caption, "overall": score(list(gts)),
           "domain": {d: score(keys) for d, keys in sorted(by_domain.items())}}
    # the same floor for findings accuracy: what a captioner that ignores the image gets per field
    findings = score_findings([{**r, "prediction": caption} for r in records], {"domain": by_domain})
    out["overall"]["findings"] = findings["overall"]
    for d, block in findings.get("domain", {}).items():
        out["domain"][d]["findings"] = block
    return out


def train(cfg: Config, ds_json: dict, ds_source: str = "DeepSpeed config", resume: Optional[str] = None,
          overwrite: bool = False) -> int:
    import sys

    trainer = None
    try:
        trainer = Trainer(cfg, ds_json, ds_source)
        return trainer.run(resume, overwrite)
    except ConfigError as e:
        print(f"pretrain: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # damaged, or holding pickles: named, never loaded
        print(f"pretrain: checkpoint error: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:
        print(f"pretrain: {e}", file=sys.stderr, flush=True)
        _leave(1)
    except Exception as e:  # noqa: BLE001 - a lost peer or a full disk: say so, then leave without hanging
        rank = trainer.rank if trainer is not None else os.environ.get("RANK", "?")
        if is_collective_failure(e):
            print(f"pretrain: rank {rank}: lost contact with another rank ({type(e).__name__}: "
                  f"{first_line(e)}). A rank died, was killed or hangs (a silent rank is given up on after "
                  f"train.dist_timeout_s={cfg.train.dist_timeout_s} s). Every rank stops; restart the job with "
                  "--resume auto to continue from the newest complete checkpoint.", file=sys.stderr, flush=True)
            _leave(3)
        if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT outside a checkpoint write
            print(f"pretrain: rank {rank}: no space left on device: {e}. Checkpoints already written are "
                  "complete; free space, then restart with --resume auto.", file=sys.stderr, flush=True)
            _leave(1)
        import traceback

        traceback.print_exc()
        print(f"pretrain: rank {rank}: failed ({type(e).__name__}: {first_line(e)}); checkpoints already written "
              "are complete: --resume auto continues from the newest one.", file=sys.stderr, flush=True)
        _leave(1)


def _leave(code: int) -> None:
    """Exit now, without interpreter teardown: at exit multiprocessing terminates (SIGTERM) and joins
    the data loader's workers, which ignore SIGTERM (signals.py), so a normal exit after a failure
    mid-stage would wait forever; and destroying a process group whose peer is gone can block."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:600] if text else ""


def is_collective_failure(e: BaseException) -> bool:
    """An error from torch.distributed because a peer is gone or silent (gloo, NCCL, the store)."""
    import torch.distributed as dist

    from msmedcap.eval.gather import RankLost

    if isinstance(e, RankLost):
        return True
    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                              getattr(dist, "DistNetworkError", None)) if k is not None)
    if kinds and isinstance(e, kinds):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Gloo", "gloo", "NCCL", "timed out",
        "Timed out", "Broken pipe", "Socket Timeout"))
