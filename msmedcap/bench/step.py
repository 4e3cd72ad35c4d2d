"""Part 2: one training step per stage and variant through the trainer's DeepSpeed engine.

samples/s of whole steps; the step split into frozen encoders / Q-Formers / OPT forward-backward /
optimizer (forward hooks on the encoders and OPT, and a gradient hook on the Q-Former query outputs
marking where OPT's backward ends); FLOPs per sample counted with ``torch.utils.flop_counter``
(forward and backward as executed, frozen encoders included); achieved FLOP/s and MFU.
"""
from __future__ import annotations

import torch

from msmedcap.bench.common import ds_engine, now, sync, timed, to_device


class PhaseClock:
    """Wall time of the step's phases from hooks (synchronising the device at each boundary)."""

    def __init__(self, model, dev: torch.device):
        self.dev, self.t = dev, {}
        self.handles = []
        self.query_grad_at = None
        for enc in model.encoders.values():
            self._span(enc, "encoders")
        if model.captioner.lm is not None:  # stage 1 builds no LM
            self._span(model.captioner.lm, "opt_fwd")
        for q in model.qformers.values():
            self.handles.append(q.bert.register_forward_hook(self._watch_queries))

    def _now(self) -> float:
        sync(self.dev)
        return now()

    def _span(self, module, name: str) -> None:
        start = {}

        def pre(*_):
            start[0] = self._now()

        def post(*_):
            self.t[name] = self.t.get(name, 0.0) + self._now() - start[0]

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _watch_queries(self, module, args, output) -> None:
        hidden = output.last_hidden_state
        if hidden.requires_grad and torch.is_grad_enabled():
            def arrived(grad):
                if self.query_grad_at is None:  # the first query gradient: OPT's backward is done
                    self.query_grad_at = self._now()
            hidden.register_hook(arrived)

    def step(self, engine, batch: dict) -> dict:
        self.t, self.query_grad_at = {}, None
        t0 = self._now()
        out = engine(batch)
        t1 = self._now()
        engine.backward(out["loss"])
        t2 = self._now()
        engine.step()
        t3 = self._now()
        enc, opt_fwd = self.t.get("encoders", 0.0), self.t.get("opt_fwd", 0.0)
        opt_bwd = (self.query_grad_at - t1) if self.query_grad_at and opt_fwd else 0.0
        return {"encoders": enc, "qformers_fwd_bwd": (t1 - t0 - enc - opt_fwd) + (t2 - t1 - opt_bwd),
                "opt_fwd_bwd": opt_fwd + opt_bwd, "optimizer": t3 - t2, "total": t3 - t0}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def bench_step(model, cfg, stage: int, batch: dict, dev, iters: int, warmup: int, peak: dict,
               zero_stage: int = 2, label: str = None) -> dict:
    """One (variant, stage) row. ``model`` is built and on ``dev``; ``batch`` on the host."""
    from msmedcap.train.engine import StageLoss
    from msmedcap.train.metrics import count_flops, peak_memory_mb

    n = len(batch["key"])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    engine, ds = ds_engine(StageLoss(model, stage), model, cfg, stage, zero_stage, n)
    inputs = to_device(batch, dev)

    def step():
        out = engine(inputs)
        engine.backward(out["loss"])
        engine.step()

    def fwd_bwd():
        out = engine(inputs)
        engine.backward(out["loss"])

    _, flops = count_flops(fwd_bwd)
    engine.zero_grad()
    seconds = timed(step, dev, iters, warmup)
    clock = PhaseClock(model, dev)
    try:
        splits = [clock.step(engine, inputs) for _ in range(max(1, iters))]
    finally:
        clock.close()
    split = min(splits, key=lambda s: s["total"])  # the least disturbed step, as for the timing
    achieved = flops / seconds  # FLOPs of forward+backward; the optimizer's are not counted
    counts = model.parameter_counts()["total"]
    row = {"variant": label or cfg.model.variant, "stage": stage, "micro_batch": n, "precision": _precision(ds),
           "zero_stage": zero_stage, "step_s": seconds, "samples_per_s": n / seconds,
           "split_s": split, "flops_per_sample": flops / n, "achieved_tflops": achieved / 1e12,
           "mfu": achieved / (peak["tflops"] * 1e12) if peak.get("tflops") else None,
           "params": {"trainable": counts["trainable"], "frozen": counts["frozen"],
                      "in_optimizer": sum(p.numel() for _, p in model.stage_named_parameters(stage))},
           "peak_memory_mib": peak_memory_mb(dev) if dev.type == "cuda" else None}
    engine.destroy()
    return row


def largest_micro_batch(model, cfg, stage: int, make_batch, dev, start: int, limit: int = 4096) -> dict:
    """Double the micro batch from ``start`` until a training step runs out of GPU memory: the largest
    that fit (and the first that did not)."""
    from msmedcap.train.engine import StageLoss

    if dev.type != "cuda":
        return {"largest": None, "note": "searched on GPUs only (CPU memory is not the limit here)"}
    fit, size = None, start
    while size <= limit:
        engine = None
        try:
            engine, _ = ds_engine(StageLoss(model, stage), model, cfg, stage, 2, size)
            inputs = to_device(make_batch(size), dev)
            engine.backward(engine(inputs)["loss"])
            engine.step()
            sync(dev)
            fit, size = size, size * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if engine is not None:
                engine.destroy()
            del engine
            torch.cuda.empty_cache()
    return {"largest": fit, "first_oom": size if size <= limit else None}


def _precision(ds: dict) -> str:
    from msmedcap.train.ds_config import precision_of

    return precision_of(ds)
