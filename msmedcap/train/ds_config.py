"""DeepSpeed JSON + run config -> the dict handed to ``deepspeed.initialize``.

The convention users know from transformers' ``HfTrainerDeepSpeedConfig``: a value ``"auto"`` is
filled from the run's config; an explicit value must agree with it, otherwise the run stops before
any work with an error naming both keys. One JSON serves both stages (their lr, steps and batch
sizes differ), so it is filled once per stage.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from msmedcap.config import Config, ConfigError, StageConfig

ADAM_EPS = 1e-8  # not a run-config value; only fills "auto"


def resolve_precision(cfg_precision: str, json_cfg: dict, device_type: str, bf16_supported: bool) -> str:
    """The trainables' precision: the run config's, or where that says ``auto`` the JSON's explicit
    choice, or bf16 (fp16 on GPUs without bf16; fp32 on CPUs without native bf16, where bf16 is
    emulated and several times slower). fp16 needs a GPU's loss scaling kernels."""
    if cfg_precision == "auto":
        explicit = [p for p in ("bf16", "fp16") if json_cfg.get(p, {}).get("enabled") is True]
        fallback = "fp32" if device_type == "cpu" else "fp16"
        precision = explicit[0] if explicit else ("bf16" if bf16_supported else fallback)
    else:
        precision = cfg_precision
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision: fp16 is not supported on CPU; use bf16 or fp32")
    return precision


class _Filler:
    """Walks dotted keys of the JSON: fills "auto", records contradictions."""

    def __init__(self, ds: dict):
        self.ds = ds
        self.mismatches: list = []

    def _node(self, dotted: str):
        *parents, leaf = dotted.split(".")
        node = self.ds
        for p in parents:
            node = node.get(p)
            if not isinstance(node, dict):
                return None, leaf
        return node, leaf

    def fill(self, dotted: str, value: Any, cfg_key: Optional[str] = None) -> None:
        """``"auto"`` -> value; an explicit value different from ``value`` is a contradiction
        (unless ``cfg_key`` is None: then the JSON's explicit value simply wins)."""
        node, leaf = self._node(dotted)
        if node is None or leaf not in node:
            return
        if node[leaf] == "auto":
            node[leaf] = value
        elif cfg_key is not None and not _same(node[leaf], value):
            self.mismatches.append(f"{dotted}={node[leaf]!r} contradicts {cfg_key}={value!r}")

    def leftover_autos(self, node=None, prefix="") -> list:
        node = self.ds if node is None else node
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out += self.leftover_autos(v, f"{prefix}{k}.")
            elif v == "auto":
                out.append(prefix + k)
        return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def read_ds_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be an object")
    return data


def fill_ds_config(ds_json: dict, cfg: Config, stage: int, world_size: int, device_type: str = "cpu",
                   bf16_supported: bool = True, source: str = "DeepSpeed config") -> dict:
    """Return a filled copy of ``ds_json`` for training ``stage`` (1 or 2) on ``world_size`` ranks."""
    ds = copy.deepcopy(ds_json)
    st: StageConfig = getattr(cfg.train, f"stage{stage}")
    key = f"train.stage{stage}"
    f = _Filler(ds)

    f.fill("train_micro_batch_size_per_gpu", st.micro_batch_size, f"{key}.micro_batch_size")
    f.fill("gradient_accumulation_steps", st.grad_accum, f"{key}.grad_accum")
    f.fill("train_batch_size", st.micro_batch_size * st.grad_accum * world_size,
           f"{key}.micro_batch_size x {key}.grad_accum x world size {world_size}")
    f.fill("gradient_clipping", st.grad_clip, f"{key}.grad_clip")

    f.fill("optimizer.params.lr", st.lr, f"{key}.lr")
    f.fill("optimizer.params.betas", list(st.betas), f"{key}.betas")
    f.fill("optimizer.params.weight_decay", st.weight_decay, f"{key}.weight_decay")
    f.fill("optimizer.params.eps", ADAM_EPS)

    # DeepSpeed schedulers (deepspeed.runtime.lr_schedules); WarmupCosineLR is the recipe's
    # linear warmup from warmup_lr then cosine down to min_lr, expressed as ratios of lr.
    warmup = max(1, st.warmup_steps)  # DeepSpeed rejects 0, as transformers notes
    f.fill("scheduler.params.total_num_steps", st.steps, f"{key}.steps")
    f.fill("scheduler.params.warmup_num_steps", warmup, f"{key}.warmup_steps")
    f.fill("scheduler.params.warmup_min_ratio", st.warmup_lr / st.lr, f"{key}.warmup_lr / {key}.lr")
    f.fill("scheduler.params.cos_min_ratio", st.min_lr / st.lr, f"{key}.min_lr / {key}.lr")
    f.fill("scheduler.params.warmup_min_lr", st.warmup_lr, f"{key}.warmup_lr")  # WarmupLR / WarmupDecayLR
    f.fill("scheduler.params.warmup_max_lr", st.lr, f"{key}.lr")

    precision = resolve_precision(cfg.train.precision, ds_json, device_type, bf16_supported)
    explicit = cfg.train.precision != "auto"
    f.fill("bf16.enabled", precision == "bf16", "train.precision" if explicit else None)
    f.fill("fp16.enabled", precision == "fp16", "train.precision" if explicit else None)

    # transformers' rule of thumb for buckets: hidden_size squared (here the Q-Former's).
    hidden = cfg.model.qformer.hidden_size
    f.fill("zero_optimization.reduce_bucket_size", hidden * hidden)
    f.fill("zero_optimization.allgather_bucket_size", hidden * hidden)

    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    if zero_stage not in (0, 1, 2):
        f.mismatches.append(f"zero_optimization.stage={zero_stage!r}: the trainer supports ZeRO stages 0-2 "
                            "(the trainable part is small; frozen encoders are replicated)")
    if f.mismatches:
        raise ConfigError(f"{source} contradicts the run config (set these to \"auto\" to take the run "
                          "config's values):\n  " + "\n  ".join(f.mismatches))
    left = f.leftover_autos()
    if left:
        raise ConfigError(f"{source}: no run-config value to fill \"auto\" at {', '.join(left)}")
    # Precision sections must exist for DeepSpeed to cast the trainables; add them when absent.
    ds.setdefault("bf16", {}).setdefault("enabled", precision == "bf16")
    ds.setdefault("fp16", {}).setdefault("enabled", precision == "fp16")
    return ds



def precision_of(ds: dict) -> str:
    """The trainables' precision a filled DeepSpeed dict asks for."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def bf16_supported(accelerator) -> bool:
    """Whether bf16 is worth using: DeepSpeed's CPU accelerator says yes on every CPU, but only a CPU
    with native bf16 (AVX512-BF16, AMX) runs it at speed."""
    if accelerator.device_name() == "cpu":
        from msmedcap.models.encoders import cpu_has_native_bf16

        return cpu_has_native_bf16()
    return accelerator.is_bf16_supported()
