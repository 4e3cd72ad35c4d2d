"""The training job: stage 1 (ITC/ITM/ITG), stage 2 (captioning), then evaluation.

The engine is built by engine.py (DeepSpeed: ZeRO-2, accumulation, clipping, precision, AdamW + LR
schedule), checkpoints and the stage's export by checkpoint.py, the report by summary.py; this module
owns the order of things: which stages run or resume (:meth:`Trainer.plan`), and one stage's
setup, steps, log steps and finish (:class:`StageRun`). Output layout::

    OUTPUT_DIR/config.yaml  metrics.jsonl  loss.png  tensorboard/  summary.json  eval/
    OUTPUT_DIR/stage1/checkpoints/stepNNNNNNNN/ ...   (see checkpoint.py)
    OUTPUT_DIR/stage1/export/                          the finished stage's trainable weights + config
    OUTPUT_DIR/stage1/best/                            the best validated step's (train.keep_best_by)
    OUTPUT_DIR/stage2/...
    OUTPUT_DIR/feature-cache/                          with model.feature_cache=auto (models/feature_cache.py)
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from msmedcap.config import Config, ConfigError
from msmedcap.train.checkpoint import (CheckpointError, CheckpointManager, CheckpointWriteError, DataPosition,
                                       TrainState, check_checkpoint, read_train_state, remove_leftovers,
                                       set_rng_states, usable_checkpoint)
from msmedcap.train.engine import (StageLoss, build_engine, master_weights_into, param_groups,  # noqa: F401 (re-exported)
                                   stage_ds_config)
from msmedcap.train.metrics import MetricsLog, Window, count_flops, peak_memory_mb  # noqa: F401 (Window re-exported)
from msmedcap.train.signals import StopRequest, fault_point
from msmedcap.train.summary import StageResult, read_stage_record, summarize, write_stage_record
from msmedcap.train.validation import Validator
from msmedcap.train.world import (  # noqa: F401 (to_device re-exported)
    first_line, init_world, is_collective_failure, leave_now, to_device)


def stage_dir(cfg: Config, stage: int) -> Path:
    return Path(cfg.train.output_dir) / f"stage{stage}"


def export_dir(cfg: Config, stage: int) -> Path:
    return stage_dir(cfg, stage) / "export"


def stage_record(cfg: Config, stage: int) -> Path:
    """Where a finished stage's StageResult is kept (next to its export)."""
    return stage_dir(cfg, stage) / "result.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the trainable weights: equal on every rank when data parallelism is sound."""
    h = hashlib.sha256()
    for name, p in model.trainable_named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def start_loader(make_loader: Callable[[], object], stop: StopRequest, rng: Optional[dict]):
    """The training loader's iterator, started under its two ordering rules: the stop handler is
    installed before its workers fork (they inherit it and ignore the signal, so a job-wide SIGTERM
    leaves them alive for the checkpoint), and a resumed run's RNG states are applied after it started
    (starting it draws from torch's generator)."""
    if not stop.installed():
        raise RuntimeError("the stop-signal handler must be installed before the data loader's workers fork")
    batches = iter(make_loader())
    if rng is not None:
        set_rng_states(rng)
    return batches


