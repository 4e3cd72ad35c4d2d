"""The validation keys' settings check (``data.val``, ``train.eval_every``, ``train.eval_generate_every``,
``train.keep_best_by``, ``train.early_stop_patience``), beside msmedcap.train.validation, which runs them.
Light: the config checks these before any work without importing torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from msmedcap.errors import ConfigError

STAGE1_HEADS = ("itc", "itm", "itg")
GENERATED = ("val/cider", "val/findings", "val/distinct")  # measured on greedy captions (stage 2)


@dataclass(frozen=True)
class KeepBest:
    """``train.keep_best_by``: a metric and whether larger (max) or smaller (min) is better."""
    metric: str
    mode: str

    def better(self, value: Optional[float], best: Optional[float]) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return best is None or (value > best if self.mode == "max" else value < best)


def metric_catalogue(cfg) -> dict:
    """Every metric ``train.keep_best_by`` may name -> the stages that measure it."""
    out = {"val/loss": {1, 2}, "val/loss_lm": {2}, **{m: {2} for m in GENERATED}}
    for head in STAGE1_HEADS:
        out[f"val/loss_{head}"] = {1}
        out.update({f"val/loss_{b}/{head}": {1} for b in cfg.model.branches})
    return out


def parse_keep_best(text: str, cfg) -> KeepBest:
    """``"val/cider:max"`` -> KeepBest; a ConfigError naming the key for anything else."""
    metric, sep, mode = str(text).rpartition(":")
    if not sep or mode not in ("max", "min") or not metric:
        raise ConfigError(f"train.keep_best_by must be METRIC:max or METRIC:min (e.g. val/cider:max, val/loss:min), "
                          f"got {text!r}")
    known = metric_catalogue(cfg)
    if metric not in known and metric.startswith("val/findings/"):
        from msmedcap.eval.findings import registered_fields

        if metric[len("val/findings/"):] in registered_fields():
            return KeepBest(metric, mode)
    if metric not in known:
        raise ConfigError(f"train.keep_best_by: unknown metric {metric!r} (known: {', '.join(sorted(known))}, "
                          "val/findings/FIELD for a findings parser's field)")
    return KeepBest(metric, mode)


def measured_in(metric: str, cfg) -> set:
    return metric_catalogue(cfg).get(metric, {2})  # val/findings/FIELD: stage 2


def check_validation_config(cfg) -> None:
    """The validation keys agree with each other and with train.stage (before any work)."""
    t = cfg.train
    if not t.eval_every:
        for key, value in (("train.eval_generate_every", t.eval_generate_every), ("train.keep_best_by", t.keep_best_by),
                           ("train.early_stop_patience", t.early_stop_patience)):
            if value:
                raise ConfigError(f"{key}={value} is set but validation is off: train.eval_every must be > 0 "
                                  "(steps), with data.val")
        return
    if not cfg.data.val:
        raise ConfigError(f"train.eval_every={t.eval_every}: data.val must be set, to the held-out shard specs to "
                          "validate on (e.g. data.val='[\"val-{000..003}.tar\"]'), apart from data.train and data.eval")
    if t.eval_generate_every % t.eval_every:
        raise ConfigError(f"train.eval_generate_every must be a multiple of train.eval_every ({t.eval_every}), "
                          f"got {t.eval_generate_every}")
    if t.early_stop_patience and not t.keep_best_by:
        raise ConfigError("train.early_stop_patience counts validations without a new best: set train.keep_best_by")
    if not t.keep_best_by:
        return
    keep = parse_keep_best(t.keep_best_by, cfg)
    stages = {1, 2} if t.stage == "all" else {int(t.stage)}
    where = measured_in(keep.metric, cfg)
    if not stages & where:
        raise ConfigError(f"train.keep_best_by: {keep.metric} is measured in stage {'/'.join(map(str, sorted(where)))} "
                          f"only, and train.stage={t.stage}")
    if keep.metric not in metric_catalogue(cfg) or keep.metric in GENERATED:
        if not t.eval_generate_every:
            raise ConfigError(f"train.keep_best_by: {keep.metric} is scored on generated captions: set "
                              "train.eval_generate_every (a multiple of train.eval_every)")
