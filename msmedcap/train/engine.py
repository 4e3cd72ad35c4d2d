"""One stage's DeepSpeed engine, built the same way for the trainer and the benchmark.

DeepSpeed owns the distributed part: ZeRO-2 over the parameters the stage trains (and only those),
gradient accumulation, clipping, bf16/fp16, AdamW with the reference recipe's warmup + cosine (or the
JSON's own ``scheduler``), from the DeepSpeed JSON filled by ds_config.py.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

from torch import nn

from msmedcap.config import Config
from msmedcap.train.schedule import warmup_cosine


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


def stage_ds_config(ds_json: dict, cfg: Config, stage: int, world_size: int, source: str = "DeepSpeed config") -> dict:
    """The DeepSpeed JSON with its "auto" values filled from ``cfg``'s stage (a contradiction raises
    ConfigError naming both keys), for this machine's accelerator."""
    from deepspeed.accelerator import get_accelerator

    from msmedcap.train.ds_config import bf16_supported, fill_ds_config

    acc = get_accelerator()
    return fill_ds_config(ds_json, cfg, stage, world_size, acc.device_name(), bf16_supported(acc), source=source)


def build_engine(model: nn.Module, cfg: Config, stage: int, ds_config: dict, module: Optional[nn.Module] = None):
    """``(engine, lr_scheduler)`` for ``stage``: DeepSpeed wraps ``module`` (default
    ``StageLoss(model, stage)``) with ``param_groups(model, ...)`` as its only parameters, and the
    warmup + cosine schedule of ``cfg.train.stageN`` unless the JSON brings its own ``scheduler``.
    The engine casts and moves everything it wraps; the frozen parts are kept out of its sight
    (``model.without_frozen_parts``) and moved to its device as they are, so their weights stay
    bit-identical, and the trainables this stage does not train are put back (``model.restore_held``)."""
    import deepspeed

    st = getattr(cfg.train, f"stage{stage}")
    module = StageLoss(model, stage) if module is None else module
    has_frozen = hasattr(model, "without_frozen_parts")  # MSMedCap; a bare module has no frozen parts
    with model.without_frozen_parts() if has_frozen else nullcontext():
        engine, _, _, scheduler = deepspeed.initialize(
            model=module, model_parameters=param_groups(model, st.weight_decay, stage), config=ds_config,
            lr_scheduler=None if "scheduler" in ds_config else warmup_cosine(st))
    if has_frozen:
        model.frozen_to(engine.device)
        model.restore_held()
    return engine, scheduler


def fp32_masters(model: nn.Module, stage: int) -> dict:
    """``{name: the optimizer's fp32 master}`` of each parameter ``stage`` trains that has one (none under
    an fp32 engine without ZeRO, where the two are one). Collective under ZeRO (each rank holds a part of
    the masters): every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, p in model.stage_named_parameters(stage):
        full = safe_get_full_fp32_param(p)
        if full is not None:
            masters[name] = full
    return masters


def master_weights_into(model: nn.Module, stage: int) -> int:
    """The optimizer's fp32 master copy of each parameter ``stage`` trains into the model, in place of
    the engine's bf16/fp16 working copy (what an export should hold, and the next stage start from).
    Collective under ZeRO: every rank calls it. Returns how many parameters were replaced."""
    masters = fp32_masters(model, stage)
    params = dict(model.stage_named_parameters(stage))
    for name, full in masters.items():
        params[name].data = full.to(params[name].device)
    return len(masters)