class Trainer:
    def __init__(self, cfg: Config, ds_json: dict, ds_source: str):
        self.cfg, self.ds_json, self.ds_source = cfg, ds_json, ds_source
        self.world = init_world(cfg.train.dist_timeout_s)
        self.rank = self.world.rank
        self.dist = torch.distributed
        self.stop = StopRequest()  # before any DataLoader worker forks (start_loader checks)
        self.out = Path(cfg.train.output_dir)
        if cfg.model.feature_cache == "auto":  # the run's own cache: its images repeat every epoch
            cfg.model.feature_cache = str(self.out / "feature-cache")
        self.log: Optional[MetricsLog] = None
        self.model: Optional[nn.Module] = None  # the last trained stage's, for the evaluation

    def print0(self, *args) -> None:
        self.world.print0(*args)

    def ds_config(self, stage: int) -> dict:
        return stage_ds_config(self.ds_json, self.cfg, stage, self.world.size, source=self.ds_source)

    def resolve_lm_dtype(self) -> None:
        """``model.lm.dtype: auto`` becomes stage 2's engine precision (the stage whose gradient crosses
        the LM), recorded in the run's config and exports so evaluations rebuild the LM as it trained;
        an fp16 LM under another engine has no loss scale for that gradient: a config error."""
        from msmedcap.train.ds_config import precision_of

        lm, precision = self.cfg.model.lm, precision_of(self.ds_config(2))
        if lm.dtype == "auto":
            lm.dtype = precision
        elif lm.dtype == "fp16" and precision != "fp16":
            raise ConfigError(f"model.lm.dtype=fp16 under a {precision} engine: the stage-2 gradient would cross the "
                              "fp16 LM with no loss scale (small gradients flush to zero); set model.lm.dtype=auto "
                              "(the engine's dtype) or train.precision=fp16 (dynamic loss scaling)")
        self.print0(f"precision: trainables {precision} (engine), frozen LM {lm.dtype}, frozen encoders "
                    f"model.frozen_dtype={self.cfg.model.frozen_dtype}")

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
            if self.world.size > 1:
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
            self.world.barrier()  # everyone has looked before rank 0 deletes
            if earlier and self.rank == 0:
                for d in earlier:
                    shutil.rmtree(d)
        for path in (p for p in plan.values() if isinstance(p, Path)):  # refused before any model is built
            read_train_state(path).check_continues(self.data_position(), path)
        return plan

    def data_position(self) -> DataPosition:
        """What this run's data stream is a function of (a stage starts at micro-batch 0)."""
        return DataPosition(self.cfg.train.seed, self.world.size, self.cfg.data.num_workers)

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
        if self.world.size > 1:
            self.dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], CheckpointError):
            raise ConfigError(f"--resume auto: {choice[0]}")
        return Path(choice[0]) if choice[0] is not None else None

    # ------------------------------------------------------------------ one stage
    def build(self, stage: int) -> nn.Module:
        from msmedcap.models import build_model
        from msmedcap.models.lora import lora_parameter_names

        seed_everything(self.cfg.train.seed)  # identical frozen weights and initial trainables on all ranks
        init = export_dir(self.cfg, 1)
        if stage == 2 and init.is_dir():
            self.print0(f"stage 2 starts from stage 1's export {init}")
            model = build_model(self.cfg.model, init_trainables=False)
            # stage 1 builds no LM: the LM's LoRA starts at its initialisation (B = 0, the LM unchanged)
            model.load_trainable(init, strict=True, fresh=lora_parameter_names(model))
        else:
            if stage == 2:
                self.print0(f"warning: no stage-1 export at {init}; stage 2 starts from the model config's weights")
            model = build_model(self.cfg.model, with_lm=stage == 2)  # stage 1 never runs the LM
        lora = lora_parameter_names(model)
        if lora:
            count = sum(model.get_parameter(n).numel() for n in lora)
            self.print0(f"stage {stage}: LoRA on the LM (model.lm.lora): {count} trainable parameters in {len(lora)} tensors")
        if self.cfg.train.activation_checkpointing:
            model.checkpoint_activations()
        return model

    def run_stage(self, stage: int, resume_from: Optional[Path]) -> StageResult:
        return StageRun(self, stage, resume_from).run()

    def check_replicas(self, model: nn.Module) -> str:
        """Every rank hashes its trainable weights; all must agree (ZeRO-2 keeps full replicas)."""
        digest = weights_digest(model)
        print(f"rank {self.rank}: trainable weights sha256 {digest}", flush=True)
        digests = [None] * self.world.size
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
        self.resolve_lm_dtype()
        if 2 in stages:
            from msmedcap.models.loading import with_lm_architecture
            from msmedcap.models.lora import check_lora

            check_lora(with_lm_architecture(cfg.model))  # model.lm.lora against the LM's modules, before stage 1
        scoring = [(key, off) for key, off, needed in (
            ("train.eval_at_end=true", "train.eval_at_end=false", cfg.train.eval_at_end and stages[-1] == 2),
            (f"train.eval_generate_every={cfg.train.eval_generate_every}", "train.eval_generate_every=0",
             cfg.train.eval_generate_every and 2 in stages)) if needed]
        if scoring:  # pycocoevalcap's tokenizer runs in Java: fail now, not after training
            from msmedcap.eval.scoring import JavaMissing, require_java

            try:
                require_java()
            except JavaMissing as e:
                key, off = scoring[0]
                raise ConfigError(f"{key}: {e} (or set {off})") from e
        if cfg.train.eval_at_end and stages[-1] == 2 and cfg.eval.protocol == "imageclef":
            from msmedcap.eval.imageclef import check_settings

            check_settings(cfg.eval.imageclef)  # its models and files, before training
        plan = self.plan(stages, resume, overwrite)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            self.log = MetricsLog(self.out)
        t0 = time.time()
        results = []
        for s in stages:
            if plan[s] == "done":
                self.print0(f"stage {s}: already finished ({export_dir(cfg, s)}), skipping")
                earlier = read_stage_record(stage_record(cfg, s))
                if earlier is not None:  # the summary keeps the stage's record (steps, losses, time, digest)
                    results.append(earlier)
                continue
            self.model = None  # the previous stage's model is not kept while this one trains
            gc.collect()
            results.append(self.run_stage(s, plan[s]))
            if results[-1].stopped_by:
                break
        stopped = any(r.stopped_by for r in results)
        evaluation = None
        if not stopped and cfg.train.eval_at_end:
            evaluation = self.evaluate(stages[-1])
        plot = self.log.close() if self.log else None
        if self.rank == 0:
            summarize(self.out, self.world.size, results, evaluation, plot, time.time() - t0,
                      tensorboard=bool(self.log and self.log.tb))
        # No closing barrier: the other ranks would wait in it for rank 0's scoring, which may take
        # longer than train.dist_timeout_s on a large eval set; nothing after this needs them.
        return 0

    def evaluate(self, stage: int) -> Optional[dict]:
        """The finished captioner's evaluation with the most-frequent-caption floor (msmedcap.eval.baseline)."""
        from msmedcap.eval.baseline import evaluate_with_baseline
        from msmedcap.models import load_from_export

        if stage != 2:
            self.print0("evaluation skipped: stage 1 does not train the captioner (train.stage=2 or all does)")
            return None
        model = self.model
        if model is None:  # every stage was already finished: evaluate the last export
            model, _ = load_from_export(export_dir(self.cfg, stage))
        model.to(self.world.device)
        return evaluate_with_baseline(model, self.cfg, self.out / "eval", self.rank, self.world.size,
                                      checkpoint=str(export_dir(self.cfg, stage)))


class StageRun:
    """One stage: :meth:`setup` (model, engine, resume, loader), then :meth:`step` / :meth:`log` /
    checkpoint until the last step or an agreed stop, then :meth:`finish`."""

    def __init__(self, trainer: Trainer, stage: int, resume_from: Optional[Path]):
        self.trainer, self.cfg, self.world, self.stage = trainer, trainer.cfg, trainer.world, stage
        self.st = getattr(self.cfg.train, f"stage{stage}")
        self.result = StageResult(stage, total_steps=self.st.steps,
                                  resumed_from=str(resume_from) if resume_from else None)
        self.t_start = time.time()
        self.setup(resume_from)

    def setup(self, resume_from: Optional[Path]) -> None:
        from msmedcap.data.loader import make_train_loader
        from msmedcap.models import save_trainable

        cfg, stage, world = self.cfg, self.stage, self.world
        ds_cfg = self.trainer.ds_config(stage)
        self.model = model = self.trainer.build(stage)
        self.preflight(ds_cfg)
        self.engine, self.scheduler = build_engine(model, cfg, stage, ds_cfg)
        self.ckpts = CheckpointManager(stage_dir(cfg, stage) / "checkpoints", cfg.train.keep_last, world.rank,
                                       world.barrier, every=cfg.train.ckpt_every,
                                       export=lambda d: save_trainable(model, d, cfg), export_dir=export_dir(cfg, stage))
        self.state = TrainState(stage, 0, self.trainer.data_position(), config=cfg.to_dict())
        self.validator = Validator(cfg, stage, world, model, self.trainer.log, stage_dir(cfg, stage) / "best") \
            if cfg.train.eval_every else None
        if resume_from is not None:  # refused when written with another seed, world size or worker count
            loaded = self.ckpts.load(self.engine, resume_from, expect=self.state.data)
            self.state.step, self.state.data.micro_batches, self.state.rng = loaded.step, loaded.data.micro_batches, loaded.rng
            if self.validator:  # the best-so-far record continues
                self.validator.restore(loaded.validation)
            world.print0(f"stage {stage}: resumed from {resume_from} at step {self.state.step}")
        if self.validator:
            self.state.validation = self.validator.record
        seed_everything(cfg.train.seed + 1000 * stage + world.rank)  # per-rank dropout / negative sampling
        # The loader's position counts micro-batches; with the seed, world size and workers it fixes the stream.
        self.batches = start_loader(
            lambda: make_train_loader(cfg, stage, world.rank, world.size, self.state.data.micro_batches,
                                      feature_stores=model.feature_cache.reader_spec() if model.feature_cache else None),
            self.trainer.stop, self.state.rng)
        self.state.rng = None  # applied; a checkpoint takes the live states
        if self.trainer.log:
            self.trainer.log.start_stage(stage, self.state.step, self.st.steps)
        self.window, self.t_window, self.flops_per_micro = Window(), time.time(), None

    def preflight(self, ds_cfg: dict) -> None:
        """On a GPU (or with train.memory_limit_gib): the planner's estimate of this stage at its micro
        batch, measured on the model before the engine exists; a micro batch that cannot fit stops here
        (ConfigError) naming the largest that does."""
        from msmedcap.bench.plan import GIB, preflight
        from msmedcap.train.ds_config import precision_of

        limit, dev = self.cfg.train.memory_limit_gib, self.world.device
        if limit is None and dev.type == "cuda":
            limit = torch.cuda.get_device_properties(dev).total_memory / GIB
        if limit is None:
            return
        self.model.to(dev)
        plan = preflight(self.model, self.cfg, self.stage, self.world.size, dev, limit, precision_of(ds_cfg))
        self.world.print0(f"stage {self.stage} preflight: ~{plan['peak_gib_at_micro_batch']:.2f} GiB per rank at micro "
                          f"batch {plan['micro_batch']} of {limit:g} GiB (largest that fits: {plan['largest_micro_batch']})")

    def run(self) -> StageResult:
        total, rank = self.st.steps, self.world.rank
        while self.state.step < total:
            self.step()
            step = self.state.step
            at_log = step % self.cfg.train.log_every == 0 or step == total
            if at_log:
                self.log()
            early_stop = False
            if self.validator and self.validator.due(step, total):  # before the checkpoint: it keeps the record
                early_stop = self.validator.run(step, total)
                self.state.validation = self.validator.record
            fault_point("step.end", self.stage, step, rank)
            # the stop flag is a collective: agreed at log and checkpoint steps only
            stopping = (at_log or self.ckpts.due(step, total)) and self.trainer.stop.agreed(self.world.device)
            if self.ckpts.due(step, total, stopping):
                self.result.checkpoint = str(self.ckpts.save(self.engine, self.state))
            if stopping:
                self.result.stopped_by = self.trainer.stop.name
                break
            if early_stop:
                self.result.early_stopped_at = step
                self.world.print0(f"stage {self.stage}: stopping early at step {step}: no better "
                                  f"{self.validator.keep.metric} in {self.validator.patience} validations")
                break
        return self.finish()

    def step(self) -> None:
        """One optimizer step: ``grad_accum`` micro-batches forward and backward (the engine steps the
        optimizer at the accumulation boundary); their losses are summed on the device."""
        engine, stage, step = self.engine, self.stage, self.state.step
        for _ in range(self.st.grad_accum):
            batch = next(self.batches)
            inputs = to_device(batch, self.world.device)

            def fwd_bwd():
                out = engine(inputs)
                engine.backward(out["loss"])
                fault_point("step.after_backward", stage, step + 1, self.world.rank)
                return out

            if self.flops_per_micro is None:
                out, self.flops_per_micro = count_flops(fwd_bwd)
            else:
                out = fwd_bwd()
            engine.step()
            self.window.add(out, batch, stage)
        self.state.step += 1
        self.state.data.micro_batches += self.st.grad_accum
        self.result.steps_done = self.state.step
        self.window.steps += 1

    def log(self) -> None:
        """Reduce the window over ranks (the only host sync of the losses) and log it on rank 0."""
        stats, result, engine = self.window.reduce(self.trainer.dist), self.result, self.engine
        if result.first_loss is None:
            result.first_loss = stats["loss"]
        result.last_loss = stats["loss"]
        for k, v in stats["skipped"].items():
            result.skipped_samples[k] = result.skipped_samples.get(k, 0) + v
        result.overflow_skipped_steps = int(engine.skipped_steps)
        dt = time.time() - self.t_window
        if self.trainer.log:
            grad_norm = engine.get_global_grad_norm()
            self.trainer.log.log({
                "step": self.state.step, **stats["losses"],
                "lr": float(self.scheduler.get_last_lr()[0]),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": stats["samples"] / dt, "tokens_per_s": stats["tokens"] / dt,
                "flops_per_s": self.flops_per_micro * stats["micro_batches"] / dt,
                "skipped_samples": stats["skipped"], "overflow_skipped_steps": result.overflow_skipped_steps,
                "truncated_captions": {**stats["truncated"], "of": stats["samples"]},
                "peak_memory_mb": peak_memory_mb(self.world.device_type), "elapsed_s": time.time() - self.t_start})
        self.window, self.t_window = Window(), time.time()

    def finish(self) -> StageResult:
        """Replicas checked; a finished stage exported (atomically, rank 0) and its result recorded;
        the loader and the engine released."""
        result, cfg = self.result, self.cfg
        if self.trainer.log:
            self.trainer.log.end_stage()
        if not result.stopped_by:  # the export (and the next stage) take the optimizer's fp32 masters
            master_weights_into(self.model, self.stage)
        result.weights_sha256 = self.trainer.check_replicas(self.model)
        if not result.stopped_by:
            result.export = str(self.ckpts.export_final(self.stage, self.state.step))
        self.world.barrier()
        self.batches = None  # the loader's workers end
        if self.model.feature_cache is not None:  # the last segment's rows synced and indexed
            self.model.feature_cache.close()
        result.seconds = time.time() - self.t_start
        result.best = self.validator.summary() if self.validator else None
        if not result.stopped_by and self.world.rank == 0:
            write_stage_record(stage_record(cfg, self.stage), result)
        self.trainer.model = self.model
        self.engine.destroy()
        self.engine = None
        gc.collect()
        return result


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
        leave_now(1)
    except Exception as e:  # noqa: BLE001 - a lost peer or a full disk: say so, then leave without hanging
        rank = trainer.rank if trainer is not None else os.environ.get("RANK", "?")
        if is_collective_failure(e):
            print(f"pretrain: rank {rank}: lost contact with another rank ({type(e).__name__}: "
                  f"{first_line(e)}). A rank died, was killed or hangs (a silent rank is given up on after "
                  f"train.dist_timeout_s={cfg.train.dist_timeout_s} s). Every rank stops; restart the job with "
                  "--resume auto to continue from the newest complete checkpoint.", file=sys.stderr, flush=True)
            leave_now(3)
        if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT outside a checkpoint write
            print(f"pretrain: rank {rank}: no space left on device: {e}. Checkpoints already written are "
                  "complete; free space, then restart with --resume auto.", file=sys.stderr, flush=True)
            leave_now(1)
        import traceback

        traceback.print_exc()
        print(f"pretrain: rank {rank}: failed ({type(e).__name__}: {first_line(e)}); checkpoints already written "
              "are complete: --resume auto continues from the newest one.", file=sys.stderr, flush=True)
        leave_now(1)

